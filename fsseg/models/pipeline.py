"""`Pipeline`: a method's model as a plain ``nn.Module``, usable without Lightning ("encode the support once, segment
many queries"), and `FrozenParts`, the frozen-pretrained-parts convention it shares with `FewShotModule`.

A pipeline takes tensors in the episode contract's forms (`fsseg.episode`: images ``[., 3, S, S]`` in [0, 1], masks
``[., S, S]`` in {0, 1, 255}) and returns binary masks; its support state is a typed dataclass of its own. The
method's LightningModule holds it as ``self.pipeline`` and adds only the training hooks and lifecycle.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn


class FrozenParts(nn.Module):
    """Sub-modules named in `frozen_modules` are pretrained and frozen: assigning one turns its gradients off and
    puts it in eval mode, ``.train()`` keeps it there, and checkpoints leave it out (it is loaded from its own
    files; see `frozen_key`)."""

    frozen_modules: ClassVar[tuple[str, ...]] = ()

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

    def frozen_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to a frozen part."""
        return any(key == m or key.startswith(m + ".") for m in self.frozen_modules)


class Pipeline(FrozenParts):
    """A method's model: `encode_support` once, then `segment` any number of queries against it; `segment_episodes`
    serves a batch of episodes, each with its own support (default: the two in turn)."""

    @abstractmethod
    def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor):
        """``[B_s, K, 3, S, S]`` in [0, 1], ``[B_s, K, S, S]`` in {0, 1, 255} -> the method's support state
        (``B_s = 1``: one support set shared by every query; else one per episode)."""

    @abstractmethod
    def segment(self, support, query_imgs: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Binary masks ``[B, *out_size]`` (int64, {0, 1}) of ``query_imgs [B, 3, S, S]`` against ``support``."""

    def segment_episodes(
        self,
        query_imgs: torch.Tensor,
        support_imgs: torch.Tensor,
        support_masks: torch.Tensor,
        out_size: tuple[int, int],
    ) -> torch.Tensor:
        """Binary masks ``[B, *out_size]`` of a batch of episodes (``[B, ...]`` queries, ``[B, K, ...]`` supports)."""
        return self.segment(self.encode_support(support_imgs, support_masks), query_imgs, out_size)
