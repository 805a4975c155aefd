"""Episodic few-shot datasets, the seeded evaluation protocol and the DataModule."""

from fsseg.data.base import FewShotDataset
from fsseg.data.coco import CocoFewShot
from fsseg.data.datamodule import FewShotDataModule
from fsseg.data.fss import FSS1000FewShot
from fsseg.data.pascal import PascalFewShot
from fsseg.data.protocol import Episode

__all__ = ["Episode", "FewShotDataset", "CocoFewShot", "PascalFewShot", "FSS1000FewShot", "FewShotDataModule"]
