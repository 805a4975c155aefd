"""Training-episode augmentation (``data.train_augment``), applied alike to an episode's query and supports.

``none`` (default, and every paper recipe: DiffewS and DiffSeg train without augmentation) leaves the images as read.
``channel_permutation`` shuffles the RGB channels of the whole episode (query and every support) with one of the 6
permutations, drawn from the training-episode seed and the episode index. Support and query still agree, so the
episode keeps its answer, but a class can no longer be recognised by its absolute colour: a model fine-tuned on a
few base classes has to match its support instead of memorising what those classes look like. Evaluation episodes
are never augmented.

An augmented episode carries ``colour_variant`` (the permutation's index in `CHANNEL_PERMUTATIONS`, 0 = identity),
which is what DiffewS' latent cache looks its posteriors up by.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

TRAIN_AUGMENTS = ("none", "channel_permutation")
CHANNEL_PERMUTATIONS: tuple[tuple[int, int, int], ...] = tuple(
    itertools.permutations(range(3))
)  # [0] identity


def check(train_augment: str) -> str:
    if train_augment not in TRAIN_AUGMENTS:
        raise ValueError(f"data.train_augment: expected one of {TRAIN_AUGMENTS}, got {train_augment!r}")
    return train_augment


def variants(train_augment: str) -> range:
    """The colour variants an augmentation can give (what a latent cache must hold per image)."""
    return range(len(CHANNEL_PERMUTATIONS) if check(train_augment) == "channel_permutation" else 1)


def draw(train_augment: str, seed: int, index: int) -> int:
    """The colour variant of training episode ``index`` (deterministic in the seed and the index)."""
    n = len(variants(train_augment))
    return 0 if n == 1 else int(np.random.default_rng((int(seed), int(index), 0xC0)).integers(n))


def apply(images: torch.Tensor, variant: int) -> torch.Tensor:
    """``[..., 3, H, W]`` images with their channels permuted by variant ``variant`` (0: unchanged)."""
    if variant == 0:
        return images
    return images[..., list(CHANNEL_PERMUTATIONS[variant]), :, :]


def variant_name(variant: int) -> str:
    """``RGB`` for the identity, ``BRG`` for (2, 0, 1), ...: which input channel each output channel takes."""
    return "".join("RGB"[c] for c in CHANNEL_PERMUTATIONS[variant])
