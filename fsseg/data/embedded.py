"""A small synthetic few-shot benchmark written in the real PASCAL-5i on-disk layout.

Every image holds objects of 2-4 different classes on a noisy, cluttered background, at independent random
positions, sizes and rotations. A class is an appearance (shape + colour + texture; any two classes differ in at
least two of the three), so which object is "the" foreground of a query is known only from its support.

Layout under ``root`` (what the PASCAL-5i reader expects, with ``splits_dir=root / "splits"``)::

    VOC2012/JPEGImages/<id>.jpg              RGB, JPEG quality 95
    VOC2012/SegmentationClassAug/<id>.png    mode "L": 0 background, 1..20 class, 255 ignore boundary (~2 px)
    splits/pascal5i/{trn,val}/fold{0..3}.txt one ``IMAGEID__CC`` per line (CC = 1-based class, 2 digits)
    embedded.json                            parameters, counts and class descriptions; written last

As in the real lists, ``{trn,val}/fold{f}.txt`` holds the (image, class) pairs of fold ``f``'s own classes
``5f+1..5f+5`` (from the train resp. val images); training on fold ``f`` reads the trn lists of the other folds.
val lists are sorted by line, trn lists by class then image, like the shipped ones. Train images are
``2000_NNNNNN``, val images ``2001_NNNNNN``.

Generation is deterministic: image ``i`` of split ``s`` draws from ``np.random.default_rng([seed, s, i])``.
The dataset is written to a temporary sibling directory and renamed into place, so a crash never leaves a
half-written ``root``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fsseg.files import cache_root

GENERATOR_VERSION = 1
MARKER_NAME = "embedded.json"
N_CLASSES = 20
N_FOLDS = 4

_COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "magenta": (205, 45, 195),
    "cyan": (35, 200, 215),
    "orange": (245, 130, 20),
    "white": (240, 240, 240),
}

# (colour, texture, shape) of classes 1..20 (PASCAL-5i numbering: fold f tests classes 5f+1..5f+5).
# Colour+texture pairs are unique, and classes sharing a texture or a colour differ in shape.
_CLASSES = (
    ("red", "striped", "disc"),
    ("green", "plain", "square"),
    ("blue", "dotted", "triangle"),
    ("yellow", "checkered", "ring"),
    ("magenta", "striped", "cross"),
    ("cyan", "plain", "star"),
    ("orange", "dotted", "disc"),
    ("white", "checkered", "square"),
    ("red", "plain", "triangle"),
    ("green", "striped", "ring"),
    ("blue", "checkered", "cross"),
    ("yellow", "dotted", "star"),
    ("magenta", "plain", "disc"),
    ("cyan", "striped", "square"),
    ("orange", "checkered", "triangle"),
    ("white", "dotted", "ring"),
    ("red", "checkered", "star"),
    ("green", "dotted", "cross"),
    ("blue", "plain", "ring"),
    ("yellow", "striped", "triangle"),
)
EMBEDDED_CLASS_NAMES: tuple[str, ...] = tuple(f"{c}-{t}-{s}" for c, t, s in _CLASSES)

_SPLITS = ("trn", "val")
_ID_PREFIX = {"trn": "2000", "val": "2001"}
_SUPERSAMPLE = 4  # object masks are drawn at 4x and box-filtered: anti-aliased edges in the image
_MIN_VISIBLE = 0.5  # each object keeps at least half of its area visible (not occluded, inside the frame)


def fold_classes(fold: int) -> list[int]:
    """The 1-based classes that fold ``fold`` tests (PASCAL-5i: ``5f+1..5f+5``)."""
    if fold not in range(N_FOLDS):
        raise ValueError(f"fold must be one of 0..{N_FOLDS - 1}, got {fold!r}")
    return list(range(5 * fold + 1, 5 * fold + 6))


# ---- drawing -----------------------------------------------------------------------------------------------
def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices [V, 2] of a shape of radius ~1 centred at the origin (disc and ring are drawn as ellipses)."""
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        a = np.deg2rad([90, 210, 330])
        return np.stack([np.cos(a), np.sin(a)], 1) * 1.05
    if shape == "cross":
        w = 0.34
        return np.array(
            [
                [-w, -1],
                [w, -1],
                [w, -w],
                [1, -w],
                [1, w],
                [w, w],
                [w, 1],
                [-w, 1],
                [-w, w],
                [-1, w],
                [-1, -w],
                [-w, -w],
            ]
        )
    if shape == "star":
        a = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    raise ValueError(f"unknown shape {shape!r}")


def _object_alpha(shape: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of one object, float32 [S, S]."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * _SUPERSAMPLE, cy * _SUPERSAMPLE, radius * _SUPERSAMPLE
    if shape in ("disc", "ring"):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        if shape == "ring":
            q = 0.55 * r
            draw.ellipse([x - q, y - q, x + q, y + q], fill=0)
    else:
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = _unit_polygon(shape) @ rot.T * r + np.array([x, y])  # [V, 2]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture(texture: str, cx: float, cy: float, angle: float, size: int) -> np.ndarray:
    """Boolean [S, S]: True where the object shows its main colour (else its dark second colour)."""
    period = max(4.0, 0.07 * size)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)  # object-aligned coordinates
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    if texture == "plain":
        return np.ones((size, size), dtype=bool)
    if texture == "striped":
        return np.floor(u / (period / 2)) % 2 == 0
    if texture == "checkered":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0
    if texture == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return du * du + dv * dv > (0.3 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted low-frequency colour field with faint clutter lines, float32 [S, S, 3] in 0..255."""
    grid = rng.uniform(50, 200, size=(4, 4, 3))
    grey = grid.mean(-1, keepdims=True)
    grid = grey + 0.35 * (grid - grey)  # low saturation, so objects differ from the background by colour
    field = Image.fromarray(grid.astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(3, 8))):
        pts = rng.uniform(0, size, size=4).tolist()
        shade = int(rng.integers(60, 190))
        tint = rng.integers(-15, 16, size=3)
        draw.line(
            pts,
            fill=tuple(int(np.clip(shade + t, 0, 255)) for t in tint),
            width=int(rng.integers(1, max(2, size // 40) + 1)),
        )
    return np.asarray(field, dtype=np.float32)


def _ignore_boundary(label: np.ndarray) -> np.ndarray:
    """Boolean [S, S]: pixels with a differently labelled 4-neighbour (a 2 px band on every contour, one pixel
    each side, so no two differently labelled pixels that remain touch, not even diagonally)."""
    padded = np.pad(label, 1, mode="edge")
    h, w = label.shape
    edge = np.zeros(label.shape, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy : dy + h, dx : dx + w] != label
    return edge


def render_image(rng: np.random.Generator, classes: list[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image with one object per 1-based class in ``classes`` (drawn in that order; later ones occlude).

    Returns the RGB image uint8 [S, S, 3] and the mask uint8 [S, S] (0 bg, class, 255 ignore boundary).
    Positions are redrawn until every object keeps at least half its area visible.
    """
    min_pixels = max(12, int(0.004 * size * size))
    for _ in range(200):
        image = _background(rng, size)  # [S, S, 3]
        label = np.zeros((size, size), dtype=np.uint8)
        areas = []
        for cls in classes:
            colour, texture, shape = _CLASSES[cls - 1]
            radius = rng.uniform(0.10, 0.20) * size  # object extent 20-40% of the image side
            cx, cy = rng.uniform(0.7 * radius, size - 0.7 * radius, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            alpha = _object_alpha(shape, cx, cy, radius, angle, size)  # [S, S]
            main = np.array(_COLOURS[colour], np.float32) * rng.uniform(0.85, 1.08) + rng.normal(0, 6, 3)
            second = main * 0.3
            rgb = np.where(_texture(texture, cx, cy, angle, size)[..., None], main, second)  # [S, S, 3]
            image = image * (1 - alpha[..., None]) + rgb * alpha[..., None]
            inside = alpha >= 0.5
            label[inside] = cls
            areas.append(max(int(inside.sum()), 1))  # the object's own area before later occlusion
        image += rng.normal(0, 8, size=image.shape)
        mask = np.where(_ignore_boundary(label), np.uint8(255), label)
        visible = [(label == c).sum() / a for c, a in zip(classes, areas)]
        interior = [(mask == c).sum() for c in classes]
        if min(visible) >= _MIN_VISIBLE and min(interior) >= min_pixels:
            return np.clip(image, 0, 255).round().astype(np.uint8), mask
    raise RuntimeError(f"could not place classes {classes} on a {size}x{size} image without heavy occlusion")


def _image_classes(rng: np.random.Generator, index: int) -> list[int]:
    """2-4 distinct 1-based classes; class ``index % 20 + 1`` is always among them, so classes stay balanced."""
    first = index % N_CLASSES + 1
    others = [c for c in range(1, N_CLASSES + 1) if c != first]
    k = int(rng.integers(2, 5))
    chosen = [first, *(int(c) for c in rng.choice(others, size=k - 1, replace=False))]
    return [chosen[i] for i in rng.permutation(k)]


# ---- writing ------------------------------------------------------------------------------------------------
def _write_split(tmp: Path, split: int, name: str, n: int, seed: int, size: int) -> dict[int, list[str]]:
    """Write the images/masks of one split; returns class -> sorted image ids that contain it."""
    jpg_dir, png_dir = tmp / "VOC2012" / "JPEGImages", tmp / "VOC2012" / "SegmentationClassAug"
    by_class: dict[int, list[str]] = {c: [] for c in range(1, N_CLASSES + 1)}
    for i in range(n):
        rng = np.random.default_rng([seed, split, i])
        image_id = f"{_ID_PREFIX[name]}_{i:06d}"
        image, mask = render_image(rng, _image_classes(rng, i), size)
        Image.fromarray(image, "RGB").save(jpg_dir / f"{image_id}.jpg", quality=95)
        Image.fromarray(mask, "L").save(png_dir / f"{image_id}.png")
        for cls in np.unique(mask):
            if 0 < cls <= N_CLASSES:
                by_class[int(cls)].append(image_id)
    return by_class


def _write_lists(tmp: Path, by_split: dict[str, dict[int, list[str]]]) -> dict[str, int]:
    counts = {}
    for name, by_class in by_split.items():
        out = tmp / "splits" / "pascal5i" / name
        out.mkdir(parents=True)
        for fold in range(N_FOLDS):
            lines = [f"{img}__{cls:02d}" for cls in fold_classes(fold) for img in by_class[cls]]
            if name == "val":
                lines.sort()  # the shipped val lists are sorted by line, trn lists by class then image
            (out / f"fold{fold}.txt").write_text("".join(line + "\n" for line in lines))
            counts[f"{name}/fold{fold}"] = len(lines)
    return counts


def _params(seed: int, image_size: int, n_train: int, n_val: int) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_val": n_val,
    }


def generate_embedded_benchmark(
    root: Path, seed: int = 0, image_size: int = 128, n_train: int = 600, n_val: int = 300
) -> Path:
    """Generate the benchmark into ``root`` (which must not exist or be an empty directory); returns ``root``."""
    root = Path(root)
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    for key, n in (("n_train", n_train), ("n_val", n_val)):
        if n < 2 * N_CLASSES:
            raise ValueError(f"{key} must be >= {2 * N_CLASSES} (two images per class), got {n}")
    if root.exists():
        if not root.is_dir() or any(root.iterdir()):
            raise FileExistsError(
                f"embedded benchmark root {root} already exists and is not an empty directory"
            )
        root.rmdir()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "VOC2012" / "JPEGImages").mkdir(parents=True)
        (tmp / "VOC2012" / "SegmentationClassAug").mkdir(parents=True)
        sizes = {"trn": n_train, "val": n_val}
        by_split = {
            name: _write_split(tmp, s, name, sizes[name], seed, image_size) for s, name in enumerate(_SPLITS)
        }
        pairs = _write_lists(tmp, by_split)
        marker = {
            "generator": "fsseg.data.embedded",
            **_params(seed, image_size, n_train, n_val),
            "layout": "pascal5i",
            "splits_dir": "splits",
            "image_ids": {
                name: f"{_ID_PREFIX[name]}_000000..{_ID_PREFIX[name]}_{sizes[name] - 1:06d}"
                for name in _SPLITS
            },
            "counts": {
                "images": sizes,
                "pairs": pairs,
                "images_per_class": {
                    name: [len(by_split[name][c]) for c in range(1, N_CLASSES + 1)] for name in _SPLITS
                },
            },
            "classes": [
                {
                    "class": i + 1,
                    "name": EMBEDDED_CLASS_NAMES[i],
                    "colour": c,
                    "texture": t,
                    "shape": s,
                    "fold": i // 5,
                }
                for i, (c, t, s) in enumerate(_CLASSES)
            ],
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def default_embedded_root(seed: int = 0, image_size: int = 128, n_train: int = 600, n_val: int = 300) -> Path:
    """``$FSSEG_CACHE/embedded-v1-seed{seed}`` (or under ``~/.cache/fsseg``); non-default sizes get a suffix."""
    cache = cache_root()
    name = f"embedded-v{GENERATOR_VERSION}-seed{seed}"
    if (image_size, n_train, n_val) != (128, 600, 300):
        name += f"-s{image_size}-n{n_train}-{n_val}"
    return cache / name


def _marker_mismatch(root: Path, wanted: dict) -> list[str]:
    """Keys of ``wanted`` that differ from the marker in ``root`` (empty when they all match)."""
    marker_path = root / MARKER_NAME
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"embedded benchmark marker {marker_path} is unreadable: {err}") from err
    return [
        f"{k}: marker has {marker.get(k)!r}, wanted {v!r}" for k, v in wanted.items() if marker.get(k) != v
    ]


def ensure_embedded_benchmark(
    root: Path | None = None, seed: int = 0, *, image_size: int = 128, n_train: int = 600, n_val: int = 300
) -> Path:
    """Return the benchmark root, generating it first unless a matching ``embedded.json`` marker is there.

    Safe when several processes call it at once (each generates privately; the first rename wins).
    """
    root = Path(root) if root is not None else default_embedded_root(seed, image_size, n_train, n_val)
    wanted = _params(seed, image_size, n_train, n_val)

    def check() -> Path:
        wrong = _marker_mismatch(root, wanted)
        if wrong:
            raise ValueError(
                f"embedded benchmark at {root} was generated with other parameters ({'; '.join(wrong)});"
                " pass another root or delete that directory"
            )
        return root

    if (root / MARKER_NAME).is_file():
        return check()
    try:
        return generate_embedded_benchmark(root, seed, image_size, n_train, n_val)
    except OSError:
        if (root / MARKER_NAME).is_file():  # another process finished first
            return check()
        raise


def render_corpus(
    classes: list[int], n: int, image_size: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` extra images drawn like the benchmark's, with objects of ``classes`` (1-based) only.

    The pretraining corpus of the tiny shipped models: they learn what images of the *training* classes look like
    (as Stable Diffusion / Kandinsky learned from web images) without ever seeing a held-out class. Image ``i``
    draws from ``np.random.default_rng([seed, 2, i])`` (streams 0 and 1 are the benchmark's train/val splits).
    Returns RGB uint8 ``[n, S, S, 3]`` and label maps uint8 ``[n, S, S]`` (0 background, class, 255 boundary).
    """
    classes = sorted({int(c) for c in classes})
    if len(classes) < 2 or not set(classes) <= set(range(1, N_CLASSES + 1)):
        raise ValueError(f"classes must hold at least two of 1..{N_CLASSES}, got {classes}")
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.empty((n, image_size, image_size), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        k = int(rng.integers(2, min(4, len(classes)) + 1))
        chosen = [classes[j] for j in rng.choice(len(classes), size=k, replace=False)]
        images[i], labels[i] = render_image(rng, chosen, image_size)
    return images, labels
