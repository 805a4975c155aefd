"""A method's module built by its own constructor from a config's ``model`` section, with every pretrained
source replaced by a weight-less folder of the same architecture (`fsseg.plan.skeleton`), on fake tensors (a
plan: nothing is allocated) or real ones (a measurement: every weight is zero).

On fake tensors the construction runs under `fsseg.plan.fake.fake_construction`, and safetensors files cannot be
read into fake tensors: DiffSeg's HED edge extractor (``edge_source: hed``, weights from ``hed_weights``) is built
as the same class with random weights.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fsseg.plan import skeleton
from fsseg.plan.fake import fake_construction

SD_LAYOUT = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
DECODER_LAYOUT = ["unet", "movq", "scheduler"]
PRIOR_LAYOUT = ["image_encoder", "image_processor"]


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def sources_of(cls) -> dict[str, list[str] | str]:
    """The init arguments of ``cls`` that name pretrained components: a folder layout (list of subfolders) or a
    single component's kind."""
    from fsseg.models.diffews import DiffewsModule
    from fsseg.models.diffseg import DiffSegModule

    if issubclass(cls, DiffewsModule):
        return {"pretrained": SD_LAYOUT, "unet_path": "unet", "image_encoder": "image_encoder"}
    if issubclass(cls, DiffSegModule):
        return {"decoder": DECODER_LAYOUT, "prior": PRIOR_LAYOUT}
    return {}


def _callable(spec, what: str):
    """A config's ``{class_path, init_args}`` (optimizer, scheduler) as the callable jsonargparse would give."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"model.init_args.{what}: expected class_path and init_args, got {spec!r}")
    return functools.partial(_import(spec["class_path"]), **(spec.get("init_args") or {}))


def init_args(cls, given: dict) -> dict:
    """``given`` completed with the constructor's defaults (so default sources are replaced too)."""
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"model.init_args: {cls.__name__} has no argument(s) {unknown}")
    out = {
        k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty
    }
    return {**out, **given}


def write_skeletons(cls, args: dict, folder: Path) -> tuple[dict, dict]:
    """Weight-less folders for every source ``args`` names; returns (the replaced init args, what each came
    from)."""
    replaced, info = {}, {}
    for key, layout in sources_of(cls).items():
        source = args.get(key)
        if source is None:
            continue
        dst = folder / key
        if isinstance(layout, list):
            info[key] = skeleton.write_source(str(source), layout, dst, f"model.init_args.{key}")
        else:
            info[key] = skeleton.write_folder_component(str(source), layout, dst, f"model.init_args.{key}")
        info[key] = {"source": str(source), "components": info[key]}
        replaced[key] = str(dst)
    return replaced, info


@contextlib.contextmanager
def _quiet_loading():
    """diffusers / transformers loading messages (no safetensors file, no accelerate, progress bars) off."""
    import diffusers
    import transformers

    levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity(
        diffusers.utils.logging.CRITICAL
    )  # "no safetensors file" is logged as an error
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])
        transformers.utils.logging.enable_progress_bar()


def build_module(model_cfg: dict, folder: Path | None, fake_mode: FakeTensorMode | None, precision=None):
    """The module ``model_cfg`` (``class_path``, ``init_args``) describes, its sources replaced by weight-less
    folders written under ``folder`` (None: the sources as given, weights and all: a real run's module); on
    ``fake_mode``'s fake tensors when given. Returns (module, components, notes: what the plan builds differently
    from a run, one line each)."""
    cls = _import(model_cfg["class_path"])
    args = init_args(cls, dict(model_cfg.get("init_args") or {}))
    notes: list[str] = []
    components: dict = {}
    if folder is not None:
        replaced, components = write_skeletons(cls, args, folder)
        args.update(replaced)
    elif fake_mode is not None:
        raise ValueError("build_module: fake tensors need weight-less folders (a folder to write them in)")
    args["optimizer"] = _callable(args.get("optimizer"), "optimizer")
    args["scheduler"] = _callable(args.get("scheduler"), "scheduler")
    hed = args.get("edge_source") == "hed" and args.get("use_scm", True) and "edge_source" in args
    if hed and fake_mode is not None:
        args["edge_source"] = "sobel"
        notes.append("model.init_args.edge_source hed: HED built with random weights (hed_weights not read)")
    elif hed and folder is not None:
        args["hed_weights"] = str(_zero_hed(folder / "hed.safetensors"))
    if args.get("pretrained") is True and "backbone" in args:  # the baseline's timm ImageNet weights
        args["pretrained"] = False
        notes.append("model.init_args.pretrained true: the backbone is built without its ImageNet weights")
    with (
        fake_construction(fake_mode) if fake_mode is not None else contextlib.nullcontext(),
        _quiet_loading(),
    ):
        module = cls(**args)
        if hed and fake_mode is not None:
            from fsseg.models.diffseg.hed import HED

            module.pipeline.edge_net = HED()  # frozen on assignment, as the loaded one
        if precision is not None:
            precision.convert_module(module)
    return module, components, notes


def _zero_hed(path: Path) -> Path:
    """A HED weights file of zeros (the real-tensor counterpart of the plan's random HED)."""
    from safetensors.torch import save_file

    from fsseg.models.diffseg.hed import HED

    save_file({k: torch.zeros_like(v) for k, v in HED().state_dict().items()}, str(path))
    return path
