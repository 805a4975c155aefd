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
from lightning.pytorch.callbacks import Callback

# keys of a model's saved hyper-parameters that are not init arguments, or do not matter when evaluating
_INTERNAL = ("_class_path", "_instantiator")
_TRAINING_ONLY = ("optimizer", "scheduler", "scheduler_interval")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a Lightning checkpoint, or of another model."""


def _load_error(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in words that never suggest loading unsafely."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if (
        "Weights only load failed" in text and found
    ):  # an unsupported or blocked global: an object, not corruption
        return (
            f"it holds a Python object ({found.group(1)}), not only tensors and plain values; fsseg loads "
            f"checkpoints with weights_only=True and never unpickles objects"
        )
    if "WeightsUnpickler error:" in text:
        detail = (
            text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip().split(".")[0].strip()
        )
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


def trained_class_overlap(trained: dict, dm, split: str) -> tuple[str, int, list[int], list[int]] | None:
    """(benchmark, training fold, the evaluated classes, those among the checkpoint's training classes) for a data
    module ``dm`` set up for ``split`` (``val`` | ``test``) and a checkpoint's ``datamodule_hyper_parameters``
    ``trained``; None when the checkpoint was trained on another benchmark (class indices of two benchmarks are not
    comparable). Training fold -1: every class (the in-context mix ``train_benchmarks``)."""
    from fsseg.data.registry import benchmark_class

    hp = dm.hparams
    mix = trained.get("train_benchmarks") or []
    if hp.benchmark not in (mix or [trained.get("benchmark")]):
        return None
    fold = -1 if mix else int(trained.get("fold", 0))
    cls = benchmark_class(hp.benchmark)
    train = cls(
        root=cls.resolve_root(hp.root), split="trn", fold=fold, splits_dir=hp.splits_dir, index_only=True
    )
    evaluated = list(dm.datasets[split].class_ids())
    seen = set(train.class_ids())
    return hp.benchmark, fold, evaluated, [c for c in evaluated if c in seen]


class TrainedClassesCheck(Callback):
    """Refuse to evaluate a checkpoint on classes it was trained on (a fold-0 checkpoint tested with ``--fold 1``):
    its result would not be few-shot. ``allow`` (``--allow_trained_classes``) evaluates anyway; it is recorded in
    ``config.yaml`` and, with the classes concerned, in ``metrics.json`` (through ``report``, the `TestReport`). A
    checkpoint trained on every class (the in-context setting, ``data.train_benchmarks``) is evaluated on them by
    design: said and recorded, not refused. A checkpoint without ``datamodule_hyper_parameters`` cannot be checked:
    said, and evaluated. Checked after the data module's setup, before the first episode."""

    def __init__(self, trained: dict | None, ckpt_path, allow: bool, report) -> None:
        self.trained, self.ckpt_path, self.allow, self.report = trained, ckpt_path, allow, report

    def setup(self, trainer, pl_module, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn
        if stage not in ("test", "validate"):
            return
        say = print if trainer.is_global_zero else (lambda line: None)
        extra = self.report.extra
        if self.allow:
            extra["allow_trained_classes"] = True
        if self.trained is None:
            say(
                f"fsseg {stage}: cannot check whether the evaluated classes were among the training classes of "
                f"{self.ckpt_path}: it records no datamodule_hyper_parameters (evaluated anyway)"
            )
            return
        try:
            found = trained_class_overlap(
                self.trained, trainer.datamodule, "test" if stage == "test" else "val"
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            say(f"fsseg {stage}: cannot check the checkpoint's training classes ({err}); evaluated anyway")
            return
        if found is None or not found[3]:
            return
        benchmark, fold, evaluated, overlap = found
        extra["trained_classes_evaluated"] = overlap
        listed = ", ".join(map(str, overlap[:10])) + (" ..." if len(overlap) > 10 else "")
        what = f"{len(overlap)} of the {len(evaluated)} classes that {stage} fold {trainer.datamodule.hparams.fold} evaluates ({listed})"
        if fold == -1:
            say(
                f"fsseg {stage}: {self.ckpt_path} was trained on every class of {benchmark} (data.train_benchmarks, "
                f"the in-context setting), so on {what} (recorded in metrics.json)"
            )
            return
        if not self.allow:
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} was trained on {benchmark} fold {fold}, whose training classes include "
                f"{what}: not a few-shot result. Evaluate it with --fold {fold}, or pass --allow_trained_classes to "
                f"evaluate anyway (recorded)"
            )
        say(
            f"fsseg {stage}: {self.ckpt_path} was trained on {benchmark} fold {fold}, whose training classes include "
            f"{what}; evaluated as --allow_trained_classes asks (recorded in config.yaml and metrics.json)"
        )
