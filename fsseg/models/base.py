"""`FewShotModule`: the train/val/test/predict logic shared by every method.

A method implements ``training_loss(batch) -> {"loss": ..., ...}`` and
``predict_masks(batch, out_size) -> LongTensor [B, h, w]`` (abstract: a subclass without them cannot be built); this
class does the rest: one ``model_step`` for all stages, one `FewShotIoU` per evaluation stage, the per-episode
records of a test run (written to disk by the `fsseg.report.TestReport` callback), the optimiser and scheduler given by the CLI (``optimizer`` / ``scheduler`` init args, each a
``class_path`` callable), frozen pretrained parts (`frozen_modules`), component loading (`load_component`, offline
first: `fsseg.models.loading`) and the one threshold convention of score-thresholding methods (`binarize`).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from contextlib import contextmanager
from typing import ClassVar

import lightning as L
import torch

# Lightning's aliases: jsonargparse builds them from a `class_path` (e.g. torch.optim.AdamW, LinearLR) in a config.
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from fsseg.metrics import FewShotIoU, episode_inter_union
from fsseg.models import loading
from fsseg.predictions import encode_masks

THRESHOLD_MODES = ("absolute", "relative")
#: ``eval_precision`` values (None: the trainer's precision). Each keeps fp32 weights, so any of them can evaluate
#: a model that the trainer holds at one of these precisions.
EVAL_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


#: Lightning's older spellings of the precisions (``trainer.precision 16`` is ``16-mixed``)
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def eval_precision_conflict(eval_precision: str | None, given) -> str | None:
    """Why an evaluation run (validate / test) is refused, or None.

    The rule: a set ``eval_precision`` (e.g. the DiffewS paper configs' ``32-true``) decides the evaluation's
    precision over a ``trainer.precision`` from a config file (that one is the training precision, e.g. their
    ``16-mixed``); ``--trainer.precision given`` on the command line of a validate/test run asks for this run's
    precision explicitly, so where it differs from ``eval_precision`` the run is refused by name instead of one of
    the two being silently replaced."""
    if given is None or eval_precision is None:
        return None
    wanted = PRECISION_ALIASES.get(str(given), str(given))
    if wanted == eval_precision:
        return None
    return (
        f"--trainer.precision {given} conflicts with model.init_args.eval_precision {eval_precision}, which sets the "
        f"precision of evaluation runs: give --model.init_args.eval_precision {wanted} to evaluate in {wanted} (null: "
        f"follow trainer.precision), or drop --trainer.precision"
    )


def threshold_scores(
    score: torch.Tensor, threshold: float, mode: str, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, h, w]`` scores -> {0, 1} long: ``score > threshold`` (absolute) or ``score > threshold * reference``
    (relative; ``reference [B]`` defaults to each image's maximum score)."""
    if mode == "absolute":
        return (score > threshold).long()
    if mode != "relative":
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    if reference is None:
        reference = score.flatten(1).amax(1)  # [B]
    return (score > threshold * reference.view(-1, 1, 1)).long()


def min_grid(*blocks: nn.Module | None) -> int:
    """The smallest side of a coarsest feature grid that the GroupNorms of ``blocks`` (those a network runs at that
    grid; None entries skipped) can normalise: 1 when each group holds at least two channels, else 2 (a 1x1 grid
    would leave one value per group)."""
    norms = [
        m for block in blocks if block is not None for m in block.modules() if isinstance(m, nn.GroupNorm)
    ]
    return 1 if all(m.num_channels // m.num_groups >= 2 for m in norms) else 2


def unet_coarsest_blocks(unet: nn.Module) -> tuple[nn.Module | None, ...]:
    """A diffusers UNet's blocks at its coarsest grid: the last down block, the mid block, the first up block."""
    return unet.down_blocks[-1], getattr(unet, "mid_block", None), unet.up_blocks[0]


class FewShotModule(L.LightningModule, metaclass=ABCMeta):
    """Base LightningModule of every fsseg method.

    Args:
        optimizer: builds the optimiser from the trainable parameters (default AdamW, lr 1e-3).
        scheduler: builds an LR scheduler from the optimiser (default none).
        scheduler_interval: ``step`` or ``epoch``.
        threshold / threshold_mode: for methods that threshold a foreground score (`binarize`): ``absolute``
            (``score > threshold``) or ``relative`` (``score > threshold * max``); None for the others.
        eval_precision: the precision of validation, test and ``trainer.predict`` steps: None (the trainer's
            ``trainer.precision``) | ``32-true`` | ``bf16-mixed`` | ``16-mixed``, whatever precision trains. Applied
            as autocast around the model's prediction (`evaluation_autocast`) and recorded in ``metrics.json``
            (`evaluation_precision`); see `eval_precision_conflict` for a command line asking for another.
    """

    #: attribute names of frozen pretrained sub-modules: assigning one turns its gradients off and puts it in eval
    #: mode, ``.train()`` keeps it there, and it is never written into Lightning checkpoints (it is loaded from its
    #: own files, e.g. ``("vae",)``).
    frozen_modules: ClassVar[tuple[str, ...]] = ()
    #: whether the method takes ``threshold`` / ``threshold_mode`` init arguments (``fsseg predict-images --threshold``)
    has_threshold: ClassVar[bool] = False
    #: init arguments the trained weights depend on (they change the architecture, not a setting of it): a
    #: checkpoint trained with other values is refused by name. Every other init argument given with a checkpoint
    #: (thresholds, inference steps, asset paths) is used as given (`fsseg.cli.checkpoints`).
    architecture_args: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
        threshold: float | None = None,
        threshold_mode: str = "absolute",
        eval_precision: str | None = None,
    ) -> None:
        super().__init__()
        if eval_precision is not None and eval_precision not in EVAL_PRECISIONS:
            raise ValueError(
                f"eval_precision must be null or one of {EVAL_PRECISIONS}, got {eval_precision!r}"
            )
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        self.optimizer_fn = optimizer
        self.scheduler_fn = scheduler
        self.scheduler_interval = scheduler_interval
        self.eval_precision = eval_precision
        self.val_iou: FewShotIoU | None = None
        self.test_iou: FewShotIoU | None = None
        self.test_records: list[dict] = []  # one per episode of this process's test episodes
        self.test_values: dict | None = None  # the test metric's values once the test epoch is done

    # ---- what a method implements -------------------------------------------------------------------------
    @abstractmethod
    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """The training loss of one batch: ``{"loss": scalar, **other scalars to log}``."""

    @abstractmethod
    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        """Binary query predictions ``[B, *out_size]`` (int64, {0, 1})."""

    # ---- frozen pretrained parts, components, thresholds ------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if name in type(self).frozen_modules and isinstance(value, nn.Module):
            value.requires_grad_(False).eval()
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_modules:
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    def locate_component(self, source: str, subfolder: str | None, what: str, **kwargs):
        """The local folder of a pretrained component (`fsseg.models.loading.locate`: package asset, working
        directory, Hugging Face cache; a download only when the ``allow_download`` init argument is true).
        ``reference`` (the hub id whose layout is expected) and ``key`` (the config key naming ``source``) go into
        the error a missing component raises."""
        allow = bool(self.hparams.get("allow_download", False))
        return loading.locate(source, subfolder, what, allow_download=allow, **kwargs)

    def load_component(self, cls, source: str, subfolder: str | None, what: str, **kwargs):
        """``cls.from_pretrained`` of `locate_component`'s folder, offline (`fsseg.models.loading.load_component`)."""
        allow = bool(self.hparams.get("allow_download", False))
        return loading.load_component(cls, source, subfolder, what, allow_download=allow, **kwargs)

    def binarize(self, score: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, h, w]`` foreground scores -> {0, 1} long with the ``threshold`` / ``threshold_mode`` init args."""
        return threshold_scores(score, self.hparams.threshold, self.hparams.threshold_mode, reference)

    def input_size_error(self, size: int) -> str | None:
        """Why this model cannot take square inputs of side ``size`` (its smallest accepted side and the reason), or
        None when it can. `FewShotDataModule` asks it for ``data.img_size`` where model and data meet (``setup``),
        ``fsseg predict-images`` for ``--img-size``. The default takes any positive size."""
        return None

    # ---- one support set, many queries (``fsseg predict-images``) ------------------------------------------
    def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> object:
        """Prepare one support set ``[K, 3, S, S]`` in [0, 1] / ``[K, S, S]`` in {0, 1, 255} for many queries.

        The default keeps the tensors; a method overrides this (with `predict_with_support`) to do the support's
        share of the work once.
        """
        return support_imgs, support_masks

    def predict_with_support(
        self, support_state, query_imgs: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """Binary predictions ``[B, *out_size]`` (int64, {0, 1}) for ``query_imgs [B, 3, S, S]`` against a support
        set from `encode_support`. The default builds an episode batch (image keys only) for `predict_masks`."""
        s_imgs, s_masks = support_state
        b = query_imgs.shape[0]
        batch = {
            "query_img": query_imgs,  # [B, 3, S, S]
            "support_imgs": s_imgs.expand(b, *s_imgs.shape),  # [B, K, 3, S, S]
            "support_masks": s_masks.expand(b, *s_masks.shape),  # [B, K, S, S]
        }
        return self.predict_masks(batch, out_size)

    # ---- evaluation precision -------------------------------------------------------------------------------
    def evaluation_precision(self) -> str:
        """The precision evaluation runs in: ``eval_precision``, else the trainer's ``trainer.precision``."""
        return self.eval_precision or str(self.trainer.precision)

    @contextmanager
    def evaluation_autocast(self):
        """Autocast for ``eval_precision`` around an evaluation step, inside the trainer's own (which follows
        ``trainer.precision``): off for ``32-true``, bf16 / fp16 for the mixed ones; nothing when it is unset or
        equal to the trainer's. A trainer that holds the weights in another dtype (``64-true``, ``bf16-true``, ...)
        cannot evaluate at another ``eval_precision``: refused by name."""
        trainer_precision = str(self.trainer.precision) if self._trainer is not None else None
        wanted = self.eval_precision
        if wanted is None or wanted == trainer_precision:
            yield
            return
        if trainer_precision is not None and trainer_precision not in EVAL_PRECISIONS:
            raise ValueError(
                f"model.init_args.eval_precision {wanted} needs fp32 weights, but trainer.precision "
                f"{trainer_precision} holds them otherwise: set eval_precision null, or trainer.precision 32-true"
            )
        half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(wanted)
        with torch.autocast(self.device.type, dtype=half, enabled=half is not None, cache_enabled=False):
            yield

    # ---- shared steps ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "eval_class_ids"):
            return
        if stage in ("fit", "validate"):
            self.val_iou = FewShotIoU(dm.eval_class_ids("val"))
        if stage == "test":
            self.test_iou = FewShotIoU(dm.eval_class_ids("test"))

    def model_step(self, batch: dict, stage: str) -> torch.Tensor | None:
        if stage == "train":
            out = self.training_loss(batch)
            bs = batch["query_img"].shape[0]
            for k, v in out.items():
                self.log(f"train/{k}", v.detach(), prog_bar=(k == "loss"), batch_size=bs)
            return out["loss"]
        target = batch["query_mask_eval"]
        with self.evaluation_autocast():
            pred = self.predict_masks(batch, tuple(target.shape[-2:]))
        metric = self.val_iou if stage == "val" else self.test_iou
        if metric is None:
            raise RuntimeError(
                f"{stage} needs a FewShotDataModule (it provides the fold's classes for the metric)"
            )
        metric.update(pred, target, batch["class_id"])
        if stage == "test":
            self._record_episodes(batch, *episode_inter_union(pred, target), encode_masks(pred))
        return None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.model_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        size = (
            tuple(batch["query_mask_eval"].shape[-2:])
            if "query_mask_eval" in batch
            else tuple(batch["query_img"].shape[-2:])
        )
        with self.evaluation_autocast():
            pred = self.predict_masks(batch, size)
        return {"pred": pred.cpu(), "query_name": batch.get("query_name")}

    def _log_metric(self, metric: FewShotIoU, stage: str) -> dict[str, torch.Tensor]:
        values = metric.compute()
        self.log(
            f"{stage}/miou", values["miou"].float(), prog_bar=True, rank_zero_only=False, sync_dist=False
        )
        self.log(f"{stage}/fbiou", values["fbiou"].float(), prog_bar=True, sync_dist=False)
        metric.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        if self.val_iou is not None:
            self._log_metric(self.val_iou, "val")

    def on_test_epoch_start(self) -> None:
        self.test_records, self.test_values = [], None

    def on_test_epoch_end(self) -> None:
        # kept with this process's `test_records` for the report (`fsseg.report.TestReport`, installed by the CLI)
        if self.test_iou is not None:
            self.test_values = self._log_metric(self.test_iou, "test")

    def _record_episodes(
        self, batch: dict, inter: torch.Tensor, union: torch.Tensor, pred_rles: list[dict]
    ) -> None:
        support_names = batch["support_names"]  # collated: K lists of B names
        support_class = batch.get("support_class_id", batch["class_id"])  # differs under data.support_control
        control = batch.get("support_control", ["none"] * inter.shape[0])
        for b in range(inter.shape[0]):
            self.test_records.append(
                {
                    "episode": int(batch["episode_idx"][b]),
                    "query": batch["query_name"][b],
                    "supports": [names[b] for names in support_names],
                    "class_id": int(batch["class_id"][b]),
                    "support_class": int(support_class[b]),
                    "support_control": control[b],
                    "inter": inter[b].tolist(),
                    "union": union[b].tolist(),
                    "pred_rle": pred_rles[b],  # the prediction itself (fsseg.predictions)
                }
            )

    # ---- optimisation ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters")
        opt = (
            self.optimizer_fn(params) if self.optimizer_fn is not None else torch.optim.AdamW(params, lr=1e-3)
        )
        if self.scheduler_fn is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler_fn(opt), "interval": self.scheduler_interval},
        }

    # ---- checkpoints hold only what is trained --------------------------------------------------------------
    def _is_frozen_key(self, key: str) -> bool:
        return any(key == m or key.startswith(m + ".") for m in self.frozen_modules)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint.get("state_dict", {})
        for key in [k for k in sd if self._is_frozen_key(k)]:
            del sd[key]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.frozen_modules:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not self._is_frozen_key(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match {type(self).__name__}: missing {missing[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}"
            )
        return result
