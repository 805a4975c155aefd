"""The ``fsseg`` command: LightningCLI over every method and the one DataModule.

    fsseg fit --config configs/baseline.yaml
    fsseg test --ckpt runs/baseline/version_0/checkpoints/last.ckpt --fold 2
    fsseg data check --root data
    fsseg predict-images --ckpt last.ckpt --support s.jpg --support-mask s.png --query photos/ --out preds/

Shorthands: ``--fold N`` is ``--data.fold N``; ``--ckpt PATH`` is ``--ckpt_path PATH`` and, when no ``--config``
is given, reads the ``config.yaml`` that the training run saved beside its checkpoints.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from fsseg.data.datamodule import FewShotDataModule
from fsseg.models.base import FewShotModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def find_run_config(ckpt: Path) -> Path:
    """The ``config.yaml`` of the run a checkpoint belongs to (its folder or up to two parents)."""
    if not ckpt.is_file():
        raise FileNotFoundError(f"--ckpt: checkpoint {ckpt} does not exist")
    for folder in [ckpt.parent, *list(ckpt.parents)[1:3]]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"--ckpt: no config.yaml beside {ckpt} or in its two parent folders; pass the run's config with --config"
    )


def expand_shorthands(argv: list[str]) -> list[str]:
    """Rewrite ``--fold N`` / ``--ckpt PATH`` (also ``--fold=N``) into LightningCLI arguments."""
    out: list[str] = []
    ckpt: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--fold", "--ckpt"):
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"fsseg: {name} needs a value")
                value, i = argv[i + 1], i + 1
            if name == "--fold":
                out += ["--data.fold", value]
            else:
                ckpt = value
                out += ["--ckpt_path", value]
        else:
            out.append(arg)
        i += 1
    has_config = any(a == "--config" or a.startswith("--config=") or a == "-c" for a in out)
    if ckpt is not None and not has_config and out and out[0] in SUBCOMMANDS:
        out[1:1] = ["--config", str(find_run_config(Path(ckpt)))]
    return out


def run_cli(argv: list[str]) -> LightningCLI:
    """Run one ``fsseg fit|validate|test|predict`` command in-process; returns the finished LightningCLI."""
    warnings.filterwarnings(
        "ignore", message="LightningCLI's args parameter is intended"
    )  # argv is given on purpose
    return LightningCLI(
        FewShotModule,
        FewShotDataModule,
        subclass_mode_model=True,
        args=expand_shorthands(argv),
        seed_everything_default=0,
        trainer_defaults={
            "default_root_dir": "runs",
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "fsseg"},
            },
            "callbacks": [ModelCheckpoint(save_last=True)],
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        from fsseg.data.tools import main as data_main

        raise SystemExit(data_main(argv[1:]))
    if argv and argv[0] == "predict-images":
        from fsseg.predict import main as predict_main

        raise SystemExit(predict_main(argv[1:]))
    if argv and argv[0] == "compare":
        from fsseg.compare import main as compare_main

        raise SystemExit(compare_main(argv[1:]))
    if argv and argv[0] == "evaluate-seeds":
        from fsseg.seeds import main as seeds_main

        raise SystemExit(seeds_main(argv[1:]))
    if argv and argv[0] == "demo":
        from fsseg.demo import main as demo_main

        raise SystemExit(demo_main(argv[1:]))
    run_cli(argv)


if __name__ == "__main__":
    main()
