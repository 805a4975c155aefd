"""Writing results: atomic writes with ordinary permissions, and the one overwrite policy of every command (an
output that exists is refused unless ``--overwrite`` is given, and then replaced as a whole)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path


class OutputExists(FileExistsError):
    """A result the command would write already exists and ``--overwrite`` was not given."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The file gets the permissions of any new file (0644 under the usual umask 022), not a private temp file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
    )  # the umask applies, as for open(path, "w")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def claim_outputs(paths: Iterable[Path], overwrite: bool, flag: str = "--overwrite") -> list[Path]:
    """Make sure none of ``paths`` (files or folders a command is about to write) exists.

    Without ``overwrite`` an existing one is an `OutputExists` error naming it; with ``overwrite`` the existing ones
    are removed (so old and new results never mix). Returns the paths that were removed.
    """
    existing = [Path(p) for p in paths if Path(p).exists() or Path(p).is_symlink()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExists(
            f"{existing[0]}{more} already exists: pass {flag} to replace it, or choose another output location"
        )
    for p in existing:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return existing
