"""Reading the shipped split lists (plain text and json.gz; never pickle)."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path


def default_splits_dir() -> Path:
    return Path(str(resources.files("fsseg.data") / "splits"))


def resolve_splits_dir(splits_dir: str | Path | None) -> Path:
    path = Path(splits_dir) if splits_dir is not None else default_splits_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"split-list directory {path} does not exist")
    return path


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines (handles the CRLF line endings of FSS-1000's test.txt)."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} is missing")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def read_json_gz(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} is missing")
    try:
        with gzip.open(path, "rt") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"split list {path} is not valid gzipped JSON: {e}") from e
