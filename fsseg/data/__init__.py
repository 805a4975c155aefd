"""Episodic few-shot datasets, the seeded evaluation protocol and the DataModule.

Imports are lazy so that light tools (the embedded generator, the COCO mask and LVIS list builders) start without
torch/lightning. Benchmarks are found by name through `fsseg.data.registry`.
"""

from importlib import import_module

_EXPORTS = {
    "Episode": "fsseg.data.protocol",
    "FewShotDataset": "fsseg.data.base",
    "CocoFewShot": "fsseg.data.coco",
    "Coco402020FewShot": "fsseg.data.coco",
    "PascalFewShot": "fsseg.data.pascal",
    "EmbeddedFewShot": "fsseg.data.pascal",
    "FSS1000FewShot": "fsseg.data.fss",
    "LVIS92iDataset": "fsseg.data.lvis",
    "ADE20KFewShot": "fsseg.data.ade",
    "FewShotDataModule": "fsseg.data.datamodule",
    "benchmark_class": "fsseg.data.registry",
    "benchmark_classes": "fsseg.data.registry",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fsseg.data' has no attribute {name!r}")
