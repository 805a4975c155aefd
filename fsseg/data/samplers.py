"""Samplers that make episodes independent of the number of workers and processes.

Both subclass `DistributedSampler` so Lightning leaves them in place under DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpisodeSampler(DistributedSampler):
    """Training: a seeded permutation per epoch, yielding ``epoch * n + i`` so the dataset's per-index generator
    differs every epoch. Each process takes every ``world``-th index (the tail is padded by wrapping)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:  # noqa: D107  (no super().__init__)
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, 0
        self.num_replicas, self.rank = _world()
        self.num_samples = -(-self.n // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._resume: tuple[int, int] | None = None  # (epoch, indices already consumed in it)

    def resume_from(self, epoch: int, consumed: int) -> None:
        """Make the next pass over ``epoch`` (only) start after its first ``consumed`` indices."""
        self._resume = (int(epoch), int(consumed))

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None:
            skip = self._resume[1] if self._resume[0] == self.epoch else 0
            self._resume = None
        return iter(list(self._indices())[skip:])

    def _indices(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.total_size - self.n]
        return iter(self.epoch * self.n + i for i in order[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class EvalDistributedSampler(DistributedSampler):
    """Evaluation: process ``r`` of ``w`` takes episodes ``r, r + w, ...``; no padding, so no episode counts twice."""

    def __init__(self, n: int) -> None:  # noqa: D107
        self.n = int(n)
        self.num_replicas, self.rank = _world()
        self.shuffle, self.epoch, self.seed = False, 0, 0
        self.num_samples = len(range(self.rank, self.n, self.num_replicas))
        self.total_size = self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A training DataLoader Lightning can resume mid-epoch (it saves and restores ``state_dict`` of such loaders).

    The state is the sampler's epoch and how many batches the trainer had processed in it, read from the trainer
    through ``processed_batches`` (the loader's own count would include Lightning's prefetched batch).
    """

    def __init__(self, *args, processed_batches: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpisodeSampler):
            raise TypeError("ResumableLoader needs an EpisodeSampler")
        self._processed_batches = processed_batches

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": int(self._processed_batches())}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume_from(state["epoch"], state["batches"] * self.batch_size)
