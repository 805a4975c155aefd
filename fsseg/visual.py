"""Pictures of few-shot results, composed with PIL: mask overlays and labelled grids of panels.

Shared by ``fsseg predict-images`` (overlay PNGs), the TensorBoard panel callback, ``fsseg report``'s gallery and
``tools/qualitative_figure.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

MASK_COLOR = (255, 48, 48)  # prediction / support mask
GT_COLOR = (48, 200, 80)  # ground truth
IGNORE_COLOR = (128, 128, 128)
PAD = 4
TITLE_H = 16


def to_pil(img: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """``[3, H, W]`` float in [0, 1], ``[H, W, 3]`` uint8, or a PIL image -> RGB PIL image."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, torch.Tensor):
        img = (
            (img.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        )  # [H, W, 3]
    return Image.fromarray(np.asarray(img, dtype=np.uint8), "RGB")


def _mask_array(mask, size: tuple[int, int]) -> np.ndarray:
    """A mask (tensor or array, values {0, 1, 255}) as uint8 ``[H, W]`` at PIL ``size`` (w, h), nearest."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m.astype(np.uint8)
    if (m.shape[1], m.shape[0]) != size:
        m = np.array(Image.fromarray(m).resize(size, Image.NEAREST))
    return m


def overlay(
    img, mask, color: tuple[int, int, int] = MASK_COLOR, alpha: float = 0.5, size: int | None = None
) -> Image.Image:
    """The image with the mask's foreground (value 1) tinted and outlined, ignore pixels (255) greyed.

    ``size``: draw at ``size x size`` (the image resized bilinearly first, so the outline stays crisp); otherwise at
    the image's size. The outline is 1 px wide below 256 px (3 px at ``size``), wider on larger images. The mask is
    resized (nearest) to the drawing.
    """
    base = to_pil(img)
    if size is not None:
        base = base.resize((size, size), Image.BILINEAR)
    m = _mask_array(mask, base.size)
    fg = Image.fromarray(((m == 1) * 255).astype(np.uint8), "L")
    out = Image.composite(Image.new("RGB", base.size, color), base, fg.point(lambda v: int(v * alpha)))
    ignore = Image.fromarray(((m == 255) * 255).astype(np.uint8), "L")
    out = Image.composite(
        Image.new("RGB", base.size, IGNORE_COLOR), out, ignore.point(lambda v: int(v * 0.5))
    )
    edge = fg.filter(ImageFilter.FIND_EDGES)  # the outline: foreground pixels next to background
    width = max(3 if size is not None else 1, 2 * (min(base.size) // 256) + 1)  # thicker on large images
    if width > 1:
        edge = edge.filter(ImageFilter.MaxFilter(width))
    return Image.composite(Image.new("RGB", base.size, color), out, edge.point(lambda v: 255 if v else 0))


def grid(
    rows: list[list[Image.Image]], cell: int, titles: list[str] | None = None, labels: list[str] | None = None
) -> Image.Image:
    """Panels in a grid of ``cell x cell`` squares on white, with optional column titles and per-row labels.

    Size: ``width = n_cols * cell + (n_cols + 1) * PAD``; ``height = [TITLE_H] + n_rows * (cell + [TITLE_H]) +
    (n_rows + 1) * PAD`` (the bracketed terms only with titles / labels). Rows may be shorter than the widest.
    """
    n_cols = max(len(r) for r in rows)
    head = TITLE_H if titles else 0
    row_h = cell + (TITLE_H if labels else 0)
    width = n_cols * cell + (n_cols + 1) * PAD
    height = head + len(rows) * row_h + (len(rows) + 1) * PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles or []):
        draw.text((PAD + c * (cell + PAD) + 2, 2), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = head + PAD + r * (row_h + PAD)
        if labels:
            draw.text((PAD + 2, y + 2), labels[r], fill=(0, 0, 0))
            y += TITLE_H
        for c, im in enumerate(row):
            canvas.paste(im.convert("RGB").resize((cell, cell), Image.BILINEAR), (PAD + c * (cell + PAD), y))
    return canvas


def episode_row(
    support_imgs, support_masks, query_img, query_gt, pred, size: int | None = None
) -> list[Image.Image]:
    """One row of the papers' figures: supports with their masks, the query, its ground truth, the prediction.

    ``support_imgs [K, 3, S, S]``, ``support_masks [K, S, S]``, ``query_img [3, S, S]``, ``query_gt [h, w]``
    ({0, 1, 255}; None leaves the cell out), ``pred [h, w]`` ({0, 1}); ``size``: draw each at ``size x size``.
    """
    row = [overlay(img, m, size=size) for img, m in zip(support_imgs, support_masks)]
    query = to_pil(query_img)
    row.append(query.resize((size, size), Image.BILINEAR) if size is not None else query)
    if query_gt is not None:
        row.append(overlay(query_img, query_gt, GT_COLOR, size=size))
    row.append(overlay(query_img, pred, size=size))
    return row


def column_titles(shots: int, with_gt: bool = True) -> list[str]:
    names = [f"support {i + 1}" if shots > 1 else "support" for i in range(shots)] + ["query"]
    return names + (["ground truth"] if with_gt else []) + ["prediction"]
