"""`ImageCache`: per-image results of a frozen network (a VAE posterior, a UNet block's features) kept for the
images an evaluation sees again: test episodes reuse images (a support in many episodes, a query as another
episode's support, the same images under every seed), and a frozen encoder gives an image the same result each
time. Keyed by the image's bytes (dtype, shape, values), so no name or dataset is needed; the least recently used
entries are dropped past ``max_mb``; 0 keeps nothing (every call computes).

A batch's new images are computed together, in the order they first appear: a result can differ from the one a
batch of other composition would give by float rounding (convolution kernels depend on the batch), never more.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


class ImageCache:
    def __init__(self, max_mb: int, name: str = "max_mb") -> None:
        if max_mb < 0:
            raise ValueError(f"{name} must be >= 0, got {max_mb}")
        self.max_bytes = int(max_mb) << 20
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # image key -> its result
        self.held = 0  # bytes of the entries
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        return hashlib.sha1(
            str((image.dtype, tuple(image.shape))).encode() + image.cpu().numpy().tobytes()
        ).digest()

    def __call__(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(images)`` (``[N, ...]`` -> ``[N, ...]``), with the results of images seen recently taken from
        the cache and each new image computed once."""
        if self.max_bytes == 0:
            self.misses += len(images)
            return compute(images)
        keys = [self.key(x) for x in images]
        new = list(dict.fromkeys(k for k in keys if k not in self.entries))
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        if new:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            results = compute(images[[first[k] for k in new]])
            self.entries.update(zip(new, results))
            self.held += sum(t.nelement() * t.element_size() for t in results)
        out = torch.stack([self.entries[k] for k in keys])
        for k in keys:
            self.entries.move_to_end(k)
        while self.entries and self.held > self.max_bytes:
            t = self.entries.popitem(last=False)[1]
            self.held -= t.nelement() * t.element_size()
        return out
