"""The one function that builds a method from a run's config and checkpoint outside the Lightning CLI
(`build_model`): ``fsseg predict-images``, the Python API (`fsseg.load`) and the tools under tools/ use it.

The config's ``model`` section is parsed as the CLI parses it (jsonargparse: names and types checked, defaults filled
in); a checkpoint is read once, checked against the config (`fsseg.cli.checkpoints`: its method and architecture)
before the model is built, and its weights loaded after.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import yaml

from fsseg.models.base import FewShotModule

#: init arguments of a config that only training uses (left out when a model is built for prediction)
TRAINING_ONLY = ("optimizer", "scheduler")


def import_class(class_path: str) -> type:
    """The class a config's ``model.class_path`` names; a `ValueError` naming it when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"model.class_path {class_path!r} cannot be imported: {e}") from e


def threshold_override(cls: type, value: float, option: str = "--threshold") -> dict:
    """The init argument that a threshold (``option``) sets: every score-thresholding method's ``threshold``
    (applied in its own ``threshold_mode``); refused by name for a method without one."""
    if not getattr(cls, "has_threshold", False):
        raise ValueError(f"{option} does not apply to {cls.__name__}: it has no numeric threshold")
    return {"threshold": value}


def build_model(
    config: str | Path | None = None,
    ckpt: str | Path | None = None,
    threshold: float | None = None,
    overrides: Mapping | None = None,
    threshold_option: str = "--threshold",
) -> tuple[FewShotModule, dict]:
    """The method of a run, in eval mode, with the checkpoint's weights when ``ckpt`` is given.

    ``config``: a file or a config name (`fsseg.cli.configs.resolve_config`); without it, the ``config.yaml`` of
    the run ``ckpt`` belongs to. ``threshold``: the method's foreground threshold (refused by name, as
    ``threshold_option``, for a method without one). ``overrides``: model init arguments set over the config's
    (checked by name and type like the config's own). Without ``ckpt`` the model is as the config builds it (the
    pretrained weights it names, a trained part at its initialisation): whether that is wanted is the caller's
    rule (``--no_ckpt``, ``fsseg.load(no_ckpt=True)``).

    Returns (the model, the config's ``data`` section).
    """
    from jsonargparse import ArgumentParser

    from fsseg.cli.configs import find_run_config, resolve_config

    if ckpt is None and config is None:
        raise ValueError("give a checkpoint (beside its run's config.yaml) or a config")
    config = resolve_config(config) if config is not None else find_run_config(Path(ckpt))
    cfg = yaml.safe_load(Path(config).read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{config}: expected a YAML mapping (trainer / model / data sections)")
    model_cfg = cfg.get("model") or {}
    if not isinstance(model_cfg, dict) or "class_path" not in model_cfg:
        raise ValueError(f"{config}: no model.class_path")
    cls = import_class(model_cfg["class_path"])
    init = {k: v for k, v in (model_cfg.get("init_args") or {}).items() if k not in TRAINING_ONLY}
    init.update(overrides or {})
    if threshold is not None:
        init.update(threshold_override(cls, threshold, threshold_option))
    parser = ArgumentParser(exit_on_error=False)  # checks names and types as the CLI does, fills in defaults
    parser.add_subclass_arguments(FewShotModule, "model", required=True)
    try:
        parsed = parser.parse_object({"model": {"class_path": model_cfg["class_path"], "init_args": init}})
    except Exception as e:  # jsonargparse's ArgumentError and friends
        raise ValueError(f"{config}: the model section does not parse: {e}") from e
    init_args = parsed.model.init_args.as_dict()
    state = None
    if ckpt is not None:  # checked before the (slow) model build: readable, of this method and architecture
        from fsseg.cli.checkpoints import compare_model_config, compare_state_dict, read_checkpoint

        state = read_checkpoint(ckpt)  # the one read; errors name the file; plain tensors and values only
        compare_model_config(
            state, ckpt, model_cfg["class_path"], init_args, getattr(cls, "architecture_args", ())
        )
    model = cls(**init_args)  # built directly: its own errors (missing weights) stay readable
    if state is not None:
        compare_state_dict(state, ckpt, model, getattr(model, "_is_frozen_key", lambda key: False))
        model.load_state_dict(state["state_dict"])
    return model.eval(), cfg.get("data") or {}
