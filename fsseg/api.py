"""Segmenting images from Python: ``fsseg.load`` then ``Segmenter.segment``.

    import fsseg

    seg = fsseg.load("runs/demo/demo_baseline/version_0")  # a run folder, a checkpoint, or a config
    masks = seg.segment(["a.jpg", "b.jpg"], supports="cat.jpg", support_masks="cat_mask.png")  # [H, W] bool each

Images are paths, PIL images, NumPy ``H x W x 3`` uint8 arrays or ``[3, H, W]`` float tensors in [0, 1]; support
masks are paths, PIL images, NumPy arrays or tensors ``[H, W]`` ({0, 1}, {0, 255}, bool, or a label map with
``mask_value``), read as ``fsseg predict-images`` reads mask files (`fsseg.user_inputs.read_mask_file`: RGBA masks from
their alpha). A single query gives a single mask, a list a list; each mask is at its query's own size. The support set
is encoded once per call; `Segmenter.encode_support` returns it for reuse over many calls. Errors are those of
``fsseg predict-images`` (which is a client of this module), naming the argument and the item.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsseg.data.base import IMAGE_RESIZES, image_to_tensor, load_rgb, resize_image_tensor
from fsseg.models.base import FewShotModule
from fsseg.runs import build_model
from fsseg.user_inputs import (
    mask_from_image,
    precision_context,
    read_mask_file,
    resolve_precision,
    support_foreground,
    support_mask_at_size,
)

#: how errors name the settings: the arguments of `load`; ``fsseg predict-images`` passes its flags instead
ARGUMENTS = {
    "img_size": "img_size",
    "mask_value": "mask_value",
    "threshold": "threshold",
    "precision": "precision",
}
CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class SupportSet:
    """An encoded support set (`Segmenter.encode_support`): the model's state for it, its number of shots."""

    state: object
    shots: int
    model: FewShotModule
    img_size: int


def _data_default(name: str):
    from fsseg.data.datamodule import FewShotDataModule

    return inspect.signature(FewShotDataModule).parameters[name].default


class Segmenter:
    """A method ready to segment queries against support sets at input side ``img_size`` on ``device`` in
    ``precision`` (None: the model's ``eval_precision``, else fp32; `fsseg.user_inputs.resolve_precision`)."""

    def __init__(
        self,
        model: FewShotModule,
        img_size: int,
        image_resize: str = "torch",
        device: str | torch.device = "cpu",
        precision: str | None = None,
        names: Mapping[str, str] | None = None,
        img_size_from: str | None = None,
    ) -> None:
        self.names = {**ARGUMENTS, **(names or {})}
        size_name = self.names["img_size"]
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"{size_name} must be a positive integer, got {img_size!r}")
        why = model.input_size_error(img_size)
        if why:
            raise ValueError(f"{img_size_from or size_name} {img_size}: {why}")
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"image_resize must be one of {IMAGE_RESIZES}, got {image_resize!r}")
        self.precision = resolve_precision(
            precision, getattr(model, "eval_precision", None), self.names["precision"]
        )
        self.device = torch.device(device)
        # checked now (a name, bf16 on this device), not at the first call
        precision_context(self.precision, self.device, self.names["precision"])
        self.model = model.to(self.device).eval()
        self.img_size, self.image_resize = img_size, image_resize

    def __repr__(self) -> str:
        return (
            f"Segmenter({type(self.model).__name__}, img_size={self.img_size}, image_resize={self.image_resize!r}, "
            f"device={str(self.device)!r}, precision={self.precision!r})"
        )

    # ---- inputs --------------------------------------------------------------------------------------------------
    def _image(self, x, what: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """An image -> the model input ``[3, S, S]`` in [0, 1] and its own size (H, W)."""
        if isinstance(x, (str, os.PathLike)):
            x = load_rgb(Path(x))  # errors name the file
        elif isinstance(x, np.ndarray):
            if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8:
                raise ValueError(
                    f"{what}: a NumPy image must be H x W x 3 uint8 (RGB), got shape {x.shape} of {x.dtype}"
                )
            x = Image.fromarray(x, "RGB")
        elif torch.is_tensor(x):
            if x.ndim != 3 or x.shape[0] != 3 or not x.is_floating_point():
                raise ValueError(
                    f"{what}: a tensor image must be [3, H, W] float in [0, 1], got {list(x.shape)} of {x.dtype}"
                )
            x = x.detach().to("cpu", torch.float32)
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise ValueError(
                    f"{what}: a tensor image must hold values in [0, 1], got {x.min().item():g} to {x.max().item():g}"
                )
            hw = (int(x.shape[1]), int(x.shape[2]))
            if self.image_resize == "torch":
                return resize_image_tensor(x, self.img_size), hw
            x = Image.fromarray(x.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")
        elif isinstance(x, Image.Image):
            x = x.convert("RGB")
        else:
            raise TypeError(
                f"{what}: expected a path, a PIL image, a NumPy H x W x 3 uint8 array or a [3, H, W] tensor, got "
                f"{type(x).__name__}"
            )
        return image_to_tensor(x, self.img_size, self.image_resize), (x.height, x.width)

    def _mask_label(self, m, what: str) -> np.ndarray:
        """A support mask -> its label map, uint8 ``[H, W]``."""
        if isinstance(m, Image.Image):
            return mask_from_image(m, what)
        if torch.is_tensor(m):
            m = m.detach().cpu().numpy()
        if not isinstance(m, np.ndarray):
            raise TypeError(
                f"{what}: expected a path, a PIL image, a NumPy array or a tensor, got {type(m).__name__}"
            )
        if (
            m.ndim == 3 and m.shape[2] in (3, 4) and m.dtype == np.uint8
        ):  # a colour mask, RGBA read from alpha
            return mask_from_image(Image.fromarray(m), what)
        if m.ndim != 2:
            raise ValueError(
                f"{what}: a mask array must be H x W (or H x W x 3/4 uint8), got shape {m.shape}"
            )
        if m.dtype == bool:
            return m.astype(np.uint8)
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)) or (
            m.size and (m.min() < 0 or m.max() > 255 or not np.array_equal(m, np.round(m)))
        ):
            raise ValueError(
                f"{what}: expected whole values in 0..255 (e.g. 0/1 or 0/255) or bool, got {m.dtype} values "
                f"from {m.min()} to {m.max()}"
            )
        return m.astype(np.uint8)

    def _supports(self, supports, masks, mask_value) -> tuple[torch.Tensor, torch.Tensor]:
        """Every support pair checked -> images ``[K, 3, S, S]``, masks ``[K, S, S]`` in {0, 1}."""
        supports, _ = _as_list(supports)
        masks, _ = _as_list(masks)
        if not supports:
            raise ValueError("give at least one support image and its mask")
        if len(supports) != len(masks):
            raise ValueError(
                f"{len(supports)} support images but {len(masks)} support masks; give one mask per image"
            )
        imgs, small = [], []
        for i, (image, mask) in enumerate(zip(supports, masks)):
            image_what = str(image) if isinstance(image, (str, os.PathLike)) else f"supports[{i}]"
            if isinstance(mask, (str, os.PathLike)):
                what, label = f"support mask {mask}", read_mask_file(Path(mask))  # errors name the file
            else:
                what = f"support_masks[{i}] ({_kind(mask)})"
                label = self._mask_label(mask, what)
            x, hw = self._image(image, image_what)
            fg = support_foreground(label, what, mask_value, self.names["mask_value"])
            small.append(
                support_mask_at_size(fg, hw, self.img_size, what, image_what, self.names["img_size"])
            )
            imgs.append(x)
        return torch.stack(imgs), torch.stack(small)  # [K, 3, S, S], [K, S, S]

    # ---- segmenting ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_support(self, supports, support_masks, mask_value: int | None = None) -> SupportSet:
        """One support set (an image and its mask, or lists of them), encoded once for `segment` to reuse."""
        s_imgs, s_masks = self._supports(supports, support_masks, mask_value)
        with precision_context(self.precision, self.device):
            state = self.model.encode_support(s_imgs.to(self.device), s_masks.to(self.device))
        return SupportSet(state, len(s_imgs), self.model, self.img_size)

    @torch.no_grad()
    def segment(
        self,
        queries,
        supports=None,
        support_masks=None,
        *,
        support: SupportSet | None = None,
        mask_value: int | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Foreground masks (bool ``[H, W]``, at each query's own size) of ``queries`` (one image or a list) against
        ``supports`` / ``support_masks`` (encoded once for this call) or an encoded ``support``. Every input is
        checked before the model runs."""
        if support is not None and (supports is not None or support_masks is not None):
            raise ValueError("give supports and support_masks, or support= (an encoded SupportSet), not both")
        if support is None and (supports is None or support_masks is None):
            raise ValueError("give supports and support_masks (or support=, from encode_support)")
        if support is not None and (support.model is not self.model or support.img_size != self.img_size):
            raise ValueError(
                "support= was encoded by another Segmenter; encode it with this one's encode_support"
            )
        items, single = _as_list(queries)
        if not items:
            raise ValueError("give at least one query image")
        inputs = [
            self._image(q, str(q) if isinstance(q, (str, os.PathLike)) else f"queries[{i}]")
            for i, q in enumerate(items)
        ]
        if support is None:
            support = self.encode_support(supports, support_masks, mask_value)
        masks = []
        for x, (h, w) in inputs:
            with precision_context(self.precision, self.device):
                pred = self.model.predict_with_support(support.state, x[None].to(self.device), (h, w))
            if tuple(pred.shape) != (1, h, w):
                raise RuntimeError(
                    f"{type(self.model).__name__}.predict_with_support returned {tuple(pred.shape)}, expected "
                    f"(1, {h}, {w})"
                )
            masks.append(pred[0].cpu().numpy() == 1)  # [H, W] bool
        return masks[0] if single else masks


def _as_list(x) -> tuple[list, bool]:
    """(the items, whether ``x`` was a single one): lists and tuples are several, anything else one."""
    if isinstance(x, (list, tuple)):
        return list(x), False
    return [x], True


def _kind(x) -> str:
    if isinstance(x, np.ndarray):
        return "a NumPy array"
    if torch.is_tensor(x):
        return "a tensor"
    if isinstance(x, Image.Image):
        return "a PIL image"
    return type(x).__name__


def resolve_source(source: str | os.PathLike) -> tuple[Path | None, str | Path | None]:
    """(checkpoint, config) that ``source`` names: a run folder (its ``checkpoints/last.ckpt``), a checkpoint
    file, or a config (a ``.yaml`` file or a config name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"run folder {path} has no checkpoints/last.ckpt; give a checkpoint file (ckpt=) or the run's folder"
            )
        return ckpt, None
    if path.suffix == ".ckpt" or (path.is_file() and path.suffix not in CONFIG_SUFFIXES):
        return path, None  # a missing checkpoint: `build_model` names it
    return None, source


def load(
    source: str | os.PathLike | None = None,
    *,
    config: str | os.PathLike | None = None,
    ckpt: str | os.PathLike | None = None,
    no_ckpt: bool = False,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    img_size: int | None = None,
    image_resize: str | None = None,
    threshold: float | None = None,
    overrides: Mapping | None = None,
    names: Mapping[str, str] | None = None,
) -> Segmenter:
    """A trained or training-free method, ready to segment (`Segmenter`).

    ``source``: a run folder (its ``checkpoints/last.ckpt``), a checkpoint (the run's ``config.yaml`` beside it),
    or a config (a file or a name such as ``demo_diffews``); or give ``ckpt=`` and/or ``config=`` (a checkpoint
    with another config of the same method). A config without a checkpoint builds a training-free method (no
    trainable weights); a method with trainable weights is refused unless ``no_ckpt=True`` asks for it as the
    config builds it (the pretrained weights it names, a trained part at its initialisation), as ``fsseg test
    --no_ckpt``. ``img_size`` / ``image_resize``: the input side and resize (default: the config's
    ``data.img_size`` / ``data.image_resize``); ``precision``: fp32 | bf16 | fp16 (default: the model's
    ``eval_precision``, else fp32); ``threshold``: the foreground threshold of a score-thresholding method;
    ``overrides``: model init arguments over the config's. ``names``: how errors name these settings (``fsseg
    predict-images`` gives its flags).
    """
    names = {**ARGUMENTS, **(names or {})}
    if source is not None:
        if config is not None or ckpt is not None:
            raise ValueError(f"give a source ({source}) or config= / ckpt=, not both")
        ckpt, config = resolve_source(source)
    if ckpt is not None and no_ckpt:
        raise ValueError(f"no_ckpt=True contradicts the checkpoint {ckpt}")
    if ckpt is None and config is None:
        raise ValueError("give a run folder, a checkpoint or a config")
    model, data = build_model(config, ckpt, threshold, overrides, threshold_option=names["threshold"])
    if ckpt is None and not no_ckpt:
        trainable = sum(p.numel() for p in model.trainable_parameters())
        if trainable:
            raise ValueError(
                f"config {config} builds {type(model).__name__}, which has {trainable:,} trainable weights, and no "
                f"checkpoint was given: give the checkpoint of a run (or its folder), or no_ckpt=True to segment "
                f"with the model as the config builds it"
            )
    size_from = names["img_size"] if img_size is not None else "the run's data.img_size"
    if img_size is None:
        img_size = int(data.get("img_size") or _data_default("img_size"))
    image_resize = image_resize or data.get("image_resize") or _data_default("image_resize")
    return Segmenter(model, img_size, image_resize, device, precision, names, img_size_from=size_from)


__all__ = ["Segmenter", "SupportSet", "load"]
