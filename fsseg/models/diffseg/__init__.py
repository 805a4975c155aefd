"""DiffSeg (few-shot segmentation on a frozen Kandinsky 2.2 with PAM and SCM); see README.md here."""

from fsseg.models.diffseg.module import DiffSegModule

__all__ = ["DiffSegModule"]
