"""Model folders without weights: each component's configuration and a weights file that has every tensor's name,
shape and dtype but no data, so the methods' own constructors (``from_pretrained`` included) build the full-size
architectures from them.

A component's configuration is read where a run would load it from (`fsseg.models.loading.locate`: a package
asset, the working directory, the Hugging Face cache), or, for the hub ids fsseg uses, from the configurations
shipped in ``fsseg/assets/architectures`` (no weights; sources in its README.md). The weights file is
``torch.save`` of a state dict built from the configuration under fake tensors, written with
``torch.serialization.skip_data``: the file has its full size but no data (a sparse file where the file system
allows). Loaded under a `torch._subclasses.fake_tensor.FakeTensorMode`, it gives fake tensors and reads nothing;
loaded for real, every weight is zero (what `benchmarks/memory.py` measures: memory does not depend on values).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fsseg.models import loading
from fsseg.models.diffews.loading import EXTRA_CONVS, conv_like
from fsseg.plan.fake import fake_construction

ARCHITECTURES = "fsseg/assets/architectures"  # a package asset: <hub id>/<subfolder>/config.json

# subfolder -> the class a run loads it with; components without weights are copied as they are
MODEL_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "movq": ("diffusers", "VQModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
}
NO_WEIGHTS = ("scheduler", "tokenizer", "image_processor")
WEIGHT_NAMES = {"diffusers": "diffusion_pytorch_model.bin", "transformers": "pytorch_model.bin"}
CONFIG_FILES = (".json", ".txt", ".model")  # configurations, vocabularies, merges


def _model_class(kind: str):
    lib, name = MODEL_CLASSES[kind]
    module = __import__(lib, fromlist=[name])
    return getattr(module, name)


def config_folder(source: str, subfolder: str | None, what: str, key: str) -> tuple[Path, str]:
    """Where ``source``'s ``subfolder`` configuration is read from, and which kind of place that is
    (``local`` / ``hub cache`` / ``shipped architecture``). A source found nowhere is an error naming ``key``."""
    try:
        found = loading.locate(source, subfolder, what, reference=source, key=key, allow_download=False)
        return found, "local" if loading.local_path(source) is not None else "hub cache"
    except loading.MissingWeightsError as err:
        shipped = loading.local_path(f"{ARCHITECTURES}/{source}")
        if shipped is not None and loading.is_hub_id(source):
            folder = shipped / subfolder if subfolder else shipped
            if folder.is_dir():
                return folder, "shipped architecture"
        raise loading.MissingWeightsError(
            f"fsseg plan: the {what} of {key} = {source!r} needs its configuration (config.json), found neither "
            f"there nor among the shipped architectures ({', '.join(shipped_sources())}): {err}"
        ) from None


def shipped_sources() -> list[str]:
    root = loading.local_path(ARCHITECTURES)
    if root is None:
        return []
    return sorted(
        f"{org.name}/{repo.name}" for org in root.iterdir() if org.is_dir() for repo in org.iterdir()
    )


def _copy_configs(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in CONFIG_FILES:
            shutil.copy2(f, dst / f.name)


def _build_fake(kind: str, src: Path):
    """The component built from its configuration under fake tensors (nothing allocated)."""
    cls = _model_class(kind)
    with fake_construction(FakeTensorMode()):
        if MODEL_CLASSES[kind][0] == "diffusers":
            model = cls.from_config(cls.load_config(src))
            for name, key in EXTRA_CONVS.items():  # a released DiffewS UNet declares its extra input convs
                if model.config.get(key) is not None:
                    model.add_module(name, conv_like(model.conv_in, int(model.config[key])))
        else:
            model = cls(cls.config_class.from_pretrained(src))
    return model


def write_component(kind: str, src: Path, dst: Path) -> int:
    """``dst``: ``src``'s configuration files and a data-less weights file; returns the component's parameter
    count."""
    model = _build_fake(kind, src)
    dst.mkdir(parents=True, exist_ok=True)
    if MODEL_CLASSES[kind][0] == "diffusers":
        model.save_config(dst)
        # keys a released UNet's config declares beside the diffusers fields (in_channels_ref, ...)
        declared = json.loads((src / "config.json").read_text())
        written = json.loads((dst / "config.json").read_text())
        extra = {k: v for k, v in declared.items() if k in EXTRA_CONVS.values() and k not in written}
        if extra:
            (dst / "config.json").write_text(json.dumps({**written, **extra}, indent=2))
    else:
        model.config.save_pretrained(dst)
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(model.state_dict(), dst / WEIGHT_NAMES[MODEL_CLASSES[kind][0]])
    return sum(p.numel() for p in model.parameters())


def write_tokenizer(src: Path | None, dst: Path) -> None:
    """The source's tokenizer files, or (a shipped architecture has none) fsseg's byte-level CLIP tokenizer with
    SD 2.1's 77-token length: the prompt embeddings' shapes, all that memory depends on, are the same."""
    if src is not None and any(f.suffix in CONFIG_FILES for f in src.iterdir()):
        _copy_configs(src, dst)
        return
    from fsseg.models.diffews.tiny import tiny_tokenizer

    tiny_tokenizer(dst.parent / ".vocab").save_pretrained(dst)
    shutil.rmtree(dst.parent / ".vocab", ignore_errors=True)


def write_source(source: str, subfolders: list[str], dst: Path, key: str) -> dict:
    """A folder of ``subfolders`` for ``source`` (a SD / Kandinsky folder layout); returns what each came from
    and its parameter count."""
    info: dict = {}
    for sub in subfolders:
        try:
            src, where = config_folder(source, sub, sub, key)
        except loading.MissingWeightsError:
            if sub != "tokenizer":
                raise
            src, where = None, "fsseg byte-level CLIP tokenizer (77 tokens)"
        if sub == "tokenizer":
            write_tokenizer(src, dst / sub)
            info[sub] = {"from": where}
        elif sub in NO_WEIGHTS:
            _copy_configs(src, dst / sub)
            info[sub] = {"from": where}
        else:
            info[sub] = {"from": where, "parameters": write_component(sub, src, dst / sub)}
    return info


def write_folder_component(source: str, kind: str, dst: Path, key: str) -> dict:
    """A single-component folder (``unet_path``: a UNet; ``image_encoder``: a CLIP image encoder)."""
    src, where = config_folder(source, None, kind, key)
    return {"from": where, "parameters": write_component(kind, src, dst)}
