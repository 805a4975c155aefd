"""Lightning callbacks: `RunCheckpoint` (the resumable checkpoints of every ``fsseg fit``, installed by the CLI,
written by `AtomicCheckpointIO`) and `EpisodePanels` (what the model predicts, as image panels in TensorBoard).

`EpisodePanels`:

Every ``every_n_steps`` training steps (and on the first validation batch of each validation run) it draws the first
``n_episodes`` episodes of the batch — supports with their masks, the query, its ground truth, the prediction of
``pl_module.predict_masks`` in eval mode — and logs the grid to every TensorBoard logger of the trainer.

    trainer:
      callbacks:
        - class_path: fsseg.callbacks.EpisodePanels
          init_args: {every_n_steps: 40, n_episodes: 4}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fsseg.files import atomic_writer
from fsseg.visual import column_titles, episode_row, grid


class TrainingLatentCache(Callback):
    """Trains a model from cached VAE posteriors (DiffewS's ``latent_cache``): at ``fit`` the data module
    (``use_latent_cache``, `fsseg.data.latent_cache`) builds a missing cache in ``folder`` with the model's encoder
    (``latent_encoder()``: the weights its fingerprint hashes and the moments function), once per node (its first
    process; the others wait) on the training device, or checks the one there; then every process's training
    episodes carry their cached posteriors. The model declares it (``configure_callbacks``); neither the model nor
    the data module reads the other."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if not hasattr(dm, "use_latent_cache"):
            raise RuntimeError("latent_cache needs a FewShotDataModule (it lists the training images)")
        encoder = pl_module.latent_encoder()
        if trainer.local_rank == 0:
            dm.use_latent_cache(self.folder, **encoder, build_missing=True)
        trainer.strategy.barrier("fsseg_latent_cache")
        if trainer.local_rank != 0:
            dm.use_latent_cache(self.folder, **encoder, build_missing=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, writing a local checkpoint through a temporary file in its own folder,
    flushed, fsynced and renamed over the old one (`fsseg.files.atomic_writer`): a full disk or a kill during the
    write leaves the previous checkpoint as it was and no temporary file.

    (Lightning's own ``_atomic_save`` writes through an fsspec transaction: a temporary file in ``$TMPDIR``, then
    moved into place, which across filesystems is a copy that a full disk or a kill cuts short at the final path.)
    Remote paths (``s3://``...) are left to Lightning. ``fsseg fit|validate|test`` install it in place of the
    default `TorchCheckpointIO` (a checkpoint plugin given in a config is kept).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_writer(Path(path)) as f:
            torch.save(checkpoint, f)


class RunCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: the newest resumable state of a fit, rewritten every ``every_n_steps`` optimizer
    steps (in the middle of an epoch too), at the end of every epoch, at the end of fit, and when the process gets
    SIGTERM (a cluster's pre-emption). Resuming from it (``fsseg fit ... --ckpt_path .../checkpoints/last.ckpt``)
    continues exactly where it was written, mid-epoch included (`fsseg.data.samplers.ResumableLoader` restores the
    loader's position), so a crash costs at most ``every_n_steps`` steps and a SIGTERM none.

    SIGTERM: Lightning's handler flags it and its loop stops after the current batch (``SIGTERMException``). A
    checkpoint is only exact after a batch that completed an optimizer step, so a SIGTERM between accumulated
    batches holds the stop (Lightning's flag, ``trainer._signal_connector.received_sigterm``, is cleared) until
    the batch that steps, which is saved and then stopped after. Under DDP the ranks agree on the stop each batch.
    A SIGINT (Ctrl-C) stops in the middle of a step: nothing is saved then, the newest checkpoint stays.

    Args:
        every_n_steps: optimizer steps between two writes (0: only at epoch ends and at the end of fit).
    """

    def __init__(self, every_n_steps: int = 500) -> None:
        if every_n_steps < 0:
            raise ValueError(f"RunCheckpoint: every_n_steps must be >= 0, got {every_n_steps}")
        super().__init__(save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_steps = every_n_steps
        self._stepped_to = 0
        self._stop_held = False  # a SIGTERM waits for the end of the optimizer step
        self._at_step = True  # the last training batch completed an optimizer step (or none ran yet)
        self.stopped_at: int | None = None  # the step a SIGTERM stopped the fit after (saved there)

    @property
    def state_key(self) -> str:
        return f"RunCheckpoint{{'every_n_steps': {self.every_n_steps}}}"

    def _save(self, trainer) -> None:
        if not self._should_skip_saving_checkpoint(
            trainer
        ):  # not while sanity checking, not twice for one step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._stepped_to = trainer.global_step  # the step restored from a checkpoint, or 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped = (
            step != self._stepped_to
        )  # False: this batch only accumulated gradients, no state to resume from
        self._stepped_to, self._at_step = step, stepped
        if stepped and self.every_n_steps and step % self.every_n_steps == 0:
            self._save(trainer)
        stop = bool(trainer.received_sigterm) or self._stop_held
        if trainer.world_size > 1:  # every rank saves (a collective) and stops after the same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signals = trainer._signal_connector  # Lightning's loops stop after this batch when its flag is set
        if not stepped:
            self._stop_held, signals.received_sigterm = True, False
            return
        self._save(trainer)  # skipped when the cadence saved this step already
        self._stop_held, signals.received_sigterm = False, True
        self.stopped_at = step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A SIGTERM that stopped the fit outside a training batch (during validation): save the state of the last
        optimizer step, unless a batch was mid-accumulation."""
        if isinstance(exception, SIGTERMException) and self.stopped_at is None and not self._stop_held:
            if trainer.state.fn == TrainerFn.FITTING and self._at_step:
                self._save(trainer)
                self.stopped_at = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        pass  # no monitored metric: validation does not decide what is kept

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)


def foreground_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Foreground IoU in percent of one ``[h, w]`` prediction against a {0, 1, 255} target (nan when both empty)."""
    valid = target != 255
    p, t = (pred == 1) & valid, (target == 1) & valid
    union = int((p | t).sum())
    return 100.0 * int((p & t).sum()) / union if union else float("nan")


class EpisodePanels(Callback):
    """Log episode panels (support + mask, query, ground truth, prediction) to TensorBoard.

    Args:
        every_n_steps: training steps between panels (0 = never during training).
        n_episodes: episodes (rows) per panel, the first of the batch.
        cell: side in pixels of one image in the panel.
        on_validation: also draw the first batch of every validation run (tag ``val/episodes``).
    """

    def __init__(
        self, every_n_steps: int = 100, n_episodes: int = 2, cell: int = 128, on_validation: bool = True
    ) -> None:
        if every_n_steps < 0 or n_episodes < 1 or cell < 8:
            raise ValueError(
                f"EpisodePanels: every_n_steps >= 0, n_episodes >= 1 and cell >= 8 expected, got {every_n_steps}, {n_episodes}, {cell}"
            )
        self.every_n_steps, self.n_episodes, self.cell, self.on_validation = (
            every_n_steps,
            n_episodes,
            cell,
            on_validation,
        )
        self._last_step = -1
        self._warned = False

    def _writers(self, trainer) -> list:
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers and not self._warned:
            rank_zero_warn("EpisodePanels: the trainer has no TensorBoardLogger; no panels are logged")
            self._warned = True
        return writers

    @torch.no_grad()
    def panel(self, pl_module, batch: dict, gt_key: str) -> np.ndarray:
        """The first episodes of ``batch`` as one ``[H, W, 3]`` uint8 grid (prediction at ``batch[gt_key]``'s size)."""
        n = min(self.n_episodes, batch["query_img"].shape[0])
        sub = {k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        was_training = pl_module.training
        pl_module.eval()
        try:
            pred = pl_module.predict_masks(sub, tuple(sub[gt_key].shape[-2:])).cpu()  # [n, h, w]
        finally:
            pl_module.train(was_training)
        rows, labels = [], []
        for i in range(n):
            gt = sub[gt_key][i].cpu()
            rows.append(
                episode_row(
                    sub["support_imgs"][i],
                    sub["support_masks"][i],
                    sub["query_img"][i],
                    gt,
                    pred[i],
                    self.cell,
                )
            )
            labels.append(
                f"episode {int(sub['episode_idx'][i])}, class {int(sub['class_id'][i])}: IoU {foreground_iou(pred[i], gt):.1f}"
            )
        image = grid(rows, self.cell, column_titles(sub["support_imgs"].shape[1]), labels)
        return np.asarray(image)

    def _log(self, trainer, pl_module, batch, tag: str, gt_key: str) -> None:
        writers = self._writers(trainer)
        if not writers:
            return
        image = self.panel(pl_module, batch, gt_key)
        for w in writers:
            w.add_image(tag, image, trainer.global_step, dataformats="HWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = (
            trainer.global_step
        )  # optimiser steps done, so the first panel comes after every_n_steps of them
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step  # with gradient accumulation several batches share a step
        if trainer.is_global_zero:
            self._log(trainer, pl_module, batch, "train/episodes", "query_mask")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0
    ) -> None:
        if self.on_validation and batch_idx == 0 and not trainer.sanity_checking and trainer.is_global_zero:
            self._log(trainer, pl_module, batch, "val/episodes", "query_mask_eval")
