"""The memory plan of a config: its settings read as ``fsseg fit`` reads them, its module built at full size on fake
tensors, one training step and one evaluation step run under `fsseg.plan.tracker.LiveMemory`.

Target ``cuda`` plans a GPU run: the fake tensors live on the CPU (autograd's backward needs a real CUDA device
for CUDA tensors, fake or not), with what differs on a GPU put back: CUDA's autocast lists
(`fsseg.plan.cuda_autocast`), the caching allocator's 512-byte blocks, and the optimizers' CUDA default of
``foreach`` (one multi-tensor step, whose temporaries are as large as a state). Attention runs through PyTorch's
CPU flash-attention kernel, whose memory (output and log-sum-exp; no score matrix) is that of the CUDA flash and
memory-efficient kernels. Not counted: the CUDA context and the cuDNN / cuBLAS workspaces (outside or beside the
allocator's tensors) and the allocator's fragmentation: `fits` leaves room for them. Target ``cpu`` plans a run
on this CPU (CPU autocast, exact bytes): what the validation compares with measured runs.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fsseg.plan.build import build_module
from fsseg.plan.steps import (
    Precision,
    episode_batch,
    eval_step,
    evaluation_precision,
    track_static,
    train_steps,
)
from fsseg.plan.tracker import CUDA_GRANULARITY, LiveMemory

GIB = 2**30
CARDS = (("24 GB", 24), ("40 GB", 40), ("80 GB", 80))  # memory of common cards, GiB
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS / cuDNN handles and workspaces: outside the planned tensors
ALLOCATOR_MARGIN = 1.10  # the caching allocator reserves more than it hands out (fragmentation)


@dataclass
class Setting:
    """What the plan depends on, from a parsed ``fsseg fit`` config."""

    model: dict
    precision: str
    batch_size: int
    eval_batch_size: int
    shot: int
    img_size: int
    eval_size: int
    accumulate: int
    clip_val: float | None
    clip_algorithm: str
    configs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.model["class_path"].rpartition(".")[2]


def setting_from_config(cfg, configs: list[str]) -> Setting:
    """A `Setting` from the ``fit`` namespace LightningCLI parsed (configs and command line)."""
    from fsseg.data.datamodule import accumulation_steps

    data, trainer = cfg.data, cfg.trainer
    notes = []
    eval_size = data.get("eval_size")
    if eval_size in (None, "original"):
        if eval_size == "original":
            notes.append(f"data.eval_size original: planned at data.img_size {data.img_size}")
        eval_size = data.img_size
    effective = data.get("effective_batch_size")
    if effective is not None:
        accumulate = accumulation_steps(effective, 1, data.batch_size)
    else:
        accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    return Setting(
        model=cfg.model.as_dict(),
        precision=Precision.parse(trainer.get("precision") or "32-true").name,
        batch_size=int(data.batch_size),
        eval_batch_size=int(data.get("eval_batch_size") or data.batch_size),
        shot=int(data.shot),
        img_size=int(data.img_size),
        eval_size=int(eval_size),
        accumulate=accumulate,
        clip_val=trainer.get("gradient_clip_val"),
        clip_algorithm=trainer.get("gradient_clip_algorithm") or "norm",
        configs=configs,
        notes=notes,
    )


def fits(peak_bytes: int, card_gib: float) -> str:
    """``yes`` with room for the CUDA context and the allocator's margin, ``tight`` with the context only, ``no``."""
    need = peak_bytes / GIB
    if need * ALLOCATOR_MARGIN + CUDA_CONTEXT_GIB <= card_gib:
        return "yes"
    return "tight" if need + CUDA_CONTEXT_GIB <= card_gib else "no"


def _summary(tracker: LiveMemory) -> dict:
    return {
        "peak_bytes": tracker.peak,
        "peak_gib": round(tracker.peak / GIB, 3),
        "peak_phase": tracker.peak_phase,
        "at_peak_bytes": dict(tracker.at_peak),
    }


def _cuda_optimizer_defaults(optimizer: torch.optim.Optimizer) -> None:
    """torch's default on CUDA parameters: ``foreach`` (on fake tensors it would pick the for-loop)."""
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


def _optimizer(module) -> torch.optim.Optimizer:
    opt = module.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


@contextlib.contextmanager
def _planned_train_shots(module, shot: int, notes: list[str]):
    """DiffewS ``train_shots N`` draws 1..N supports per step (a random number a fake tensor has no value for):
    planned at the most a step draws, every given support."""
    n = module.hparams.get("train_shots") if hasattr(module, "hparams") else None
    if n is None:
        yield
        return
    notes.append(
        f"model.init_args.train_shots {n}: planned with {min(n, shot)} supports, the most a step draws"
    )
    module.hparams.train_shots = None
    try:
        yield
    finally:
        module.hparams.train_shots = n


def run_steps(module, setting: Setting, stages, device, granularity: int, emulate_cuda: bool, notes) -> dict:
    """The training and evaluation steps of ``stages`` on ``module`` (fake or real tensors on ``device``)."""
    precision = Precision.parse(setting.precision)
    out: dict = {}
    if "fit" in stages:
        optimizer = _optimizer(module)
        if emulate_cuda:
            _cuda_optimizer_defaults(optimizer)
        batch = precision.convert_input(
            episode_batch(setting.batch_size, setting.shot, setting.img_size, setting.eval_size, device)
        )
        tracker = LiveMemory(granularity)
        track_static(tracker, module, batch, optimizer)
        with _planned_train_shots(module, setting.shot, notes), tracker:
            train_steps(
                module,
                optimizer,
                batch,
                precision,
                tracker,
                accumulate=setting.accumulate,
                clip_val=setting.clip_val,
                clip_algorithm=setting.clip_algorithm,
                emulate_cuda=emulate_cuda,
            )
        trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        out["train"] = {
            **_summary(tracker),
            "optimizer": type(optimizer).__name__,
            "ddp_gradient_buckets_bytes": trainable,
        }
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        del batch, tracker, optimizer
    if "test" in stages:
        batch = precision.convert_input(
            episode_batch(setting.eval_batch_size, setting.shot, setting.img_size, setting.eval_size, device)
        )
        tracker = LiveMemory(granularity)
        track_static(tracker, module, batch)
        eval_precision = evaluation_precision(module, precision)
        with tracker:
            eval_step(module, batch, eval_precision, tracker, emulate_cuda=emulate_cuda)
        out["eval"] = {**_summary(tracker), "precision": eval_precision.name}
    return out


def plan(setting: Setting, target: str = "cuda", stages=("fit", "test")) -> dict:
    """The plan of ``setting`` for a ``target`` device (``cuda`` or ``cpu``): peaks of the training and the
    evaluation step, at full size, nothing allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if target not in ("cuda", "cpu"):
        raise ValueError(f"--device {target!r}: expected cuda or cpu")
    fake = FakeTensorMode()
    notes = list(setting.notes)
    precision = Precision.parse(setting.precision)
    with tempfile.TemporaryDirectory(prefix="fsseg-plan-") as folder:
        module, components, build_notes = build_module(setting.model, Path(folder), fake, precision)
    notes += build_notes
    if setting.model.get("init_args", {}).get("latent_cache"):
        notes.append(
            "model.init_args.latent_cache: the VAE encodes the training images in the plan (no cache is read); "
            "the encode runs without gradients before the UNet, so the cache lowers the peak only where the "
            "encode is the peak"
        )
    params = list(module.parameters())
    result = {
        "method": setting.method,
        "target": target,
        "setting": {k: v for k, v in asdict(setting).items() if k not in ("model", "notes")},
        "model_init_args": dict(setting.model.get("init_args") or {}),
        "components": components,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
    }
    with fake:
        result.update(
            run_steps(
                module,
                setting,
                stages,
                "cpu",
                CUDA_GRANULARITY if target == "cuda" else 1,
                emulate_cuda=target == "cuda",
                notes=notes,
            )
        )
    if target == "cuda":
        peaks = {stage: result[stage]["peak_bytes"] for stage in ("train", "eval") if stage in result}
        if "train" in result:
            result["train"]["ddp_peak_bytes"] = peaks["train_ddp"] = (
                peaks["train"] + result["train"]["ddp_gradient_buckets_bytes"]
            )
        result["cards"] = {name: {k: fits(v, gib) for k, v in peaks.items()} for name, gib in CARDS}
        result["fits_rule"] = (
            f"yes: peak x {ALLOCATOR_MARGIN} + {CUDA_CONTEXT_GIB} GiB <= card; tight: peak + "
            f"{CUDA_CONTEXT_GIB} GiB <= card; no: otherwise (card = its nominal GiB)"
        )
    result["notes"] = notes
    return result
