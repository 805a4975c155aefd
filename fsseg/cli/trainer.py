"""``fsseg fit | validate | test``: LightningCLI over every method (chosen by ``model.class_path``) and the one
`FewShotDataModule`, with fsseg's rules on top:

- the config decides every setting, a checkpoint only gives weights: settings given with ``--ckpt`` (config files,
  overlays, the command line) are used and recorded, a checkpoint of another method or architecture is refused by
  name (`fsseg.cli.checkpoints`). Lightning's own behaviour, replacing the model settings with the checkpoint's
  saved ones, is switched off;
- ``test`` / ``validate`` need a checkpoint, or ``--no_ckpt`` (recorded) to evaluate the model as its config builds
  it (e.g. a released DiffewS UNet given as ``model.init_args.unet_path``);
- runs are named after the config files and fold, or after the logger name a config gives plus the configs given
  after it (`run_name`); evaluation runs always go to
  ``<save_dir>/<name>/<stage>_<benchmark>_fold<F>_<K>shot[_<control>][_seed<S>]`` (`evaluation_version`), and
  when the config is a training run's saved ``config.yaml`` (``--ckpt`` without ``--config``) beside that run,
  wherever the command runs (`training_run_of`); no command writes into a folder that holds checkpoints, nor
  removes a checkpoint;
- one writer per run folder, earlier results (``--overwrite``) set aside until the run has succeeded and put back
  when it fails or is stopped (`fsseg.output_folder`); a run that failed before doing anything leaves no folder;
- ``fit`` writes a resumable ``last.ckpt`` every ``--checkpoint_every_n_steps`` optimizer steps, and when stopped
  by SIGTERM (`RunCheckpoint`), atomically (`AtomicCheckpointIO`); a stopped run raises `Interrupted` (SIGTERM) or
  `KeyboardInterrupt` (SIGINT), never a success;
- a checkpoint tested on classes it was trained on is refused unless ``--allow_trained_classes`` (recorded;
  `TrainedClassesCheck`);
- a run with nothing to do (no training step, no episode) is an error; each command prints where it wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import ArgumentError, DefaultHelpFormatter, Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fsseg.callbacks import AtomicCheckpointIO, RunCheckpoint
from fsseg.cli.checkpoints import (
    TrainedClassesCheck,
    _plain,
    compare_model_config,
    compare_state_dict,
    read_checkpoint,
)
from fsseg.cli.configs import find_run_config, resolve_config
from fsseg.cli.noise import quiet_third_party
from fsseg.cli.schedule import derive_schedule_length
from fsseg.data.datamodule import FewShotDataModule, accumulation_steps
from fsseg.files import OutputExists
from fsseg.interrupts import Interrupted
from fsseg.models.base import FewShotModule, eval_precision_conflict
from fsseg.output_folder import IncompleteFolder, OutputFolder, check_complete
from fsseg.report import Report, TestReport
from fsseg.runs import NothingDone, load_weights
from fsseg.runs import test as run_test

SUBCOMMANDS = ("fit", "validate", "test")
CHECKPOINT_EVERY_N_STEPS = 500  # optimizer steps between two resumable checkpoints of every fit
SAVE_DIR = "runs"
METHODS = (
    "fsseg.models.diffews.DiffewsModule",
    "fsseg.models.diffseg.DiffSegModule",
    "fsseg.models.baseline.PrototypeModule",
)
# what a run writes into its folder besides checkpoints/ (names and glob patterns)
RUN_FILES = ("metrics.json", "episodes.jsonl", "config.yaml", "hparams.yaml", "events.out.tfevents.*")
_LOGGERS_WITH_VERSION = ("TensorBoardLogger", "CSVLogger")

_COMMON_HELP = f"""
methods (model.class_path):
  {(chr(10) + "  ").join(METHODS)}

fsseg shorthands and rules:
  --config NAME   a file, or a shipped config by name (diffews, ablations/diffews/fusion_qkv); repeat to overlay
  --fold N        = --data.fold N
  --ckpt PATH     = --ckpt_path PATH; without --config the run's config.yaml beside the checkpoint is used.
                  Settings given with a checkpoint (configs, overlays, command line) win over the ones saved in
                  it; a checkpoint of another method, or trained with another value of an architecture setting,
                  is refused by name
  --overwrite     replace an earlier run's results in the same folder (otherwise refused); they are kept aside
                  until this run has succeeded, and put back if it fails or is stopped
  --allow_trained_classes  test/validate a checkpoint on classes it was trained on (refused otherwise; recorded)
  --traceback     the full traceback of an error (also FSSEG_TRACEBACK=1); otherwise errors are one line"""

HELP = {
    "fit": f"""Train a method on a benchmark's training folds.

  fsseg fit --config diffews --fold 1
  fsseg fit --config diffews --config ablations/diffews/fusion_qkv
  fsseg fit --config diffews --fold 1 --ckpt_path {SAVE_DIR}/diffews_fold1/version_0/checkpoints/last.ckpt  # resume

Writes {SAVE_DIR}/<name>/version_N/ (name: <config names>_fold<F>, or a config's logger name + <later configs>):
config.yaml, TensorBoard logs, and checkpoints/last.ckpt, rewritten every --checkpoint_every_n_steps optimizer
steps (default {CHECKPOINT_EVERY_N_STEPS}), at every epoch end, at the end, and when stopped by SIGTERM (then the
exit status is 143); resuming from it continues exactly, mid-epoch too, into a new version folder.
"""
    + _COMMON_HELP,
    "validate": f"""Evaluate a checkpoint on the validation episodes (val/miou, val/fbiou).

Writes {SAVE_DIR}/<name>/validate_<benchmark>_fold<F>_<K>shot/ (config.yaml, logs).
"""
    + _COMMON_HELP,
    "test": f"""Evaluate a checkpoint on the published test episodes.

  fsseg test --ckpt {SAVE_DIR}/diffews_fold0/version_0/checkpoints/last.ckpt --fold 0 --data.shot 5
  fsseg test --config diffews --config ablations/diffews/threshold_absolute_0.2 --ckpt X.ckpt

Writes {SAVE_DIR}/<name>/test_<benchmark>_fold<F>_<K>shot[_<support control>][_seed<S>]/: metrics.json (mIoU,
FB-IoU, per-class IoU, the setting, the model settings used), episodes.jsonl (one line per episode), config.yaml.
With --ckpt alone (the training run's config.yaml), the folder is beside that training run: <run>/../test_.../.
A checkpoint is required; --no_ckpt evaluates the model as its config builds it instead (e.g. a released
DiffewS UNet given as model.init_args.unet_path), and is recorded.
"""
    + _COMMON_HELP,
}


class RunRefused(ValueError):
    """The command cannot run as given (a usage error): nothing was done."""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description printed as written."""


def _say(line: str) -> None:
    if rank_zero_only.rank == 0:
        print(line, flush=True)


# ---- arguments ---------------------------------------------------------------------------------------------------
def _is_inline_config(value: str) -> bool:
    return "\n" in value or value.lstrip().startswith(("{", "["))


def expand_shorthands(argv: list[str]) -> tuple[list[str], bool]:
    """Rewrite fsseg's shorthands into LightningCLI arguments; returns (arguments, ``--overwrite`` given).

    ``--fold N`` -> ``--data.fold N``; ``--ckpt PATH`` -> ``--ckpt_path PATH``; ``--config NAME`` -> the config
    file it names (`resolve_config`); a checkpoint without ``--config`` adds the run's ``config.yaml``;
    ``--no_ckpt`` / ``--no-ckpt`` alone -> ``--no_ckpt true`` (``--allow_trained_classes`` likewise). ``--overwrite`` is taken out (it is an instruction
    for this invocation, not a setting a saved config should carry).
    """
    out: list[str] = []
    ckpt, overwrite, i = None, False, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--fold", "--ckpt", "--ckpt_path", "--config", "-c"):
            if not eq:
                if i + 1 >= len(argv):
                    raise RunRefused(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            if name == "--fold":
                out += ["--data.fold", value]
            elif name in ("--ckpt", "--ckpt_path"):
                ckpt = value
                out += ["--ckpt_path", value]
            else:
                out += ["--config", value if _is_inline_config(value) else str(resolve_config(value))]
        elif name == "--overwrite" and not eq:
            overwrite = True
        elif name in ("--no_ckpt", "--no-ckpt", "--allow_trained_classes", "--allow-trained-classes"):
            flag = name.replace("-", "_").replace("__", "--", 1)
            nxt = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if eq:
                out += [flag, value]
            elif nxt in ("true", "false"):
                out += [flag, nxt]
                i += 1
            else:
                out += [flag, "true"]
        else:
            out.append(arg)
        i += 1
    has_config = any(a == "--config" for a in out)
    if ckpt not in (None, "", "null") and not has_config and out and out[0] in SUBCOMMANDS:
        out[1:1] = ["--config", str(find_run_config(Path(ckpt)))]
    return out, overwrite


def _import(class_path: str) -> type:
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# ---- run folders -------------------------------------------------------------------------------------------------
def default_run_name(cfg: Namespace) -> str:
    """``<config stems joined by +>_fold<F>`` (``diffews+fusion_qkv_fold0``); ``fsseg_fold<F>`` without a config."""
    stems = [Path(str(c)).stem for c in (cfg.get("config") or [])]
    return "+".join(dict.fromkeys(stems) or ["fsseg"]) + f"_fold{cfg.data.fold}"


def _names_the_run(config, name: str) -> bool:
    """Whether the config file ``config`` sets ``trainer.logger.init_args.name`` to ``name``."""
    try:
        text = config.read_text() if hasattr(config, "read_text") else Path(str(config)).read_text()
        logger = ((yaml.safe_load(text) or {}).get("trainer") or {}).get("logger")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return isinstance(logger, dict) and (logger.get("init_args") or {}).get("name") == name


def run_name(cfg: Namespace, name: str | None) -> str:
    """The run's name: without a logger name `default_run_name`; a name set by a config file gets ``+<stem>`` for
    each config given after that file (``demo_diffews+threshold_absolute_0.2``), so an overlay's runs never land in
    (and are refused by, or overwrite) the base config's folders; a name from the command line is used as given."""
    if name in (None, "lightning_logs"):
        return default_run_name(cfg)
    configs = list(cfg.get("config") or [])
    named = [i for i, c in enumerate(configs) if _names_the_run(c, name)]
    if not named:
        return name
    later = [Path(str(c)).stem for c in configs[named[-1] + 1 :]]
    return "+".join([name, *dict.fromkeys(s for s in later if s != name)])


def evaluation_version(stage: str, data: Namespace) -> str:
    """The folder of an evaluation run: what was evaluated, so repeated runs of one setting meet (and refuse)."""
    name = f"{stage}_{data.benchmark}_fold{data.fold}_{data.shot}shot"
    if data.get("support_control", "none") != "none":
        name += f"_{data.support_control}"
    return name + (f"_seed{data.seed}" if data.seed else "")


def training_run_of(cfg: Namespace) -> Path | None:
    """The training run whose saved ``config.yaml`` is the first config given (``--ckpt`` without ``--config`` adds
    it): its folder, which holds ``checkpoints/``; None otherwise."""
    configs = list(cfg.get("config") or [])
    if not configs:
        return None
    first = Path(str(configs[0]))
    return first.parent if first.name == "config.yaml" and (first.parent / "checkpoints").is_dir() else None


def holds_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` is a training run's: it holds a checkpoint (``checkpoints/`` with a file in it)."""
    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and any(ckpts.iterdir())


class FssegCLI(LightningCLI):
    """LightningCLI with fsseg's rules (see the module docstring); ``overwrite`` is ``--overwrite``; ``run_dir``,
    for the commands that run tests into folders of their own layout (`fsseg.seeds`, `fsseg.demo`,
    `fsseg.reproduce`), is the exact folder of this run (set as its logger's save_dir and version; a TensorBoard or CSV logger)."""

    def __init__(
        self, *args, overwrite: bool = False, run_dir: Path | None = None, reuse=None, **kwargs
    ) -> None:
        self.overwrite = overwrite
        self.reuse = reuse  # an earlier evaluation of the same model settings and checkpoint (`run_cli`)
        self.fixed_run_dir = run_dir
        self.checkpoint: dict | None = None  # read from --ckpt_path until it has been checked
        self.trained_data: dict | None = (
            None  # the checkpoint's datamodule_hyper_parameters (None: not saved)
        )
        self.start_step = 0  # the global step the checkpoint was saved at
        self.setting_notes: list[str] = []
        self.run_dir: Path | None = None
        self.output: OutputFolder | None = None  # this run's hold on run_dir (rank 0)
        self.given_accumulation: int | None = (
            None  # trainer.accumulate_grad_batches as given, None when unset
        )
        self.given_precision: str | None = None  # --trainer.precision on a validate/test command line
        # after ``test``: the results (also in metrics.json, episodes.jsonl)
        self.report: Report | None = None
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `predict`: `fsseg predict-images` segments your own images, `fsseg test` records every episode
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--no_ckpt",
            type=bool,
            default=False,
            help="test/validate without a checkpoint: the model as its config builds it (recorded)",
        )
        parser.add_argument(
            "--allow_trained_classes",
            type=bool,
            default=False,
            help="test/validate a checkpoint on classes it was trained on (refused otherwise; recorded)",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=CHECKPOINT_EVERY_N_STEPS,
            help="fit: optimizer steps between two writes of the resumable checkpoints/last.ckpt (0: epoch ends only)",
        )

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub == "fit" and isinstance(args, list):
            # what the configs and the command line set, without defaults: an explicit accumulate_grad_batches 1
            # is not the Trainer's default 1 (see `_check_accumulation`)
            given = parser.parse_args(args, defaults=False)[sub]
            self.given_accumulation = given.get("trainer.accumulate_grad_batches")
            try:
                note = derive_schedule_length(self.config[sub], given)
            except ValueError as err:
                raise RunRefused(str(err)) from None
            if note is not None:
                _say(f"fsseg fit: {note}")
        if sub in ("validate", "test") and isinstance(args, list):  # see `eval_precision_conflict`
            for i, arg in enumerate(args):
                name, eq, value = arg.partition("=")
                if name == "--trainer.precision" and (eq or i + 1 < len(args)):
                    self.given_precision = value if eq else args[i + 1]

    def _check_accumulation(self) -> None:
        """``data.effective_batch_size`` derives the accumulation at fit: an explicit, different
        ``trainer.accumulate_grad_batches`` is refused by name instead of being replaced (1 included, which the
        data module alone cannot tell from the Trainer's default)."""
        cfg = self.config[self.subcommand]
        effective = cfg.data.get("effective_batch_size")
        if self.subcommand != "fit" or effective is None or self.given_accumulation is None:
            return
        try:
            accumulation_steps(
                effective, self.trainer.world_size, cfg.data.batch_size, self.given_accumulation
            )
        except ValueError as err:
            raise RunRefused(str(err)) from None

    # ---- the checkpoint gives weights, the config gives settings -------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which overwrites the parsed model settings with the checkpoint's."""
        sub = self.config.get("subcommand")
        if sub is None:
            return
        cfg = self.config[sub]
        path = cfg.get("ckpt_path")
        if sub != "fit" and not path and not cfg.no_ckpt:
            raise RunRefused(
                f"no checkpoint given: {sub} would evaluate freshly initialised weights. Give --ckpt PATH, or "
                f"--no_ckpt to evaluate the model as the config builds it (e.g. with released weights it names)"
            )
        if path and cfg.no_ckpt:
            raise RunRefused(f"--no_ckpt contradicts --ckpt_path {path}")
        if not path:
            return
        if path in ("last", "best", "hpc", "registry"):
            raise RunRefused(
                f"--ckpt_path {path}: give the checkpoint file (e.g. runs/x/version_0/checkpoints/last.ckpt)"
            )
        if self.reuse is not None:  # the earlier evaluation read and checked it, and holds its weights
            if (
                sub == "fit"
                or self.reuse.subcommand == "fit"
                or self.reuse.config[self.reuse.subcommand].ckpt_path != path
            ):
                raise RunRefused(
                    "a run reuses the model of an earlier evaluation of the same checkpoint only"
                )
            self.trained_data, self.setting_notes = self.reuse.trained_data, self.reuse.setting_notes
            return
        self.checkpoint = read_checkpoint(path)
        self.trained_data = self.checkpoint.get("datamodule_hyper_parameters")
        model = cfg.model
        init_args = model.init_args.as_dict() if isinstance(model.get("init_args"), Namespace) else {}
        cls = _import(model.class_path)
        self.setting_notes = compare_model_config(
            self.checkpoint, path, model.class_path, init_args, getattr(cls, "architecture_args", ())
        )
        run = Path(path).absolute().parent.parent  # <run>/checkpoints/<file>
        try:
            check_complete(run)
        except IncompleteFolder as err:
            if not err.running:  # the run that wrote it was killed: say so, use the checkpoint anyway
                _say(
                    f"fsseg {sub}: note: {run}, the run that wrote {Path(path).name}, stopped before finishing "
                    f"(killed?); the checkpoint itself is complete (fsseg writes checkpoints atomically)"
                )

    def instantiate_classes(self) -> None:
        with self._released_on_error():
            if self.reuse is not None:
                self._instantiate_around_the_given_model()
                return
            try:
                super().instantiate_classes()
            # a class failed to build; jsonargparse wraps its error in a long report
            except ValueError as err:
                if not str(err).startswith("Does not validate against any of the Union subtypes"):
                    raise
                raise RunRefused(condense_parse_error(str(err))) from err

    def _instantiate_around_the_given_model(self) -> None:
        """The data module and trainer as parsed, the model of an earlier evaluation (`run_cli`'s ``reuse``) of the
        same model settings and checkpoint (`fsseg.seeds`: one build, one read of the checkpoint, for every seed),
        checked to have the parsed class and settings."""
        sub, model = self.subcommand, self.reuse.model
        cfg = self.config[sub]
        parsed = cfg.model.init_args.as_dict() if isinstance(cfg.model.get("init_args"), Namespace) else {}
        if _import(cfg.model.class_path) is not type(model):
            raise RunRefused(
                f"the given model is a {type(model).__name__}, the settings name {cfg.model.class_path}"
            )
        differs = sorted(
            k
            for k, v in parsed.items()
            if k not in ("optimizer", "scheduler") and _plain(model.hparams.get(k)) != _plain(v)
        )
        if differs:
            raise RunRefused(f"the given model was built with other settings: {', '.join(differs)}")
        model_cfg, cfg["model"] = cfg.model, model  # an instance: jsonargparse keeps it as it is
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        finally:
            cfg["model"] = model_cfg
        self.datamodule = self._get(self.config_init, "data")
        self.model = model
        self.trainer = self.instantiate_trainer()

    # ---- naming, output policy, callbacks ------------------------------------------------------------------------
    def _place(self, sub: str, cfg: Namespace, args: Namespace) -> None:
        """Set the logger's save_dir / name / version by fsseg's rule (README: Where results go)."""
        trained = training_run_of(cfg)
        given = args.get("version")
        args.name = run_name(cfg, args.get("name"))
        if trained is not None:  # a training run's config.yaml: beside that run, wherever the command runs
            later = [Path(str(c)).stem for c in list(cfg.config)[1:]]
            args.save_dir = str(trained.parent.parent)
            args.name = trained.parent.name + "".join(f"+{s}" for s in dict.fromkeys(later) if s != "config")
        if sub != "fit":  # an evaluation: always its own folder, named by what was evaluated
            args.version = evaluation_version(sub, cfg.data)
            if given is not None and str(given) != args.version:
                _say(
                    f"fsseg {sub}: the config's logger version {given!r} is not used: an evaluation always goes "
                    f"to {Path(args.save_dir) / args.name / args.version} (never into a training run's folder)"
                )
        elif (
            trained is not None and (given if isinstance(given, str) else f"version_{given}") == trained.name
        ):
            args.version = (
                None  # the saved version is the checkpoint's own run: a new version folder beside it
            )
            _say(
                f"fsseg fit: a new version folder beside {trained}, the run of the checkpoint (never into it)"
            )

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        init_args = cfg.model.get("init_args") if isinstance(cfg.get("model"), Namespace) else None
        conflict = eval_precision_conflict(
            init_args.get("eval_precision") if isinstance(init_args, Namespace) else None,
            self.given_precision,
        )
        if conflict is not None:  # before the run folder is claimed and the model built
            raise RunRefused(conflict)
        for note in self.setting_notes:
            _say(f"fsseg {sub}: setting differs from the checkpoint's run, used as given: {note}")
        logger = cfg.trainer.get("logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path")).endswith(_LOGGERS_WITH_VERSION):
            args = logger.init_args
            if self.fixed_run_dir is None:
                self._place(sub, cfg, args)
            else:  # exactly this folder
                args.save_dir, args.name, args.version = (
                    str(self.fixed_run_dir.parent),
                    "",
                    self.fixed_run_dir.name,
                )
            version = args.get("version")
            if version is not None:
                folder = version if isinstance(version, str) else f"version_{version}"
                self.run_dir = Path(args.save_dir) / (args.name or "") / folder
        elif self.fixed_run_dir is not None:
            raise RunRefused(f"{self.fixed_run_dir}: this run's folder needs a TensorBoard or CSV logger")
        if self.run_dir is not None:
            self._claim()  # before the (slow) model build
        # the weights are loaded from this command's one read of the checkpoint (`after_instantiate_classes`), not
        # by Lightning from ckpt_path: the report records the path itself
        weights = (
            {"no_ckpt": True}
            if cfg.no_ckpt
            else {"ckpt_path": os.path.abspath(cfg.ckpt_path)}
            if cfg.ckpt_path
            else {}
        )
        report = TestReport(weights if sub == "test" else {})
        callbacks: list = [report]
        if sub == "fit":
            callbacks.append(RunCheckpoint(cfg.checkpoint_every_n_steps))
        elif self.checkpoint is not None:
            callbacks.append(
                TrainedClassesCheck(self.trained_data, cfg.ckpt_path, cfg.allow_trained_classes, report)
            )
        self.trainer_defaults["callbacks"] = callbacks

    def after_instantiate_classes(self) -> None:
        with self._released_on_error():
            self._check_accumulation()
            if self.checkpoint is not None:
                path = self.config[self.subcommand].ckpt_path
                # fit: checked here, Lightning restores it (weights, optimiser, loops)
                if self.subcommand == "fit":
                    skip = getattr(self.model, "_is_frozen_key", lambda key: False)
                    compare_state_dict(self.checkpoint, path, self.model, skip)
                else:  # an evaluation needs only the weights: from this one read
                    load_weights(self.model, self.checkpoint, path)
                self.start_step = int(self.checkpoint.get("global_step", 0))
                self.checkpoint = None  # do not hold the mapped file
            strategy = self.trainer.strategy
            if type(strategy.checkpoint_io) is TorchCheckpointIO:  # a plugin given in the config is kept
                strategy.checkpoint_io = AtomicCheckpointIO()
            loggers = self.trainer.loggers
            if self.run_dir is None:  # rank-local (no collective): the folder the logger will write
                self.run_dir = Path(
                    loggers[0].log_dir if loggers and loggers[0].log_dir else self.trainer.default_root_dir
                )
                self._claim()
        _say(f"fsseg {self.subcommand}: writing to {self.run_dir}")

    def _claim(self) -> None:
        """Hold this run's folder (one writer; a stale lock taken over) and refuse what it must not write over: a
        training run's checkpoints (never, by any command), an earlier run's results (unless ``--overwrite``, which
        sets them aside until this run has succeeded; for ``fit`` it removes them: they are those of a run that
        saved no checkpoint)."""
        if rank_zero_only.rank != 0:  # other ranks start after rank 0 has checked, and never write these
            return
        sub, d = self.subcommand, self.run_dir
        self.output = OutputFolder(d, f"fsseg {sub}", what="run folder", say=_say).acquire()
        with self._released_on_error():
            if holds_checkpoints(d):
                what = "a fit never writes into another run's folder"
                if sub != "fit":
                    what = "evaluation results never go into a training run's folder"
                raise OutputExists(
                    f"{d} holds the checkpoints of a training run: {what}, and no fsseg command removes "
                    f"checkpoints (--overwrite included); give another trainer.logger version, or move it away"
                )
            earlier = self.output.present(RUN_FILES)
            if earlier and not self.overwrite:
                more = f" (and {len(earlier) - 1} more)" if len(earlier) > 1 else ""
                raise OutputExists(
                    f"{d / earlier[0]}{more} already exists: pass --overwrite to replace the earlier run's results "
                    f"(they are kept until this run has succeeded), or choose another output location"
                )
            if sub == "fit":  # what a fit left that saved no checkpoint (config.yaml, logs)
                for name in earlier:
                    (d / name).unlink()
            else:
                self.output.set_aside(earlier)
                self.output.writes(RUN_FILES)

    @contextlib.contextmanager
    def _released_on_error(self):
        try:
            yield
        except BaseException:
            self._finish(ok=False)
            raise

    def _finish(self, ok: bool) -> None:
        """Release this run's folder: on success drop the earlier results it replaced; on failure remove what it
        wrote and put them back (``fit``: keep a folder that holds a checkpoint or a trained step)."""
        out, self.output = self.output, None
        if out is None:
            return
        if ok:
            out.commit()
        elif self.subcommand == "fit":
            out.release()
            self._remove_if_empty(out.created)
        else:
            out.abandon()

    def _run_subcommand(self, subcommand: str) -> None:
        warn = warnings.catch_warnings() if subcommand != "fit" else contextlib.nullcontext()
        with self._released_on_error(), warn:
            if subcommand != "fit":  # the callbacks of the training run do not matter to an evaluation
                warnings.filterwarnings(
                    "ignore", message="Be aware that when using `ckpt_path`, callbacks used"
                )
            try:
                super()._run_subcommand(subcommand)
            except SIGTERMException:
                self._say_stopped("SIGTERM")
                raise Interrupted(signal.SIGTERM) from None
            except SystemExit:
                if not self.trainer.interrupted:
                    raise
                self._say_stopped("SIGINT")  # Lightning turned the KeyboardInterrupt into sys.exit(1)
                raise KeyboardInterrupt from None
            self._finish(ok=True)  # inside: a signal before the results are committed undoes them
        self._say_done()

    def _say_stopped(self, signame: str) -> None:
        if self.subcommand != "fit":
            _say(f"fsseg {self.subcommand}: stopped by {signame}: no result written")
            return
        step, ckpt = self.trainer.global_step, self.last_checkpoint
        saved = torch_load_step(ckpt) if ckpt else None
        if saved is None:
            _say(f"fsseg fit: stopped by {signame} at step {step}, before any checkpoint was written")
        else:
            _say(
                f"fsseg fit: stopped by {signame} at step {step}; resumable checkpoint (step {saved}): {ckpt}; resume "
                f"with the same configs and --ckpt_path {ckpt}"
            )

    def _remove_if_empty(self, created: list[Path]) -> None:
        """Remove the run folder this command created if it holds no result: no checkpoint, no report, no step."""
        created = [p.absolute() for p in created]
        if rank_zero_only.rank != 0 or not created or created[0] != self.run_dir.absolute():
            return
        d = created[0]
        trainer = getattr(self, "trainer", None)  # None: refused before the Trainer was built
        trained = trainer is not None and trainer.global_step > self.start_step
        if not d.is_dir() or trained or any(d.glob("checkpoints/*.ckpt")) or (d / "metrics.json").exists():
            return
        shutil.rmtree(d)
        for parent in created[1:]:  # the folders above it that this run created, while empty
            if not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()

    # ---- evaluation: the weights are loaded already (one read of the checkpoint) ---------------------------------
    def test(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        """``fsseg test``: `fsseg.runs.test` in this command's trainer; the `Report` is ``self.report``."""
        self.report = run_test(model, datamodule, trainer=self.trainer)

    def validate(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        self.trainer.validate(model, datamodule=datamodule, **kwargs)

    # ---- results -----------------------------------------------------------------------------------------------
    @property
    def last_checkpoint(self) -> str | None:
        """After ``fit``: the run's newest resumable checkpoint (``checkpoints/last.ckpt``)."""
        found = [c.last_model_path for c in self.trainer.callbacks if isinstance(c, RunCheckpoint)]
        return (found[0] or None) if found else None

    def after_fit(self) -> None:
        steps = self.trainer.global_step - self.start_step
        if steps <= 0:
            raise NothingDone(
                "nothing was trained: 0 optimizer steps (the checkpoint's run already reached trainer.max_steps "
                "/ max_epochs, or the training set or trainer.limit_train_batches is empty)"
            )

    def after_validate(self) -> None:
        if not sum(self.trainer.num_val_batches):
            raise NothingDone(
                "nothing was validated: 0 validation batches (trainer.limit_val_batches 0, as the demo configs "
                "set, or data.val_episodes 0); give --trainer.limit_val_batches 1.0"
            )

    def _say_done(self) -> None:
        """The last line of a run that succeeded: what it did and where the results are."""
        sub = self.subcommand
        if sub == "fit":
            steps = self.trainer.global_step - self.start_step
            _say(
                f"fsseg fit: {steps} optimizer steps; weights in {self.last_checkpoint}; config.yaml and "
                f"TensorBoard logs in {self.run_dir}"
            )
        elif sub == "validate":
            m = self.trainer.callback_metrics
            values = ", ".join(f"{k} {float(m[k]):.2f}" for k in ("val/miou", "val/fbiou") if k in m)
            _say(f"fsseg validate: {values}; config.yaml and logs in {self.run_dir}")
        elif self.report is not None and self.report.folder is not None:
            r = self.report
            _say(
                f"fsseg test: mIoU {r.miou:.2f}, FB-IoU {r.fbiou:.2f} over {len(r.records)} episodes -> "
                f"{r.folder / 'metrics.json'}, episodes.jsonl"
            )


def torch_load_step(path: str) -> int | None:
    """The global step a checkpoint was saved at (None when unreadable)."""
    try:
        return int(read_checkpoint(path).get("global_step", 0))
    except (OSError, ValueError):
        return None


def run_cli(
    argv: list[str], run_dir: Path | None = None, cli_class: type[FssegCLI] | None = None, reuse=None
) -> FssegCLI:
    """Run one ``fsseg fit|validate|test`` command in this process; returns the finished `FssegCLI`.

    ``run_dir``: write this run into exactly that folder (for commands with their own folder layout), instead of
    the folder fsseg's rule derives. A command line that does not parse raises `RunRefused` with jsonargparse's
    report condensed to one line. ``cli_class``: a `FssegCLI` subclass to run instead (``fsseg plan`` parses with
    one that builds nothing). ``reuse``: for ``test`` / ``validate``, an earlier evaluation's `FssegCLI` of the same
    model settings and checkpoint (`fsseg.seeds` across seeds): its model (weights loaded) is used, not built or
    read again.
    """
    try:
        return _run_cli(argv, run_dir, cli_class or FssegCLI, reuse)
    except ArgumentError as err:
        sub = argv[0] if argv and argv[0] in SUBCOMMANDS else ""
        raise RunRefused(f"{condense_parse_error(str(err))} (see `fsseg {sub} --help`)") from None


class ParseOnly(FssegCLI):
    """A command's parsing (configs, overlays, command-line keys, shorthands, the checks made while parsing: the
    schedule's length, unknown keys), with nothing built, claimed or run."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_command(argv: list[str]) -> Namespace:
    """The settings ``fsseg <argv>`` (``fit`` / ``validate`` / ``test`` first) would run with, nothing built."""
    return run_cli(argv, cli_class=ParseOnly).config[argv[0]]


def _run_cli(argv: list[str], run_dir: Path | None, cli_class: type[FssegCLI], reuse=None) -> FssegCLI:
    argv, overwrite = expand_shorthands(list(argv))
    quiet_third_party()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # given on purpose
    parser_kwargs = {sub: {"description": HELP[sub], "exit_on_error": False, "allow_abbrev": False}
                     for sub in SUBCOMMANDS}  # fmt: skip
    return cli_class(
        FewShotModule,
        FewShotDataModule,
        subclass_mode_model=True,
        args=argv,
        overwrite=overwrite,
        run_dir=Path(run_dir) if run_dir is not None else None,
        reuse=reuse,
        seed_everything_default=0,
        trainer_defaults={
            "default_root_dir": SAVE_DIR,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": SAVE_DIR, "name": None},
            },
        },
        # subcommand parsers take the main parser's formatter
        parser_kwargs={
            "exit_on_error": False,
            "allow_abbrev": False,
            "formatter_class": _HelpFormatter,
            **parser_kwargs,
        },
        save_config_kwargs={"overwrite": True},  # the folder was checked (and claimed) above
        auto_configure_optimizers=False,
    )


def condense_parse_error(message: str) -> str:
    """jsonargparse's multi-line report of a bad value as one line: the key, what is wrong, the value given.

    Also for a class that failed to build (its own error, e.g. missing weights, wrapped by jsonargparse).
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Does not validate against any of the Union subtypes"):
        subtypes = next((line for line in lines if line.startswith("Subtypes:")), "")
        name = "model" if "FewShotModule" in subtypes else "data" if "DataModule" in subtypes else "a setting"
        lines = [f'Parser key "{name}":', *lines]
    key = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    if key is None:
        return " ".join(lines)
    given = next(
        (ln.removeprefix("Given value:").strip() for ln in lines if ln.startswith("Given value:")), None
    )
    if given is not None and (len(given) > 60 or given.startswith(("Namespace(", "NestedArg("))):
        given = None  # a whole section: the problems name what is wrong
    problems, current = [], None
    for line in lines[1:]:
        if line.startswith(("Does not validate", "Subtypes:", "Errors:", "Given value")):
            current = None
        elif line.startswith("- "):
            current = None if "NoneType" in line else [line[2:]]
            if current is not None:
                problems.append(current)
        elif current is not None:
            current.append(line)
    what = "; ".join(" ".join(p) for p in problems) or " ".join(lines[1:])
    return f"{key.group(1)}: {what}" + (f" (given: {given})" if given else "")


def main(argv: list[str]) -> int:
    """``fsseg fit|validate|test ...`` (``argv`` starts with the subcommand)."""
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
