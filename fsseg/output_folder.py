"""One writer per output folder, and earlier results replaced only once complete new ones exist.

A command that writes results into a folder holds it with `OutputFolder` while it writes:

- **Lock.** ``<folder>/.fsseg.lock`` names the holder (pid, host, command, start time); the holder keeps an
  ``flock`` on it, which the kernel drops however the process ends. A second writer is refused (`FolderBusy`, naming
  the folder and the holder). A lock file whose process of this host is gone (a SIGKILL'd run) is stale: the next
  writer says so, undoes what that run left half done (below) and takes the folder over. About a lock of another
  host nothing is guessed: the error names the file to delete once that process is known to be gone.
- **Replacing.** Earlier results that a run replaces (``--overwrite``) are moved aside into
  ``<folder>/.fsseg-replaced-<pid>/`` before it writes, and deleted only when it has succeeded. A run that fails or
  is interrupted removes what it wrote and puts them back; after a SIGKILL the next writer in the folder does.
  (Moved aside rather than written to a staging folder: results record absolute paths into their own tree, e.g. the
  demo's test runs record the checkpoint its fit wrote beside them, so they are written where they stay.)
- **Ownership.** ``<folder>/.fsseg-outputs.json`` records which entries of the folder each command wrote
  (`replacing`): ``--overwrite`` replaces those, never a file or folder fsseg did not write.

A folder that holds a lock file is incomplete to the commands that read results (`check_complete`).
Standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fsseg.files import OutputExists, atomic_write_text, ensure_folder

try:
    import fcntl
except ImportError:  # not POSIX: the lock file's pid is the only check
    fcntl = None

LOCK = ".fsseg.lock"
MANIFEST = ".fsseg-outputs.json"
ASIDE = ".fsseg-replaced-"


class FolderBusy(FileExistsError):
    """Another process writes the folder (or may: a lock of another host)."""


class IncompleteFolder(ValueError):
    """A folder a command reads is being written (``running``), or was left unfinished by a process that ended."""

    def __init__(self, message: str, running: bool) -> None:
        super().__init__(message)
        self.running = running


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


@dataclass
class Holder:
    """What a lock file says about the process that holds (or held) the folder."""

    pid: int = 0
    host: str = ""
    command: str = ""
    started: str = ""
    set_aside: list[str] = field(default_factory=list)  # earlier results it moved into .fsseg-replaced-<pid>/
    writing: list[str] = field(default_factory=list)  # what it writes: names or glob patterns in the folder

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The record in lock file ``path``; None when there is none, an empty `Holder` when it is unreadable."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return cls()
        try:
            raw = json.loads(text) if text.strip() else {}
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError):
            return cls()

    def describe(self) -> str:
        if not self.pid:
            return "a process that left no record"
        return f"process {self.pid} on {self.host} ({self.command}, started {self.started})"

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()


def _flock(fd: int, shared: bool = False) -> bool | None:
    """Try to lock ``fd`` without waiting: True (locked), False (another holder), None (no flock here)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock
        return None
    return True


def lock_is_held(folder: Path) -> bool | None:
    """Whether a live process holds the lock of ``folder``: True, False (no lock, or one left by a process that
    ended), None (cannot tell here: no flock)."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        locked = _flock(fd, shared=True)
        return None if locked is None else not locked
    finally:
        os.close(fd)  # also drops the shared lock taken to test


def check_complete(folder: Path) -> None:
    """Refuse to read results from ``folder`` while a lock file is in it (`IncompleteFolder`, one line)."""
    folder = Path(folder)
    holder = Holder.read(folder / LOCK)
    if holder is None:
        return
    held = lock_is_held(folder)
    if held is None:
        held = bool(holder.pid) and (not holder.here or process_alive(holder.pid))
    if held:
        raise IncompleteFolder(
            f"{folder} is being written by {holder.describe()}: wait until it has finished", running=True
        )
    raise IncompleteFolder(
        f"{folder} is incomplete: {holder.describe()} stopped before finishing (killed?) and left {folder / LOCK}; "
        f"run the command that writes it again",
        running=False,
    )


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (moving results into place is not cut in the middle)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_manifest(folder: Path) -> dict[str, str]:
    """``{entry: owner}`` of what fsseg commands wrote into ``folder`` (`replacing`)."""
    try:
        raw = json.loads((Path(folder) / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    entries = raw.get("entries") if isinstance(raw, dict) else None
    return {str(k): str(v) for k, v in entries.items()} if isinstance(entries, dict) else {}


class OutputFolder:
    """A command's hold on the folder it writes (see the module docstring).

    ``acquire`` (lock; take over a stale lock), then optionally ``set_aside`` (earlier results) and ``writes`` (what
    this run writes, so that a failure or a later writer can remove it), then ``commit`` (success: drop what was set
    aside) or ``abandon`` (failure: remove what was written, put back what was set aside). Both release the lock and
    remove the folders ``acquire`` created if they are left empty.
    """

    def __init__(
        self, folder: Path, command: str, what: str = "output folder", say: Callable[[str], None] = print
    ) -> None:
        self.folder = Path(folder)
        self.what = what
        self.say = say
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.holder = Holder(os.getpid(), socket.gethostname(), command, started)
        self.created: list[Path] = []  # folders acquire() created, deepest first
        self._fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.folder / LOCK

    @property
    def aside(self) -> Path:
        return self.folder / f"{ASIDE}{self.holder.pid}"

    # ---- the lock --------------------------------------------------------------------------------------------
    def acquire(self) -> OutputFolder:
        self.created = ensure_folder(self.folder, self.what)
        try:
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _lock(self) -> None:
        path = self.lock_path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = _flock(fd)
            try:
                if locked is False:
                    raise FolderBusy(self._busy(Holder.read(path), held=True))
                if (
                    os.fstat(fd).st_ino != os.stat(path).st_ino
                ):  # released and removed meanwhile: lock the new
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        previous = Holder.read(path)
        if previous is not None and previous.pid:
            stale = previous.here and not process_alive(previous.pid)
            if not stale:  # another host's, or a live process (no flock here, or its pid reused: say so)
                os.close(fd)
                raise FolderBusy(self._busy(previous, held=locked is None))
            self._fd = fd
            self._take_over(previous)
        self._fd = fd
        self._record()

    def _busy(self, holder: Holder | None, held: bool) -> str:
        who = holder.describe() if holder is not None else "another process"
        if holder is not None and holder.pid and not holder.here:
            return (
                f"{self.folder} is locked by {who}; whether it still runs cannot be told from here: if it does "
                f"not, delete {self.lock_path}"
            )
        if held:
            return f"{self.folder} is being written by {who}: one writer per folder; wait for it, or write elsewhere"
        return (
            f"{self.folder} is locked by {who}, which is still running (or its process id was reused): if it is not "
            f"an fsseg command writing there, delete {self.lock_path}"
        )

    def _take_over(self, previous: Holder) -> None:
        """Undo what a process that ended while holding the folder left half done, and say so."""
        done = []
        removed = self._remove_written(previous.writing)
        if removed:
            done.append(
                f"removed its partial output ({', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''})"
            )
        restored = self._restore(previous.set_aside, self.folder / f"{ASIDE}{previous.pid}")
        if restored:
            done.append(f"put back the {len(restored)} earlier result(s) it had set aside")
        self.say(
            f"fsseg: {self.folder} was left incomplete by {previous.describe()}, which is no longer running; "
            f"taking it over" + (f": {'; '.join(done)}" if done else "")
        )

    def _record(self) -> None:
        data = (json.dumps(asdict(self.holder), indent=1) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the lock file and the folders ``acquire`` created that are empty."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.lock_path).st_ino:
                self.lock_path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for p in self.created:  # deepest first
            try:
                p.rmdir()
            except OSError:  # not empty (results, or someone else's files): kept
                break

    # ---- replacing -------------------------------------------------------------------------------------------
    def present(self, patterns: Iterable[str]) -> list[str]:
        """The entries of the folder that ``patterns`` (names, or glob patterns such as ``events.out.*``) match."""
        found = []
        for pattern in patterns:
            if any(c in pattern for c in "*?["):
                found += [str(p.relative_to(self.folder)) for p in sorted(self.folder.glob(pattern))]
            elif (self.folder / pattern).exists() or (self.folder / pattern).is_symlink():
                found.append(pattern)
        return [f for f in dict.fromkeys(found) if not Path(f).name.startswith((LOCK, ASIDE, MANIFEST))]

    def set_aside(self, names: Iterable[str]) -> None:
        """Move the earlier results ``names`` into ``.fsseg-replaced-<pid>/`` until `commit` (or `abandon`)."""
        names = self.present(names)
        if not names:
            return
        with _signals_deferred():
            self.holder.set_aside = names
            self._record()  # recorded first: a process that finds this lock stale puts them back
            for name in names:
                target = self.aside / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(self.folder / name, target)

    def writes(self, patterns: Iterable[str]) -> None:
        """Record what this run writes into the folder (names or glob patterns), for `abandon` and for a process
        that finds this lock stale."""
        self.holder.writing = list(patterns)
        self._record()

    def _remove_written(self, patterns: Iterable[str]) -> list[str]:
        found = self.present(patterns)
        for name in found:
            _remove(self.folder / name)
        return found

    def _restore(self, names: Iterable[str], aside: Path) -> list[str]:
        restored = []
        for name in names:
            if (aside / name).exists() or (aside / name).is_symlink():
                _remove(self.folder / name)
                (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.rename(aside / name, self.folder / name)
                restored.append(name)
        shutil.rmtree(aside, ignore_errors=True)
        return restored

    def commit(self) -> None:
        """The run succeeded: delete the earlier results it replaced; release."""
        with _signals_deferred():
            shutil.rmtree(self.aside, ignore_errors=True)
            self.release()

    def abandon(self) -> None:
        """The run failed or was interrupted: remove what it wrote, put back what it set aside; release."""
        if self._fd is None:
            return
        with _signals_deferred():
            self._remove_written(self.holder.writing)
            self._restore(self.holder.set_aside, self.aside)
            self.release()

    # ---- ownership (commands writing several entries into a folder) ------------------------------------------
    def claim(self, owner: str, entries: list[str], overwrite: bool, flag: str = "--overwrite") -> None:
        """Before ``owner`` writes ``entries``: refuse an existing entry it did not write; refuse its own earlier
        results unless ``overwrite``, else set all of them aside (also those this call does not write again, so old
        and new results never mix)."""
        manifest = read_manifest(self.folder)
        for name in self.present(entries):
            if manifest.get(name) != owner:
                by = (
                    f"was written by fsseg {manifest[name]}"
                    if name in manifest
                    else f"is not recorded in {self.folder / MANIFEST} (yours, or an older fsseg's output)"
                )
                raise OutputExists(
                    f"{self.folder / name} already exists and {by}; fsseg {owner} only replaces what it "
                    f"recorded writing: move it away, or choose another {self.what}"
                )
        earlier = self.present(n for n, o in manifest.items() if o == owner)
        if earlier and not overwrite:
            listed = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
            raise OutputExists(
                f"{self.folder} already holds results of an earlier fsseg {owner} ({listed}): pass {flag} to "
                f"replace them, or choose another {self.what}"
            )
        self.set_aside(earlier)
        self.writes(entries)

    def record(self, owner: str, entries: list[str]) -> None:
        """Enter what ``owner`` wrote in the folder's manifest (its earlier entries replaced)."""
        manifest = {n: o for n, o in read_manifest(self.folder).items() if o != owner}
        manifest.update({n: owner for n in self.present(entries)})
        manifest = {n: o for n, o in manifest.items() if (self.folder / n).exists()}
        atomic_write_text(self.folder / MANIFEST, json.dumps({"entries": manifest}, indent=1) + "\n")


@contextlib.contextmanager
def replacing(
    folder: Path,
    owner: str,
    entries: list[str],
    overwrite: bool,
    what: str = "--out",
    flag: str = "--overwrite",
    say: Callable[[str], None] = print,
) -> Iterator[OutputFolder]:
    """Hold ``folder`` while the command ``owner`` writes ``entries`` into it (`OutputFolder.claim`); on success
    record them and drop the earlier results, on any failure or interruption restore the folder as it was."""
    out = OutputFolder(folder, owner, what, say).acquire()
    try:
        out.claim(owner, entries, overwrite, flag)
        yield out
    except BaseException:
        out.abandon()
        raise
    with _signals_deferred():  # complete: recorded and committed without a signal in between
        try:
            out.record(owner, entries)
        except BaseException:
            out.abandon()
            raise
        out.commit()
