"""Writing results: atomic writes with ordinary permissions, folders that must be folders, and the one overwrite
policy of every command (an output that exists is refused unless ``--overwrite`` is given).

Standard library only. Folders a command writes as a whole (one writer at a time, earlier results replaced only by
complete new ones) are `fsseg.output_folder`'s.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


class OutputExists(FileExistsError):
    """A result the command would write already exists and ``--overwrite`` was not given."""


CACHE_VARIABLE = "FSSEG_CACHE"


def cache_root() -> Path:
    """fsseg's cache folder (generated data, class indices, latent caches): ``$FSSEG_CACHE``, else ``~/.cache/fsseg``."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "fsseg").expanduser()


def expand_path(value: str | os.PathLike) -> Path:
    """A path as a config may give it: a leading ``$FSSEG_CACHE`` or ``${FSSEG_CACHE}`` is `cache_root` (set or
    not), a leading ``~`` the home folder."""
    text = str(value)
    for var in (f"${{{CACHE_VARIABLE}}}", f"${CACHE_VARIABLE}"):
        if text == var or text.startswith(var + "/"):
            return cache_root() / text[len(var) + 1 :]
    return Path(text).expanduser()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file in the same folder (so the final rename never
    crosses a filesystem), flushed and fsynced, then renamed over ``path``.

    If anything fails (a full disk, an interruption) the temporary file is removed and ``path`` is as it was: never
    truncated, never replaced by a partial file. An `OSError` names ``path``. The file gets the permissions of any
    new file (0644 under the usual umask 022), not a private temp file's 0600.
    """
    path = Path(path)
    ensure_folder(path.parent, "output folder")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
    )  # the umask applies, as for open(path, "w")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and not err.filename:
            raise OSError(err.errno, f"{err.strerror}: writing {path} failed ({path} is unchanged)") from err
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through `atomic_writer`."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def ensure_folder(path: Path, what: str = "folder") -> list[Path]:
    """Create the folder ``path`` and its missing parents; returns the folders created, deepest first.

    A file where a folder is needed is a `NotADirectoryError` naming ``what`` (e.g. ``--out``) and the file, instead
    of the bare ``[Errno 17] File exists`` of ``mkdir``.
    """
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            where = "" if p == path else f" (its parent {p} is a file)"
            raise NotADirectoryError(f"{what} {path} is not a folder{where}: a file is in the way")
        missing.append(p)
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
    return missing


def check_output_file(path: Path, overwrite: bool, what: str = "--out", flag: str = "--overwrite") -> None:
    """Refuse ``path`` as a file to write before any work: a folder there (or a file where its folder should be),
    or an existing file without ``overwrite``. Nothing is removed: the file is replaced by `atomic_write_text` once
    the new content exists."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder: give the name of the file to write")
    for p in path.parents:
        if p.is_dir():
            break
        if p.exists():
            raise NotADirectoryError(f"{what} {path}: {p} is a file, not a folder")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExists(f"{what} {path} already exists: pass {flag} to replace it, or choose another name")


def refuse_existing(paths: Iterable[Path], overwrite: bool, flag: str = "--overwrite") -> list[Path]:
    """The files a command is about to write, checked before any work: without ``overwrite`` an existing one is an
    `OutputExists` error naming it. Nothing is removed: each file is replaced by `atomic_writer` once its new
    content exists, so a run that fails leaves the earlier results as they were. Returns the paths that exist.
    Commands that write whole result folders use `fsseg.output_folder` instead."""
    existing = [Path(p) for p in paths if Path(p).exists() or Path(p).is_symlink()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExists(
            f"{existing[0]}{more} already exists: pass {flag} to replace it, or choose another output location"
        )
    return existing
