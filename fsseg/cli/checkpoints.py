"""A Lightning checkpoint given to a command: read safely with an error naming the file, and checked against the
model the config builds.

The config decides every setting; the checkpoint gives the weights. So a checkpoint of another method, or one
trained with another value of an init argument the weights depend on (a module's ``architecture_args``), is refused
by name; any other difference (a threshold, inference steps, an asset path) is the config's to make and is reported.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import torch

# keys of a model's saved hyper-parameters that are not init arguments, or do not matter when evaluating
_INTERNAL = ("_class_path", "_instantiator")
_TRAINING_ONLY = ("optimizer", "scheduler", "scheduler_interval")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a Lightning checkpoint, or of another model."""


def _load_error(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in words that never suggest loading unsafely."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        found = re.search(r"GLOBAL (\S+)", detail)
        if "Unsupported global" in detail:
            what = f" ({found.group(1)})" if found else ""
            return f"it holds a Python object{what}, which fsseg never unpickles (expected tensors and plain values)"
        detail = detail.split(".")[0].strip()
    else:
        detail = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if "weights_only" in detail:
        detail = type(err).__name__
    return f"it is corrupt ({detail})"


def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint's contents (tensors memory-mapped, plain values only, never arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is not a complete PyTorch checkpoint archive (truncated, "
            f"corrupt, or another kind of file)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on a damaged archive
        raise CheckpointError(f"checkpoint {path} cannot be read: {_load_error(err)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (it has no state_dict)")
    return ckpt


def _plain(value):
    """Comparable plain data (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def checkpoint_class(ckpt: dict) -> str | None:
    """The ``model.class_path`` a checkpoint was trained with (saved by the CLI), if recorded."""
    return (ckpt.get("hyper_parameters") or {}).get("_class_path")


def compare_model_config(
    ckpt: dict, path: str | Path, class_path: str, init_args: dict, architecture_args: tuple[str, ...]
) -> list[str]:
    """Refuse a checkpoint of another method or architecture; return the settings the config changes, as lines.

    ``init_args`` are the model's init arguments as the command parsed them (config files and command line).
    """
    trained_class = checkpoint_class(ckpt)
    if trained_class is not None and trained_class != class_path:
        raise CheckpointError(
            f"checkpoint {path} is a {trained_class} checkpoint, but the config builds {class_path} "
            f"(model.class_path); give the config of the run that wrote it"
        )
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k not in _INTERNAL}
    clashes = [
        f"model.init_args.{k}: the checkpoint was trained with {_plain(hparams[k])!r}, the config gives "
        f"{_plain(init_args.get(k))!r}"
        for k in architecture_args
        if k in hparams and _plain(hparams[k]) != _plain(init_args.get(k))
    ]
    if clashes:
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured {class_path.rpartition('.')[2]}: "
            + "; ".join(clashes)
            + " (these settings change the architecture; drop the override or use a checkpoint trained with it)"
        )
    return [
        f"model.init_args.{k}: {_plain(init_args[k])!r} (the checkpoint's run: {_plain(v)!r})"
        for k, v in hparams.items()
        if k in init_args and k not in _TRAINING_ONLY and _plain(v) != _plain(init_args[k])
    ]


def compare_state_dict(ckpt: dict, path: str | Path, model: torch.nn.Module, skip=lambda key: False) -> None:
    """Refuse a checkpoint whose weights do not fit ``model``: missing, unexpected or differently shaped tensors.

    ``skip(key)`` marks the model's keys that checkpoints never hold (frozen parts loaded from their own files).
    """
    saved = ckpt["state_dict"]
    own = {k: v for k, v in model.state_dict().items() if not skip(k)}
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own and not skip(k)]
    shapes = [
        f"{k} {list(saved[k].shape)} in the checkpoint, {list(own[k].shape)} in the model"
        for k in own
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {what} ({'; '.join(keys[:3])}{more})")
    raise CheckpointError(
        f"checkpoint {path} does not fit the configured {type(model).__name__}: weights "
        + ", ".join(parts)
        + "; was it trained with other model settings?"
    )
