"""DiffewS training without the VAE in the loop: the VAE posterior of every training image and mask image, computed
once and memory-mapped (``model.init_args.latent_cache: <folder>``).

A DiffewS training step takes ``vae.encode(x).latent_dist.sample() * scaling_factor`` of four images per episode: the
query, the query-mask image, the support and the support-mask image (docs/PROTOCOL.md §3). The images never change
(no augmentation), so neither do their posteriors; only the sample's noise does. The cache keeps each posterior's
parameters (the VAE's mean and log-variance, ``[8, h, w]`` float32, encoded in fp32) and training samples from them
with diffusers' own ``DiagonalGaussianDistribution``: the same ``mean + std * eps`` with the same draws from the
global generator as live encoding (`DiffewsModule.encode_episode`). Exactly so in fp32; under bf16 autocast live
encoding computes the moments (and draws the noise) in bf16, while the cache holds fp32 moments.

Entries: one per training image (by its key) and one per (image, class) pair of the training lists: the white-
foreground mask image of that class (ignore pixels count as background, as in training). With
``data.train_augment: channel_permutation`` every image also has a row per non-identity channel permutation (key
``<image>\t<variant name>``, e.g. ``BRG``; `fsseg.data.augment`), looked up by the episode's ``colour_variant``;
mask images are grey, so permuting leaves them as they are. It serves
``supervision: white_fg`` (released) with the injections whose support input is the image and the mask image
(``concat``, released), or the image alone (``multiply_latent``, ``attention_mask``); the other supervision forms and
injections (whose images mix image and mask) and ``interaction: tca`` are refused by name.

The folder::

    moments.npy       float32 [N, 8, h, w]: image rows, then mask-image rows (read memory-mapped)
    index.json        {"images": {key or "key<TAB>variant": row}, "masks": {"key<TAB>class": row}}
    fingerprint.json  what the moments depend on (`fingerprint`), written last

A folder whose fingerprint differs from the run's (other VAE weights, image size or resize, split lists or data files) is
refused with the fields that differ; nothing is overwritten. `DiffewsModule.prepare_data` builds a missing cache at
the first ``fit`` (once per node, on the training device); ``fsseg cache-latents --config X.yaml`` builds it ahead of
a run (advisable before a multi-process run of a large dataset: the other processes wait for the build).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from fsseg.data import augment
from fsseg.data.base import FewShotDataset, image_to_tensor, load_rgb, resize_mask
from fsseg.models.diffews.inputs import binary_mask, mask_image
from fsseg.output_folder import process_alive

FORMAT = 1
MOMENTS, INDEX, FINGERPRINT = "moments.npy", "index.json", "fingerprint.json"
CHECKED = (
    "format",
    "vae_sha256",
    "img_size",
    "entries_sha256",
    "files_sha256",
    "train_augment",
    "image_resize",
)  # must match
DEFAULTS = {
    "train_augment": "none",
    "image_resize": "torch",
}  # what a cache written before the field existed holds
SUPPORTED = {"supervision": ("white_fg",), "injection": ("concat", "multiply_latent", "attention_mask")}


class LatentCacheMismatch(ValueError):
    """The cache folder was built from other inputs than this run's."""


def check_supported(interaction: str, injection: str, supervision: str) -> None:
    """Refuse, by name, the variants whose VAE inputs the cache does not hold."""
    if interaction == "tca":
        raise ValueError(
            "latent_cache: interaction='tca' encodes the support with CLIP, not the VAE; unsupported"
        )
    for key, value in (("supervision", supervision), ("injection", injection)):
        if value not in SUPPORTED[key]:
            raise ValueError(
                f"latent_cache holds image and white-foreground mask-image posteriors; {key}={value!r} needs other "
                f"images (supported: {key} in {SUPPORTED[key]})"
            )


# ---- what the cache holds ----------------------------------------------------------------------------------------
def entries(
    datasets: list[FewShotDataset],
) -> tuple[dict[str, FewShotDataset], dict[tuple[str, int], FewShotDataset]]:
    """Every training image key and every (image key, class) pair of ``datasets`` (the in-context mix: several),
    each with the dataset that reads it, sorted. A key naming different files in two datasets is an error."""
    images: dict[str, FewShotDataset] = {}
    masks: dict[tuple[str, int], FewShotDataset] = {}
    for ds in datasets:
        for c in ds.class_ids():
            for key in ds.classwise.get(c, ()):
                other = images.setdefault(key, ds)
                if other is not ds and other.image_path(key) != ds.image_path(key):
                    raise ValueError(
                        f"latent_cache: image key {key!r} names {other.image_path(key)} in {other.name} and "
                        f"{ds.image_path(key)} in {ds.name}"
                    )
                masks.setdefault((key, int(c)), ds)
    return dict(sorted(images.items())), dict(sorted(masks.items()))


def load_image(ds: FewShotDataset, key: str, variant: int = 0) -> torch.Tensor:
    """The image as a training episode holds it: ``[3, S, S]`` in [0, 1] (resized by ``data.image_resize``), in
    colour variant ``variant``."""
    img = image_to_tensor(load_rgb(ds.image_path(key)), ds.img_size, ds.image_resize)
    return augment.apply(img, variant)


def image_row_key(key: str, variant: int) -> str:
    return key if variant == 0 else f"{key}\t{augment.variant_name(variant)}"


def train_augment(datasets: list[FewShotDataset]) -> str:
    """The training datasets' one ``train_augment`` (an error when they differ)."""
    found = {ds.train_augment for ds in datasets}
    if len(found) != 1:
        raise ValueError(f"latent_cache: the training datasets have different train_augment {sorted(found)}")
    return found.pop()


def image_resize(datasets: list[FewShotDataset]) -> str:
    """The training datasets' one ``image_resize`` (an error when they differ)."""
    found = {ds.image_resize for ds in datasets}
    if len(found) != 1:
        raise ValueError(f"latent_cache: the training datasets have different image_resize {sorted(found)}")
    return found.pop()


def load_mask_image(ds: FewShotDataset, key: str, class_id: int) -> torch.Tensor:
    """The white-foreground mask image of ``class_id`` in ``key`` as training draws it: ``[3, S, S]`` in {0, 1}."""
    mask = resize_mask(ds.load_mask(key, class_id), (ds.img_size, ds.img_size))  # [S, S] {0, 1, 255}
    return mask_image(binary_mask(mask))


def _sha256(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item if isinstance(item, bytes) else str(item).encode())
        h.update(b"\0")
    return h.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names and values, in standard layout)."""

    def chunks():
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            yield f"{name}:{t.dtype}:{tuple(t.shape)}"
            yield t.view(-1).view(torch.uint8).numpy().tobytes()

    return _sha256(chunks())


def fingerprint(vae: torch.nn.Module, datasets: list[FewShotDataset]) -> dict:
    """What the moments depend on: the VAE weights, the image size, the entries (from the split lists) and every
    file they are read from (size and modification time: images, masks, annotation files)."""
    sizes = {ds.img_size for ds in datasets}
    if len(sizes) != 1:
        raise ValueError(f"latent_cache: the training datasets have different img_size {sorted(sizes)}")
    images, masks = entries(datasets)
    files = {p for key, ds in images.items() for p in ds.files(key)}
    for ds in datasets:
        files |= {p for p, _ in type(ds).required_paths(ds.root, "trn") if p.is_file()}

    def stats():
        for p in sorted(files):
            st = p.stat()
            yield f"{p}:{st.st_size}:{st.st_mtime_ns}"

    return {
        "format": FORMAT,
        "vae_sha256": weights_sha256(vae),
        "img_size": sizes.pop(),
        "entries_sha256": _sha256([*images, *(f"{k}\t{c}" for k, c in masks)]),
        "files_sha256": _sha256(stats()),
        "train_augment": train_augment(datasets),
        "image_resize": image_resize(datasets),
        "images": len(images),
        "mask_images": len(masks),
        "benchmarks": sorted({ds.name for ds in datasets}),
        "roots": sorted({str(ds.root) for ds in datasets}),
    }


# ---- reading ------------------------------------------------------------------------------------------------------
class LatentCache:
    """A built cache, memory-mapped: the rows of an episode batch (`episode_moments`)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.moments = np.load(self.folder / MOMENTS, mmap_mode="r")  # [N, 8, h, w], nothing read yet
        index = json.loads((self.folder / INDEX).read_text())
        self.image_rows: dict[str, int] = index["images"]
        self.mask_rows: dict[str, int] = index["masks"]

    @classmethod
    def open(cls, folder: str | os.PathLike, expected: dict) -> LatentCache:
        """The cache in ``folder`` if it was built from the inputs ``expected`` describes (`fingerprint`)."""
        folder = Path(folder)
        path = folder / FINGERPRINT
        if not path.is_file():
            raise FileNotFoundError(
                f"latent cache {folder}: no {FINGERPRINT} (not a latent cache, or its build did not finish); "
                f"delete the folder or set model.init_args.latent_cache to another one"
            )
        found = json.loads(path.read_text())
        wrong = [
            f"{k}: cache {found.get(k)!r}, this run {expected[k]!r}"
            for k in CHECKED
            if found.get(k, DEFAULTS.get(k)) != expected[k]
        ]
        if wrong:
            raise LatentCacheMismatch(
                f"latent cache {folder} was built from other inputs ({'; '.join(wrong)}); delete the folder to "
                f"rebuild it, or set model.init_args.latent_cache to another folder"
            )
        return cls(folder)

    def _rows(self, table: dict[str, int], keys: list[str], what: str) -> list[int]:
        try:
            return [table[k] for k in keys]
        except KeyError as e:
            raise KeyError(f"latent cache {self.folder} has no {what} {e.args[0]!r}") from None

    def episode_moments(self, batch: dict, support_idx: torch.Tensor, injection: str) -> torch.Tensor:
        """The posterior parameters ``[N, 8, h, w]`` of an episode batch's VAE images in `encode_episode`'s order:
        queries, query-mask images, supports (episode-major, the ``support_idx`` used), support-mask images
        (``concat`` only)."""
        queries, b = list(batch["query_name"]), len(batch["query_name"])
        classes = batch["class_id"].tolist()
        s_classes = batch.get("support_class_id", batch["class_id"]).tolist()
        picked = [int(j) for j in support_idx]
        colour = batch["colour_variant"].tolist() if "colour_variant" in batch else [0] * b
        supports = [batch["support_names"][j][i] for i in range(b) for j in picked]  # [B*K'], episode-major
        s_of = [s_classes[i] for i in range(b) for _ in picked]
        s_colour = [colour[i] for i in range(b) for _ in picked]
        rows = self._rows(self.image_rows, [image_row_key(q, v) for q, v in zip(queries, colour)], "image")
        rows += self._rows(self.mask_rows, [f"{q}\t{c}" for q, c in zip(queries, classes)], "mask image")
        rows += self._rows(
            self.image_rows, [image_row_key(k, v) for k, v in zip(supports, s_colour)], "image"
        )
        if injection == "concat":
            rows += self._rows(self.mask_rows, [f"{s}\t{c}" for s, c in zip(supports, s_of)], "mask image")
        return torch.from_numpy(self.moments[np.asarray(rows)])  # fancy indexing reads just these rows


# ---- building -----------------------------------------------------------------------------------------------------
class _Images(Dataset):
    """The build's images in job order; an image's colour variants are consecutive jobs, read from disk once."""

    def __init__(self, jobs: list[tuple]) -> None:
        self.jobs = jobs
        self._last: tuple = (None, None, None)  # (dataset, key, image): the image the previous job read

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        ds, key, class_id, variant = self.jobs[i]
        if class_id is not None:
            return load_mask_image(ds, key, class_id)
        if self._last[:2] != (ds, key):
            self._last = (ds, key, load_image(ds, key))
        return augment.apply(self._last[2], variant)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the ``.<name>.partial-<host>-<pid>-<id>`` folders of earlier builds of ``folder`` whose process, of
    this host, is gone: a killed build (SIGKILL) cannot remove its own. A build that still runs, or one of another
    host (a shared filesystem), is left alone. Returns what was removed."""
    removed = []
    for tmp in sorted(folder.parent.glob(f".{folder.name}.partial-*")):
        parts = tmp.name.rsplit(".partial-", 1)[1].split("-")  # [*host, pid, id]; older builds: [pid, id]
        host = "-".join(parts[:-2]) or socket.gethostname()
        if len(parts) < 2 or not parts[-2].isdigit() or host != socket.gethostname():
            continue
        if not process_alive(int(parts[-2])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            rank_zero_info(
                f"latent cache: removed {tmp}, left by a build that was stopped (process {parts[-2]})"
            )
    return removed


@torch.no_grad()
def build(
    folder: str | os.PathLike,
    posterior,
    images: dict[str, FewShotDataset],
    masks: dict[tuple[str, int], FewShotDataset],
    expected: dict,
    batch_size: int = 8,
    num_workers: int = 0,
    variants: range = range(1),
) -> Path:
    """Encode the ``images`` and ``masks`` entries (`entries`) with ``posterior`` (``[n, 3, S, S]`` in [0, 1] ->
    ``DiagonalGaussianDistribution``) into ``folder`` with the fingerprint ``expected`` (written under a temporary
    name, then renamed; an existing folder is never replaced). ``variants``: the colour variants of every image
    (`fsseg.data.augment.variants`)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"latent cache {folder} already exists")
    image_jobs = [(ds, key, None, v) for key, ds in images.items() for v in variants]
    jobs = image_jobs + [(ds, k, c, 0) for (k, c), ds in masks.items()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(folder)
    tmp = (
        folder.parent / f".{folder.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    tmp.mkdir()
    try:
        loader = DataLoader(_Images(jobs), batch_size=batch_size, num_workers=num_workers)
        out, start, step = None, 0, max(1, len(loader) // 10)
        for i, x in enumerate(loader):
            params = posterior(x).parameters.float().cpu().numpy()  # [n, 8, h, w]
            if out is None:
                shape = (len(jobs), *params.shape[1:])
                out = np.lib.format.open_memmap(tmp / MOMENTS, mode="w+", dtype=np.float32, shape=shape)
            out[start : start + len(params)] = params
            start += len(params)
            if (i + 1) % step == 0:
                rank_zero_info(f"latent cache: {start}/{len(jobs)} images encoded")
        out.flush()
        del out
        index = {
            "images": {image_row_key(key, v): r for r, (_, key, _, v) in enumerate(image_jobs)},
            "masks": {f"{k}\t{c}": len(image_jobs) + r for r, (k, c) in enumerate(masks)},
        }
        (tmp / INDEX).write_text(json.dumps(index))
        (tmp / FINGERPRINT).write_text(json.dumps(expected, indent=1) + "\n")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def ensure(
    folder: str | os.PathLike,
    module,
    datasets: list[FewShotDataset],
    build_missing: bool = True,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> LatentCache:
    """The cache of ``module``'s VAE and ``datasets`` in ``folder``: opened (refused when its fingerprint differs),
    or, when missing and ``build_missing``, built first with the VAE on ``device`` (default: where it is)."""
    folder = Path(folder).expanduser()
    expected = fingerprint(module.vae, datasets)
    if not folder.exists():
        if not build_missing:
            raise FileNotFoundError(
                f"latent cache {folder} does not exist (it is built at the start of `fsseg fit` or by "
                f"`fsseg cache-latents`)"
            )
        home = next(module.vae.parameters()).device
        module.vae.to(device or home)
        variants = augment.variants(expected["train_augment"])
        try:
            colours = f" in {len(variants)} colour variants" if len(variants) > 1 else ""
            rank_zero_info(
                f"latent cache: encoding {expected['images']} images{colours} and {expected['mask_images']} mask "
                f"images into {folder}"
            )
            build(
                folder,
                module.posterior,
                *entries(datasets),
                expected,
                num_workers=num_workers,
                variants=variants,
            )
        except OSError:
            if not (folder / FINGERPRINT).is_file():  # not another process that finished first
                raise
        finally:
            module.vae.to(home)
        rank_zero_info(f"latent cache: wrote {folder}")
    return LatentCache.open(folder, expected)
