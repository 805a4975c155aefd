"""What a test run leaves in its log directory: ``metrics.json`` and ``episodes.jsonl`` (written atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gather_records(records: list[dict]) -> list[dict]:
    """All processes' episode records, sorted by episode index; an episode seen twice is an error."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in (part or [])]
    records = sorted(records, key=lambda r: r["episode"])
    seen = [r["episode"] for r in records]
    if len(seen) != len(set(seen)):
        raise RuntimeError("an evaluation episode was counted twice (sampler padding?)")
    return records


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def write_test_report(log_dir, trainer, values: dict, records: list[dict], class_ids: list[int]) -> Path:
    """Write ``metrics.json`` and ``episodes.jsonl`` into ``log_dir``; returns it."""
    log_dir = Path(log_dir)
    dm = getattr(trainer, "datamodule", None)
    meta = dm.describe() if dm is not None and hasattr(dm, "describe") else {}
    per_class = _plain(values["per_class_iou"])
    metrics = {
        "miou": float(values["miou"]),
        "fbiou": float(values["fbiou"]),
        "per_class_iou": {str(c): float(v) for c, v in zip(class_ids, per_class)},
        **meta,
        "episodes": len(records),
        "model": type(trainer.lightning_module).__name__,
        "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
    }
    atomic_write_text(log_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(log_dir / "episodes.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return log_dir
