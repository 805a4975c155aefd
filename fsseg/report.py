"""What a test run leaves in its log directory, ``metrics.json`` and ``episodes.jsonl``, written by the `TestReport`
callback (the CLI installs it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from lightning.pytorch.callbacks import Callback

from fsseg.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (the writers every command uses)
from fsseg.output_folder import check_complete


def read_test_run(run_dir: Path, ckpt: str | None) -> tuple[list[dict], dict, Path, Path]:
    """(episode records, config, config path, checkpoint path) of a test run, with errors naming what is missing."""
    check_complete(run_dir)  # being written, or left by a run that was killed
    paths = {name: run_dir / name for name in ("episodes.jsonl", "config.yaml", "metrics.json")}
    missing = [
        str(p) for name, p in paths.items() if not p.is_file() and not (name == "metrics.json" and ckpt)
    ]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished test run: missing {', '.join(missing)}")
    records = [json.loads(line) for line in paths["episodes.jsonl"].read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{paths['episodes.jsonl']} holds no episode")
    config = yaml.safe_load(paths["config.yaml"].read_text()) or {}
    ckpt = ckpt or json.loads(paths["metrics.json"].read_text()).get("ckpt_path")
    if not ckpt:
        raise ValueError(
            f"{paths['metrics.json']} records no checkpoint (the run tested untrained weights?); pass --ckpt"
        )
    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt} (recorded in {paths['metrics.json']}) does not exist; pass --ckpt"
        )
    return records, config, paths["config.yaml"], Path(ckpt)


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
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def model_settings(pl_module) -> dict:
    """The model's init arguments as used (its hyper-parameters), as plain JSON values."""
    hp = dict(getattr(pl_module, "hparams", {}) or {})
    class_path = hp.pop("_class_path", f"{type(pl_module).__module__}.{type(pl_module).__name__}")
    hp.pop("_instantiator", None)
    return {"class_path": class_path, "init_args": _plain(hp)}


def evaluation_precision(trainer) -> str:
    """The precision the trainer's module evaluated in (`FewShotModule.evaluation_precision`; for another module,
    ``trainer.precision``)."""
    module = trainer.lightning_module
    return (
        module.evaluation_precision() if hasattr(module, "evaluation_precision") else str(trainer.precision)
    )


@dataclass
class Report:
    """A test run's results in memory: ``metrics`` is what ``metrics.json`` holds (mIoU, FB-IoU, per-class IoU,
    the episodes' description, the model's settings, the precision), ``records`` one entry per episode (what
    ``episodes.jsonl`` holds), ``folder`` where both were written (None: not written)."""

    metrics: dict
    records: list[dict]
    folder: Path | None = None

    @property
    def miou(self) -> float:
        return self.metrics["miou"]

    @property
    def fbiou(self) -> float:
        return self.metrics["fbiou"]


def test_metrics(
    trainer, values: dict, records: list[dict], class_ids: list[int], extra: dict | None = None
) -> dict:
    """What ``metrics.json`` holds for a finished test epoch of ``trainer``, with ``extra`` entries."""
    dm = getattr(trainer, "datamodule", None)
    meta = dm.describe() if dm is not None and hasattr(dm, "describe") else {}
    per_class = _plain(values["per_class_iou"])
    return {
        "miou": float(values["miou"]),
        "fbiou": float(values["fbiou"]),
        "per_class_iou": {str(c): float(v) for c, v in zip(class_ids, per_class)},
        **meta,
        "episodes": len(records),
        "model": type(trainer.lightning_module).__name__,
        # absolute, so that tools reading the run (read_test_run) find the weights from any folder; the caller
        # gives it in ``extra`` where the weights were loaded without trainer.ckpt_path (`fsseg.runs.test`)
        "ckpt_path": os.path.abspath(trainer.ckpt_path) if trainer.ckpt_path else None,
        "model_settings": model_settings(trainer.lightning_module),
        # the precision the evaluation ran in (the model's eval_precision, else trainer.precision); bf16-mixed changes
        # the numbers a little (README: Speed)
        "precision": evaluation_precision(trainer),
        **(extra or {}),
    }


def write_report(report: Report, folder) -> Report:
    """Write ``metrics.json`` and ``episodes.jsonl`` of ``report`` into ``folder`` (each atomically)."""
    folder = Path(folder)
    atomic_write_text(folder / "metrics.json", json.dumps(report.metrics, indent=2) + "\n")
    atomic_write_text(folder / "episodes.jsonl", "".join(json.dumps(r) + "\n" for r in report.records))
    report.folder = folder
    return report


class TestReport(Callback):
    """Collect a test run's `Report` and write it (``metrics.json``, ``episodes.jsonl``) into the trainer's log
    directory, or into ``folder`` when given; ``write=False`` keeps it in memory only.

    The module computes the metric (``test_values``, from its `FewShotIoU`) and collects one record per episode
    (``test_records``); this callback gathers the records from every process (each process gets the whole
    `Report`: ``report``) and has rank 0 write both files, with the datamodule's description of the episodes
    (``describe()``), the model's settings and ``extra``. ``written`` is the folder written to (None until then).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, extra: dict | None = None, folder=None, write: bool = True) -> None:
        self.extra = dict(extra or {})
        self.folder = None if folder is None else Path(folder)
        self.write = write
        self.report: Report | None = None
        self.written: Path | None = None

    def on_test_end(self, trainer, pl_module) -> None:
        values = getattr(pl_module, "test_values", None)
        if values is None:  # not an fsseg module, or no test epoch ran
            return
        records = gather_records(list(getattr(pl_module, "test_records", [])))
        class_ids = pl_module.test_iou.class_ids
        self.report = Report(test_metrics(trainer, values, records, class_ids, self.extra), records)
        if not self.write:
            return
        folder = self.folder or trainer.log_dir or trainer.default_root_dir  # log_dir: a collective under DDP
        if trainer.is_global_zero:
            self.written = write_report(self.report, folder).folder
