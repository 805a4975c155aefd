"""Lightning callbacks: `RunCheckpoint` (the resumable checkpoints of every ``fsseg fit``, installed by the CLI) and
`EpisodePanels` (what the model predicts, as image panels in TensorBoard).

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

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from fsseg.visual import column_titles, episode_row, grid


class RunCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: the newest resumable state of a fit, rewritten every ``every_n_steps`` optimizer
    steps (in the middle of an epoch too), at the end of every epoch and at the end of fit. Resuming from it
    (``fsseg fit ... --ckpt_path .../checkpoints/last.ckpt``) continues exactly where it was written, mid-epoch
    included (`fsseg.data.samplers.ResumableLoader` restores the loader's position), so an interruption costs at
    most ``every_n_steps`` steps.

    Args:
        every_n_steps: optimizer steps between two writes (0: only at epoch ends and at the end of fit).
    """

    def __init__(self, every_n_steps: int = 500) -> None:
        if every_n_steps < 0:
            raise ValueError(f"RunCheckpoint: every_n_steps must be >= 0, got {every_n_steps}")
        super().__init__(save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_steps = every_n_steps
        self._stepped_to = 0

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
        if step == self._stepped_to:  # this batch only accumulated gradients: not a state to resume from
            return
        self._stepped_to = step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

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
