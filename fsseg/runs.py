"""Building and running a method, from Python as from the command line.

- `build_model`: a method from a run's config and checkpoint (``fsseg predict-images``, the Python API
  `fsseg.load`, ``fsseg cache-latents`` and the tools under tools/). The config's ``model`` section is parsed as the
  CLI parses it (jsonargparse: names and types checked, defaults filled in); the checkpoint is read once, checked
  against the config (`fsseg.cli.checkpoints`: its method and architecture) before the model is built, and its
  weights loaded after by `load_weights`, which ``fsseg test`` / ``validate`` use too (on their one read).
- `test`: evaluate a model on a data module's test episodes -> `fsseg.report.Report` (in memory, and written when
  given a folder). ``fsseg test`` runs through it, as do the demo's trivial references.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import yaml

from fsseg.models.base import FewShotModule
from fsseg.report import Report, TestReport


class NothingDone(RuntimeError):
    """A run had nothing to do (no training step, no episode): an error, not a success."""

    exit_code = 1  # an expected outcome, reported in one line without a traceback hint


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
    model = instantiate_model(model_cfg["class_path"], init, ckpt, source=str(config))
    return model, cfg.get("data") or {}


def instantiate_model(
    class_path: str, init_args: Mapping, ckpt: str | Path | None = None, source: str = "the config"
) -> FewShotModule:
    """The method ``class_path`` with ``init_args`` (checked by name and type as the CLI checks them, defaults
    filled in; errors name ``source``), in eval mode; with ``ckpt``, the checkpoint is read once and checked
    against the settings (its method and architecture) before the (slow) build, and its weights loaded after."""
    from jsonargparse import ArgumentParser

    cls = import_class(class_path)
    parser = ArgumentParser(exit_on_error=False)  # checks names and types as the CLI does, fills in defaults
    parser.add_subclass_arguments(FewShotModule, "model", required=True)
    try:
        parsed = parser.parse_object({"model": {"class_path": class_path, "init_args": dict(init_args)}})
    except Exception as e:  # jsonargparse's ArgumentError and friends
        raise ValueError(f"{source}: the model section does not parse: {e}") from e
    init_args = parsed.model.init_args.as_dict()
    state = None
    if ckpt is not None:
        from fsseg.cli.checkpoints import compare_model_config, read_checkpoint

        state = read_checkpoint(ckpt)  # the one read; errors name the file; plain tensors and values only
        compare_model_config(state, ckpt, class_path, init_args, getattr(cls, "architecture_args", ()))
    model = cls(**init_args)  # built directly: its own errors (missing weights) stay readable
    if state is not None:
        load_weights(model, state, ckpt)
    return model.eval()


def load_weights(model: FewShotModule, state: dict, ckpt: str | Path) -> None:
    """Load a checkpoint's weights (``state``, read once by `fsseg.cli.checkpoints.read_checkpoint` from ``ckpt``)
    into ``model``, after checking that they are the model's trained parameters with their shapes (errors name
    ``ckpt`` and the keys); the frozen parts a checkpoint leaves out stay as built."""
    from fsseg.cli.checkpoints import compare_state_dict

    compare_state_dict(state, ckpt, model, getattr(model, "_is_frozen_key", lambda key: False))
    model.load_state_dict(state["state_dict"])


def test(
    model, datamodule, trainer=None, folder: str | Path | None = None, extra: dict | None = None
) -> Report:
    """Evaluate ``model`` (its weights as they are) on ``datamodule``'s test episodes; returns the `Report`
    (metrics.json's content and one record per episode), written into ``folder`` when given.

    ``trainer``: the `lightning.Trainer` to run in (its callbacks, precision, devices); by default one CPU or GPU
    device, no logger, no progress bar. ``extra``: entries added to the metrics (e.g. the checkpoint's path).
    Raises `NothingDone` when no episode was tested. Usable without the CLI::

        model = fsseg.load("runs/demo_baseline/version_0/checkpoints/last.ckpt").model
        report = fsseg.runs.test(model, FewShotDataModule(root="data", benchmark="pascal5i", fold=0))
    """
    import lightning as L

    found = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, TestReport)]
    callback = found[0] if found else TestReport(extra, folder=folder, write=folder is not None)
    if found:
        callback.extra.update(extra or {})
    if trainer is None:
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, callbacks=[callback])  # fmt: skip
    elif not found:
        trainer.callbacks.append(callback)
    trainer.test(model, datamodule=datamodule, verbose=False)
    if callback.report is None or not callback.report.records:
        raise NothingDone(
            "nothing was tested: 0 test episodes (data.test_episodes 0 or trainer.limit_test_batches 0); "
            "no metrics.json written"
        )
    return callback.report
