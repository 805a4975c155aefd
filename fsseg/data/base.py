"""`FewShotDataset`: the episode machinery shared by every benchmark, and what a benchmark declares about itself.

A benchmark subclass says which images belong to which class and how to read a binary mask; this class turns that
into episodes (the seeded protocol for evaluation, reproducible random draws for training) and into tensors.

Evaluation (``split`` = ``val``/``test``): the whole episode list is drawn once at construction
(`protocol_episodes`), so the sequence is independent of workers and processes. Training (``split`` = ``trn``):
episode ``index`` is drawn from ``np.random.default_rng((seed, index))``; the training sampler folds the epoch into
the index, so every epoch differs but any worker/process layout — and a resumed run — sees the same episodes.

Each benchmark class also declares, as class attributes and class methods, what the rest of fsseg needs to know
about it: its ``name`` (the value of ``data.benchmark``; `fsseg.data.registry` finds classes by it), ``title``,
``layout`` (its files under the data root, in words), ``nfolds``, the paths that must exist (`required_paths`), any
one-time preparation (`prepare_data`) and where its data root and split lists are. The data module, `fsseg data
check` and the reproduction runner read these declarations; none of them knows a benchmark by name.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fsseg.data import augment
from fsseg.data.protocol import (
    SUPPORT_CONTROLS,
    Episode,
    class_first_episodes,
    class_first_random_episode,
    control_episodes,
)

SPLITS = ("trn", "val", "test")
IMAGE_RESIZES = ("torch", "pil")  # data.image_resize (`image_to_tensor`)
BAD_MASKS = ("error", "warn")  # data.bad_masks (`FewShotDataset.checked_mask`)


def load_rgb(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} is missing")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image file {path} is unreadable or corrupt: {e}") from e


def load_label(path: Path, grayscale: bool = False) -> np.ndarray:
    """A label PNG as uint8 ``[H, W]``: palette indices kept as values, or luminance with ``grayscale``."""
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} is missing")
    try:
        with Image.open(path) as im:
            return label_from_image(im, grayscale)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"mask file {path} is unreadable or corrupt: {e}") from e


def label_from_image(im: Image.Image, grayscale: bool = False) -> np.ndarray:
    """A label image as uint8 ``[H, W]`` (`load_label`'s rule): palette indices kept, anything else as luminance."""
    if grayscale or im.mode not in ("L", "P", "1", "I", "I;16"):
        im = im.convert("L")
    return np.array(im).astype(np.uint8)


def image_to_tensor(img: Image.Image, size: int, resize: str = "torch") -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, size, size]`` in [0, 1], resized by ``resize`` (``data.image_resize``):

    - ``torch``: bilinear with antialias on the float image (``F.interpolate``);
    - ``pil``: PIL's bilinear resize of the uint8 image, then ``/ 255``: what the released DiffewS code feeds its
      model (``transforms.Resize((S, S))`` on the PIL image before ``ToTensor``, in training and evaluation;
      docs/PROTOCOL.md §3a). The two differ by up to one uint8 level per pixel.
    """
    if resize == "pil":
        small = img.resize((size, size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    if resize != "torch":
        raise ValueError(f"image resize must be one of {IMAGE_RESIZES}, got {resize!r}")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return resize_image_tensor(x, size)


def resize_image_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """`image_to_tensor`'s ``torch`` resize of a float image ``[3, H, W]`` in [0, 1] -> ``[3, size, size]``."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[
        0
    ].clamp_(0, 1)


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 mask {0, 1, 255} -> int64 ``[h, w]`` resized with nearest neighbour (``None`` keeps the size)."""
    m = torch.from_numpy(mask.astype(np.int64))
    if size is None or tuple(m.shape) == tuple(size):
        return m
    return F.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0].long()


class BadMaskError(ValueError):
    """A listed mask that does not show its listed class, or holds values outside the benchmark's labels."""


def _values(label: np.ndarray, limit: int = 20) -> str:
    values = np.unique(label).tolist()
    return str(values[:limit])[:-1] + ", ...]" if len(values) > limit else str(values)


class FewShotDataset(Dataset, ABC):
    """Base class of every benchmark. Subclasses implement the abstract methods below the constructor and declare
    the class attributes.

    Args:
        root: the data root holding the benchmark folders (the FSSBench layout, docs/PROTOCOL.md §1).
        split: ``trn`` (random training episodes) or ``val``/``test`` (the fixed protocol).
        fold: the fold index; ``-1`` (training only) = every class, for the in-context setting.
        shot: supports per episode.
        img_size: side of the square model input.
        eval_size: side of the evaluation mask; ``None`` = ``img_size``; ``"original"`` = the image's own size.
        n_episodes: episodes per epoch (training) or in the protocol (evaluation); ``None`` = the benchmark default.
        seed: the protocol seed (0 for published numbers) / the training-episode seed.
        splits_dir: folder of split lists (default: `default_splits_dir`, the lists shipped in ``fsseg/data/splits``).
        support_control: evaluation only: ``none`` (the protocol), ``other_class`` (each episode's supports come
            from another class of the split) or ``empty_mask`` (own support images, all-background masks); see
            `fsseg.data.protocol.control_episodes`.
        train_augment: training only: ``none`` or ``channel_permutation`` (one RGB channel permutation per episode,
            for its query and supports alike; `fsseg.data.augment`).
        image_resize: how images are resized to ``img_size``: ``torch`` or ``pil`` (the released DiffewS form;
            `image_to_tensor`).
        bad_masks: what a listed mask that does not show its listed class, or holds values outside the benchmark's
            labels, does when an episode reads it (`checked_mask`): ``error`` (a `BadMaskError` naming the file) or
            ``warn`` (a warning; the episode is used as it is, scored against what the mask shows).
        index_only: read the split lists only (classes and their images): no folder check, no episodes. What
            `fsseg data check` counts and verifies.
    """

    name: ClassVar[str] = (
        ""  # the value of ``data.benchmark``; a class without one is no benchmark of its own
    )
    title: ClassVar[str] = ""  # as tables and reports print it
    layout: ClassVar[str] = ""  # the benchmark's files under the data root, in words
    nfolds: ClassVar[int] = 4
    check_splits: ClassVar[tuple[str, ...]] = (
        "trn",
        "test",
    )  # the splits whose files `fsseg data check` covers
    check_default: ClassVar[bool] = True  # checked by `fsseg data check` when no --benchmark is given
    # Label-map benchmarks (one PNG per image, value = class id + 1, 0 = background) declare their labels; the default
    # `load_mask` reads them, and a value outside them is a bad mask (`checked_mask`). None: masks of another kind.
    label_classes: ClassVar[int | None] = None  # values 1..label_classes are classes
    label_ignore: ClassVar[int | None] = None  # the ignore value (255), if the benchmark has one
    classwise: dict[int, list[str]]  # class -> its images in this split/fold, set by `build_index`

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        fold: int = 0,
        shot: int = 1,
        img_size: int = 400,
        eval_size: int | str | None = None,
        n_episodes: int | None = None,
        seed: int = 0,
        splits_dir: str | Path | None = None,
        support_control: str = "none",
        train_augment: str = "none",
        image_resize: str = "torch",
        bad_masks: str = "error",
        index_only: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not (0 <= int(fold) < self.nfolds or (int(fold) == -1 and split == "trn")):
            raise ValueError(
                f"{self.name}: unknown fold {fold!r}; expected 0..{self.nfolds - 1} (or -1 = every class, training only)"
            )
        if int(shot) < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"image_resize must be one of {IMAGE_RESIZES}, got {image_resize!r}")
        if bad_masks not in BAD_MASKS:
            raise ValueError(f"bad_masks must be one of {BAD_MASKS}, got {bad_masks!r}")
        if not (
            eval_size is None or eval_size == "original" or (isinstance(eval_size, int) and eval_size > 0)
        ):
            raise ValueError(f"eval_size must be a positive int, 'original' or None, got {eval_size!r}")
        if support_control not in SUPPORT_CONTROLS:
            raise ValueError(f"support_control must be one of {SUPPORT_CONTROLS}, got {support_control!r}")
        if support_control != "none" and split == "trn":
            raise ValueError(
                f"support_control {support_control!r} applies to evaluation episodes, not to training"
            )
        if augment.check(train_augment) != "none" and split != "trn":
            raise ValueError(
                f"train_augment {train_augment!r} applies to training episodes, not to {split!r}"
            )
        self.support_control = support_control
        self.train_augment = train_augment
        self.image_resize, self.bad_masks = image_resize, bad_masks
        self.known_bad: dict[tuple[str, int], str] = {}  # (key, class) -> problem, found by `scan_masks`
        self._listed: dict[str, list[int]] | None = None
        self.root = Path(root)
        self.split, self.fold, self.shot, self.seed = split, int(fold), int(shot), int(seed)
        self.img_size = int(img_size)
        self.eval_size = self.img_size if eval_size is None else eval_size
        self.splits_dir = splits_dir if splits_dir is not None else self.default_splits_dir(self.root)
        self.episodes: list[Episode] | None = None
        if index_only:
            self.build_index()
            self.n_episodes = 0
            return
        self.check_root()
        self.build_index()
        if self.training:
            self.n_episodes = int(n_episodes) if n_episodes is not None else self.default_train_length()
        else:
            n = int(n_episodes) if n_episodes is not None else self.default_eval_length()
            rs = np.random.RandomState(self.seed)
            self.episodes = self.protocol_episodes(rs, n)
            if support_control != "none":
                self.episodes = control_episodes(
                    self.episodes, support_control, self.classwise, self.class_ids(), self.shot, self.seed
                )
            self.n_episodes = len(self.episodes)

    # ---- what a benchmark declares (class level) ----------------------------------------------------------------
    @classmethod
    def required_paths(cls, root: Path, split: str) -> list[tuple[Path, str]]:
        """The folders and files that must exist under ``root`` before episodes of ``split`` can be read, each
        with what belongs there (or how to make it)."""
        return []

    @classmethod
    def resolve_root(cls, root: str | Path | None) -> Path:
        """The data root to read (``data.root``); it must exist."""
        if root is None:
            raise ValueError(
                "data.root is not set: give the folder that holds COCO2014/, VOC2012/, FSS-1000/, LVIS/ "
                "(docs/PROTOCOL.md §1)"
            )
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data.root {path} does not exist")
        return path

    @classmethod
    def default_splits_dir(cls, root: Path) -> Path | None:
        """Where the split lists are when ``splits_dir`` is not given (None: the lists shipped with fsseg)."""
        return None

    @classmethod
    def prepare_data(cls, root: Path, split: str) -> None:
        """One-time work before episodes of ``split`` can be read (indexing, generation). The data module calls it
        once per node (Lightning's ``prepare_data``: local rank 0); ``setup`` on every rank then only reads."""

    @classmethod
    def check_notes(cls, root: Path) -> list[str]:
        """Extra lines for `fsseg data check` (what is built, how to build what is not)."""
        return []

    # ---- what a benchmark implements -------------------------------------------------------------------------
    def check_root(self) -> None:
        """Raise a clear error naming the first required path that is missing under ``root``."""
        for path, what in self.required_paths(self.root, self.split):
            if not path.exists():
                raise FileNotFoundError(
                    f"{self.title}: {path} is missing ({what}); `fsseg data check --root {self.root} --benchmark "
                    f"{self.name}` lists everything that is missing"
                )

    @abstractmethod
    def build_index(self) -> None:
        """Read the split lists for (split, fold): classes and their ordered image lists."""

    @abstractmethod
    def class_ids(self) -> list[int]:
        """The classes this split/fold's episodes use (contiguous dataset indices)."""

    @abstractmethod
    def protocol_episodes(self, rs: np.random.RandomState, n: int) -> list[Episode]:
        """The published evaluation draws, in order."""

    @abstractmethod
    def random_episode(self, rng: np.random.Generator, index: int) -> Episode:
        """One training episode (``index`` modulo the natural length picks the query where the benchmark does)."""

    @abstractmethod
    def image_path(self, key: str) -> Path:
        """The image file of ``key``."""

    def mask_path(self, key: str) -> Path | None:
        """The mask file of ``key`` (None when the masks are not files of their own)."""
        return None

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        """Binary mask of ``class_id`` in image ``key``: uint8 ``[H, W]`` in {0, 1, 255}. The default reads a label
        map (`label_classes`); a benchmark whose masks are of another kind implements this."""
        return self.mask_from_label(self.read_label(key), class_id)

    def read_label(self, key: str) -> np.ndarray:
        """The label map of ``key`` (label-map benchmarks: uint8 ``[H, W]``)."""
        if self.label_classes is None:
            raise NotImplementedError(
                f"{type(self).__name__} declares no label_classes: it implements load_mask"
            )
        return load_label(self.mask_path(key))

    def mask_from_label(self, label: np.ndarray, class_id: int) -> np.ndarray:
        """``class_id``'s binary mask in a label map: value ``class_id + 1`` -> 1, `label_ignore` kept, else 0."""
        mask = (label == class_id + 1).astype(np.uint8)
        if self.label_ignore is not None:
            mask[label == self.label_ignore] = self.label_ignore
        return mask

    @classmethod
    def label_text(cls) -> str:
        """The values a label map of this benchmark may hold, in words."""
        ignore = f", {cls.label_ignore} ignore" if cls.label_ignore is not None else ""
        return f"0 background, 1..{cls.label_classes} classes{ignore}"

    def default_train_length(self) -> int:
        """Training episodes per epoch when ``n_episodes`` is not given: one per image of the split."""
        return len(self.keys())

    def default_eval_length(self) -> int:
        return 1000

    # ---- shared -----------------------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return self.split == "trn"

    def keys(self) -> list[str]:
        """Every image key the episodes of this split/fold can use, sorted."""
        return sorted({k for c in self.class_ids() for k in self.classwise[c]})

    def files(self, key: str) -> list[Path]:
        """The files image ``key`` is read from (image, and mask where it is a file)."""
        return [p for p in (self.image_path(key), self.mask_path(key)) if p is not None]

    def verify(self, key: str) -> None:
        """Open and fully decode the image of ``key`` and its mask; raise ValueError / FileNotFoundError naming the
        file when one is unreadable, corrupt or of another size than the image."""
        img = load_rgb(self.image_path(key))
        mask_file = self.mask_path(key)
        if mask_file is not None and load_label(mask_file).shape != (img.height, img.width):
            raise ValueError(f"mask file {mask_file} differs in size from its image {img.width}x{img.height}")

    # ---- listed masks that do not show what the lists say ----------------------------------------------------
    def listed_classes(self, key: str) -> list[int]:
        """The classes of this split/fold whose lists hold image ``key``."""
        if self._listed is None:
            self._listed = {}
            for c in self.class_ids():
                for k in self.classwise.get(c, ()):
                    self._listed.setdefault(k, []).append(c)
        return self._listed.get(key, [])

    def _mask_name(self, key: str) -> str:
        path = self.mask_path(key)
        return f"mask file {path}" if path is not None else f"the listed mask of {self.image_path(key)}"

    def _found(self, key: str, label: np.ndarray | None, mask: np.ndarray) -> str:
        """``values found: [...]`` of the mask file (of the binary mask when the masks are no files)."""
        if label is None and self.mask_path(key) is not None:
            label = load_label(self.mask_path(key))
        return f"values found: {_values(mask if label is None else label)}"

    def checked_mask(
        self, key: str, class_id: int, check_values: bool = True
    ) -> tuple[np.ndarray, list[str]]:
        """`load_mask` and what is wrong with it: the listed class ``class_id`` absent (the lists say the image shows
        it), and, for label maps with ``check_values``, values outside the benchmark's labels (`label_text`); each
        problem a line naming the file, the listed class and the values found."""
        label = self.read_label(key) if self.label_classes is not None else None
        mask = self.load_mask(key, class_id) if label is None else self.mask_from_label(label, class_id)
        problems = []
        if label is not None and check_values:
            allowed = np.zeros(256, dtype=bool)
            allowed[: self.label_classes + 1] = True
            if self.label_ignore is not None:
                allowed[self.label_ignore] = True
            outside = np.flatnonzero((np.bincount(label.ravel(), minlength=256) > 0) & ~allowed).tolist()
            if outside:
                problems.append(
                    f"{self._mask_name(key)} holds values {outside} outside {self.title}'s labels "
                    f"({self.label_text()}), read as background; {self._found(key, label, mask)}"
                )
        if not (mask == 1).any():
            value = f" (mask value {class_id + 1})" if label is not None else ""
            problems.append(
                f"{self._mask_name(key)} does not show its listed class {class_id}{value}; "
                f"{self._found(key, label, mask)}"
            )
        return mask, problems

    def mask_problems(
        self, key: str, classes: list[int] | None = None, check_values: bool = True
    ) -> list[str]:
        """Every problem of ``key``'s mask for ``classes`` (default: its `listed_classes`); its values checked once
        (with the first class) unless ``check_values`` is false."""
        classes = self.listed_classes(key) if classes is None else classes
        return [
            p for i, c in enumerate(classes) for p in self.checked_mask(key, c, check_values and i == 0)[1]
        ]

    def scan_masks(self) -> tuple[int, list[str]]:
        """Check the mask of every (image, class) an evaluation episode reads; remember the problems (`known_bad`)
        and return the number of episodes with one and the problems, each once."""
        if self.episodes is None:
            raise ValueError(
                "scan_masks covers evaluation episodes; training episodes are checked as they load"
            )
        found: dict[tuple[str, int], list[str]] = {}
        checked_values: set[str] = set()
        affected = 0
        for ep in self.episodes:
            s_class = ep.class_id if ep.support_class is None else ep.support_class
            bad = False
            for key, c in ((ep.query, ep.class_id), *((k, s_class) for k in ep.supports)):
                if (key, c) not in found:
                    found[(key, c)] = self.checked_mask(key, c, check_values=key not in checked_values)[1]
                    checked_values.add(key)
                bad |= bool(found[(key, c)])
            affected += bad
        self.known_bad = {pair: "; ".join(p) for pair, p in found.items() if p}
        return affected, [p for problems in found.values() for p in problems]

    def episode_mask(self, key: str, class_id: int) -> np.ndarray:
        """The mask an episode reads, checked (`checked_mask`): a problem raises `BadMaskError` (``bad_masks:
        error``) or warns (``warn``; once per problem and process, none for those `scan_masks` reported)."""
        mask, problems = self.checked_mask(key, class_id)
        if problems:
            text = "; ".join(problems)
            if self.bad_masks == "error":
                raise BadMaskError(
                    f"{text}. `fsseg data check --root {self.root} --benchmark {self.name} --verify` lists every "
                    f"such mask; data.bad_masks: warn uses them as they are (counted in metrics.json)"
                )
            if self.known_bad.get((key, class_id)) != text:
                warnings.warn(f"{text} (data.bad_masks: warn: used as it is)", stacklevel=2)
        return mask

    def __len__(self) -> int:
        return self.n_episodes

    def episode(self, index: int) -> Episode:
        if self.episodes is not None:
            return self.episodes[index]
        return self.random_episode(np.random.default_rng((self.seed, int(index))), int(index))

    def __getitem__(self, index: int) -> dict:
        """Episode ``index`` in the contract's form (`fsseg.episode.Episode`)."""
        ep = self.episode(index)
        s = self.img_size
        q_img = load_rgb(self.image_path(ep.query))
        q_mask = self.episode_mask(ep.query, ep.class_id)
        if q_mask.shape != (q_img.height, q_img.width):
            raise ValueError(
                f"mask of {self.image_path(ep.query)} has shape {q_mask.shape}, image is {(q_img.height, q_img.width)}"
            )
        eval_hw = (
            (q_img.height, q_img.width) if self.eval_size == "original" else (self.eval_size, self.eval_size)
        )
        s_class = ep.class_id if ep.support_class is None else ep.support_class
        s_imgs, s_masks = [], []
        for key in ep.supports:
            s_img = load_rgb(self.image_path(key))
            s_mask = self.episode_mask(key, s_class)
            if s_mask.shape != (s_img.height, s_img.width):
                raise ValueError(
                    f"mask of {self.image_path(key)} has shape {s_mask.shape}, image is {(s_img.height, s_img.width)}"
                )
            if ep.empty_supports:
                s_mask = np.zeros_like(s_mask)
            s_imgs.append(image_to_tensor(s_img, s, self.image_resize))
            s_masks.append(resize_mask(s_mask, (s, s)))
        q_img, s_imgs = (
            image_to_tensor(q_img, s, self.image_resize),
            torch.stack(s_imgs),
        )  # [3, S, S], [K, 3, S, S]
        extra = {}
        if self.train_augment != "none":
            v = augment.draw(self.train_augment, self.seed, index)
            q_img, s_imgs = augment.apply(q_img, v), augment.apply(s_imgs, v)
            extra["colour_variant"] = torch.tensor(v, dtype=torch.long)
        return {
            "query_img": q_img,  # [3, S, S]
            "query_mask": resize_mask(q_mask, (s, s)),  # [S, S]
            "query_mask_eval": resize_mask(q_mask, eval_hw),  # [h, w]
            "support_imgs": s_imgs,  # [K, 3, S, S]
            "support_masks": torch.stack(s_masks),  # [K, S, S]
            "class_id": torch.tensor(ep.class_id, dtype=torch.long),
            "support_class_id": torch.tensor(s_class, dtype=torch.long),  # differs under support_control
            "support_control": self.support_control,
            "episode_idx": torch.tensor(index, dtype=torch.long),
            "query_name": ep.query,
            "support_names": list(ep.supports),
            **extra,
        }


class ClassFirstDataset(FewShotDataset):
    """A benchmark whose episodes are drawn class first (COCO-20i's protocol, `class_first_episodes`): a class of the
    split uniformly, a query image of it, then its supports."""

    def protocol_episodes(self, rs: np.random.RandomState, n: int) -> list[Episode]:
        return class_first_episodes(rs, self.class_ids(), self.classwise, self.shot, n)

    def random_episode(self, rng: np.random.Generator, index: int) -> Episode:
        return class_first_random_episode(rng, self.class_ids(), self.classwise, self.shot)
