"""`LiveMemory`: the bytes of every live tensor storage, and their peak, for the operations run under it.

A `TorchDispatchMode`: every operation's outputs are looked at (autograd's backward operations too, which run
under the same mode), each new storage is counted once (views share their base's storage) with the category it was
created in, and uncounted when Python frees it (a weak reference's callback). It works the same on fake tensors
(`torch._subclasses.fake_tensor.FakeTensorMode`: nothing is allocated, storages still live and die) and on real
ones. Tensors made before it starts (parameters, buffers, the batch) are counted with `track`.

``granularity`` rounds each storage up as an allocator does: 512 bytes for PyTorch's CUDA caching allocator
(``kMinBlockSize``), 1 to count exact bytes.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("parameters", "buffers", "inputs", "gradients", "optimizer", "activations")
CUDA_GRANULARITY = 512  # c10/cuda/CUDACachingAllocator.cpp kMinBlockSize: every block is a multiple of it


class _Record:
    __slots__ = ("nbytes", "category")

    def __init__(self, nbytes: int, category: str) -> None:
        self.nbytes, self.category = nbytes, category


class LiveMemory(TorchDispatchMode):
    """Live storage bytes by category; ``peak`` and ``at_peak`` (the categories then), ``peak_phase``."""

    def __init__(self, granularity: int = 1) -> None:
        super().__init__()
        self.granularity = granularity
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = self.peak = 0
        self.at_peak = dict(self.current)
        self.phase = "setup"  # set by the caller: the step's part now running (named at the peak)
        self.peak_phase = self.phase
        self.category = "activations"  # what new storages are counted as (the optimizer step: "optimizer")
        self._records: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}

    # ---- counting ----------------------------------------------------------------------------------------------
    def _size(self, nbytes: int) -> int:
        g = self.granularity
        return 0 if nbytes == 0 else -(-nbytes // g) * g

    def _add(self, storage, category: str) -> None:
        rec = _Record(self._size(storage.nbytes()), category)
        self._records[storage] = rec
        key = id(rec)

        def freed(_ref, rec=rec, key=key) -> None:
            self._refs.pop(key, None)
            self.current[rec.category] -= rec.nbytes
            self.total -= rec.nbytes

        self._refs[key] = weakref.ref(storage, freed)
        self.current[category] += rec.nbytes
        self.total += rec.nbytes

    def _see(self, t: torch.Tensor, category: str, relabel: bool) -> None:
        storage = t.untyped_storage()
        rec = self._records.get(storage)
        if rec is None:
            self._add(storage, category)
            return
        size = self._size(storage.nbytes())
        if size != rec.nbytes:  # resized in place (an ``out=`` operation, ``resize_``)
            self.current[rec.category] += size - rec.nbytes
            self.total += size - rec.nbytes
            rec.nbytes = size
        if relabel and rec.category != category:
            self.current[rec.category] -= rec.nbytes
            self.current[category] += rec.nbytes
            rec.category = category

    def _update_peak(self) -> None:
        if self.total > self.peak:
            self.peak, self.at_peak, self.peak_phase = self.total, dict(self.current), self.phase

    def track(self, tensors, category: str) -> None:
        """Count tensors made outside the mode (a tensor, a module's parameters or buffers, or any nesting of
        lists / dicts of tensors) as ``category``; a storage already counted takes that category."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._see(t, category, relabel=True)
        self._update_peak()

    def reset_peak(self) -> None:
        self.peak, self.at_peak, self.peak_phase = self.total, dict(self.current), self.phase

    # ---- the mode --------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, self.category, relabel=False)
        self._update_peak()
        return out
