"""``fsseg cache-latents``: build a DiffewS run's training latent cache (``model.init_args.latent_cache``) ahead of
``fsseg fit``, with the same configs and shorthands (``--config NAME``, ``--fold N``, ``--data.*``, ``--model.*``).

``fit`` builds a missing cache itself at its start; building it first is advisable before a multi-process run of a
large dataset (the other processes wait for the build). An existing cache is opened and checked, never rebuilt.
See `fsseg.models.diffews.latent_cache` for what the cache holds and when it is refused.
"""

from __future__ import annotations

import sys
import warnings

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from fsseg.cli.noise import quiet_third_party
from fsseg.cli.trainer import RunRefused, _HelpFormatter, condense_parse_error, expand_shorthands
from fsseg.data.datamodule import FewShotDataModule
from fsseg.models.base import FewShotModule

HELP = """Encode every training image and mask image of a DiffewS run once, into model.init_args.latent_cache.

  fsseg cache-latents --config diffews --fold 0 --model.init_args.latent_cache cache/coco_fold0_512

Writes the folder (moments.npy, index.json, fingerprint.json) under a temporary name, renamed when complete; an
existing folder built from the same VAE, image size, split lists and data files is only checked, one built from
other inputs is refused with what differs. The temporary folder of a build that was killed is removed by the next."""


def main(argv: list[str] | None = None) -> int:
    """``fsseg cache-latents [--config X] [--fold N] [--data.* / --model.* / --trainer.accelerator ...]``."""
    from fsseg.models.diffews.latent_cache import ensure

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--overwrite" in argv:
        raise RunRefused("cache-latents never replaces a cache: delete the folder to rebuild it")
    args, _ = expand_shorthands(argv)
    quiet_third_party()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        cli = LightningCLI(
            FewShotModule,
            FewShotDataModule,
            subclass_mode_model=True,
            args=args,
            run=False,
            trainer_defaults={"logger": False},
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                "formatter_class": _HelpFormatter,
                "description": HELP,
            },  # fmt: skip
            auto_configure_optimizers=False,
            save_config_callback=None,
        )
    except ArgumentError as err:
        raise RunRefused(f"{condense_parse_error(str(err))} (see `fsseg cache-latents --help`)") from None
    folder = getattr(cli.model.hparams, "latent_cache", None)
    if folder is None:
        raise RunRefused(
            f"{type(cli.model).__name__} has no latent cache folder: set --model.init_args.latent_cache "
            f"(a DiffewS model)"
        )
    dm = cli.datamodule
    dm.prepare_data()
    cache = ensure(
        folder,
        cli.model,
        dm.train_datasets(),
        device=cli.trainer.strategy.root_device,
        num_workers=dm.hparams.num_workers,
    )
    print(
        f"fsseg cache-latents: {len(cache.image_rows)} images, {len(cache.mask_rows)} mask images in {cache.folder}"
    )
    return 0
