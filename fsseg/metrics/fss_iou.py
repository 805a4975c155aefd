"""Few-shot segmentation IoU exactly as the published tables compute it (docs/PROTOCOL.md §2).

Per class c of the fold, over all its episodes, accumulate pixel counts
``I_c = [bg inter, fg inter]`` and ``U_c = [bg union, fg union]`` (ignored pixels removed from
prediction and ground truth). Then ``mIoU = 100 * mean_c(I_c[fg] / max(U_c[fg], 1))`` and
``FB-IoU = 100 * mean over {bg, fg} of (sum_c I_c / sum_c U_c)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def episode_inter_union(
    pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode ``[bg, fg]`` intersection and union pixel counts.

    pred: ``[B, h, w]`` in {0, 1}; target: ``[B, h, w]`` in {0, 1, ignore_index}.
    Returns two int64 tensors ``[B, 2]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    valid = target != ignore_index  # [B, h, w]
    pred = pred.long()
    target = target.long()
    inters, unions = [], []
    for cls in (0, 1):
        p = (pred == cls) & valid
        t = (target == cls) & valid
        inters.append((p & t).flatten(1).sum(1))
        unions.append((p | t).flatten(1).sum(1))
    return torch.stack(inters, 1), torch.stack(unions, 1)  # [B, 2] each


class FewShotIoU(Metric):
    """mIoU, FB-IoU and per-class IoU (percent) over a fold's classes, DDP-safe (sum reduction).

    Args:
        class_ids: the fold's evaluation classes (the dataset's contiguous class indices). mIoU averages over all of
            them, as the benchmark code does.
        ignore_index: ground-truth value excluded from both prediction and target.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, class_ids: Sequence[int], ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        class_ids = [int(c) for c in class_ids]
        if not class_ids:
            raise ValueError("FewShotIoU needs at least one class id")
        if len(set(class_ids)) != len(class_ids):
            raise ValueError(f"FewShotIoU class_ids contain duplicates: {class_ids}")
        self.class_ids = class_ids
        self.ignore_index = ignore_index
        lookup = torch.full((max(class_ids) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(class_ids)] = torch.arange(len(class_ids))
        self.register_buffer("_lookup", lookup, persistent=False)
        n = len(class_ids)
        self.add_state("inter", default=torch.zeros(n, 2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", default=torch.zeros(n, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_id: torch.Tensor) -> None:
        class_id = torch.as_tensor(class_id, device=self._lookup.device).long().reshape(-1)
        if class_id.numel() != pred.shape[0]:
            raise ValueError(f"class_id has {class_id.numel()} entries for a batch of {pred.shape[0]}")
        bad = (class_id < 0) | (class_id >= self._lookup.numel())
        idx = torch.where(
            bad, torch.full_like(class_id, -1), self._lookup[class_id.clamp(0, self._lookup.numel() - 1)]
        )
        if (idx < 0).any():
            unknown = sorted(set(class_id[idx < 0].tolist()))
            raise ValueError(f"class ids {unknown} are not among this metric's classes {self.class_ids}")
        inter, union = episode_inter_union(pred, target, self.ignore_index)
        self.inter.index_add_(0, idx, inter)
        self.union.index_add_(0, idx, union)

    def compute(self) -> dict[str, torch.Tensor]:
        inter = self.inter.double()
        union = self.union.double()
        iou = inter / union.clamp(min=1)  # [C, 2]
        miou = iou[:, 1].mean() * 100
        fbiou = (inter.sum(0) / union.sum(0).clamp(min=1)).mean() * 100
        return {"miou": miou, "fbiou": fbiou, "per_class_iou": iou[:, 1] * 100}
