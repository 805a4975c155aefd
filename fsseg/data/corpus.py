"""The pretraining corpus of the tiny stand-ins (``tools/train_tiny_diffews.py``, ``tools/train_tiny_diffseg.py``):
images drawn like the embedded benchmark's, holding only the training classes of one fold, as tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsseg.data.embedded import N_CLASSES, fold_classes, render_corpus


def training_classes(fold: int) -> list[int]:
    """The 1-based classes outside ``fold``'s test classes."""
    held_out = set(fold_classes(fold))
    return [c for c in range(1, N_CLASSES + 1) if c not in held_out]


def corpus_tensors(classes: list[int], n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``render_corpus`` at 128 px, resized to ``size`` (images: area, labels: nearest): images
    [N, 3, S, S] in [0, 1] and uint8 label maps [N, S, S]."""
    images, labels = render_corpus(classes, n, 128, seed=seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    if size != 128:
        x = F.interpolate(x, size=(size, size), mode="area")
        y = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(torch.uint8)
    return x, y


def random_object_masks(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each label map one present class, as a {0, 1} float mask [N, S, S] (ignore -> 0; none present -> 0)."""
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for i, lab in enumerate(labels):
        classes = [c for c in lab.unique().tolist() if c not in (0, 255)]
        if classes:
            out[i] = (lab == classes[int(torch.randint(len(classes), (1,), generator=gen))]).float()
    return out
