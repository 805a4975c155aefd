"""The gallery's pictures: one episode's panels (support(s) with their masks, the query with its ground truth, each
run's stored prediction), rendered from the run's data and stored predictions with `fsseg.visual` (no model)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from fsseg.episodes import RunEpisodes
from fsseg.predictions import FIELD, decode_mask
from fsseg.visual import GT_COLOR, MASK_COLOR, overlay

PLACEHOLDER = (224, 224, 224)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def placeholder(text: str, size: int) -> Image.Image:
    """A grey square saying what is missing (a run that kept no prediction)."""
    img = Image.new("RGB", (size, size), PLACEHOLDER)
    ImageDraw.Draw(img).text((8, size // 2 - 6), text, fill=(60, 60, 60))
    return img


def episode_panels(runs: list[RunEpisodes], records: list[dict], labels: list[str], size: int) -> list[dict]:
    """Panels of one episode as ``{"title", "image" (PIL)}``: the supports of the first run (and of any other run
    whose supports differ, e.g. a support-control run), the query with its ground truth, then each run's prediction
    (``records[k]`` is run ``k``'s record of the episode)."""
    item = runs[0].item(records[0])
    differ = len({tuple(r["supports"]) for r in records}) > 1  # a support-control run against its normal run
    panels = []
    for k, (run, r, label) in enumerate(zip(runs, records, labels)):
        if any(x["supports"] == r["supports"] for x in records[:k]):
            continue
        it = item if k == 0 else run.item(r)
        for s, (img, mask) in enumerate(zip(it["support_imgs"], it["support_masks"])):
            title = (f"support {s + 1}" if len(r["supports"]) > 1 else "support") + (
                f" ({label})" if differ else ""
            )
            panels.append({"title": title, "image": overlay(img, mask, MASK_COLOR, size=size)})
    gt = item["query_mask_eval"]
    panels.append(
        {"title": "query + ground truth", "image": overlay(item["query_img"], gt, GT_COLOR, size=size)}
    )
    for r, label in zip(records, labels):
        if FIELD in r:
            pred = decode_mask(r[FIELD])
            image = overlay(item["query_img"], pred.astype("uint8"), MASK_COLOR, size=size)
        else:
            image = placeholder("prediction not stored", size)
        panels.append({"title": f"prediction {label}", "image": image})
    return panels
