"""Few-shot segmentation methods: each a `FewShotModule` chosen in a config by `model.class_path`."""

from fsseg.models.base import FewShotModule

__all__ = ["FewShotModule"]
