"""``fsseg cache-latents``: build a DiffewS run's training latent cache (``model.init_args.latent_cache``) ahead of
``fsseg fit``, with the same configs and shorthands (``--config NAME``, ``--fold N``, ``--data.*``, ``--model.*``),
parsed by ``fsseg fit``'s own parser (`fsseg.cli.trainer.parse_command`); the model built by
`fsseg.runs.instantiate_model` (only its VAE is used).

``fit`` builds a missing cache itself at its start; building it first is advisable before a multi-process run of a
large dataset (the other processes wait for the build). An existing cache is opened and checked, never rebuilt.
See `fsseg.data.latent_cache` for what the cache holds and when it is refused.
"""

from __future__ import annotations

import sys

HELP = """usage: fsseg cache-latents [--config NAME] [--fold N] [--data.* / --model.* / --trainer.accelerator ...]

Encode every training image and mask image of a DiffewS run once, into model.init_args.latent_cache.

  fsseg cache-latents --config diffews --fold 0 --model.init_args.latent_cache cache/coco_fold0_512

The options are those of `fsseg fit` (fsseg fit --help), parsed and checked the same way; the model's VAE encodes
on --trainer.accelerator (default: a GPU when there is one).

Writes the folder (moments.npy, index.json, fingerprint.json) under a temporary name, renamed when complete; an
existing folder built from the same VAE, image size, split lists and data files is only checked, one built from
other inputs is refused with what differs. The temporary folder of a build that was killed is removed by the next."""


def main(argv: list[str] | None = None) -> int:
    """``fsseg cache-latents [--config X] [--fold N] [--data.* / --model.* / --trainer.accelerator ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    import lightning as L

    from fsseg.cli.trainer import RunRefused, parse_command
    from fsseg.data.datamodule import FewShotDataModule
    from fsseg.runs import TRAINING_ONLY, instantiate_model

    if "--overwrite" in argv:
        raise RunRefused("cache-latents never replaces a cache: delete the folder to rebuild it")
    if any(a.split("=")[0] in ("--ckpt", "--ckpt_path") for a in argv):
        raise RunRefused("cache-latents needs no checkpoint: the cache holds the frozen VAE's encodings")
    try:
        cfg = parse_command(["fit", *argv])
    except RunRefused as err:
        raise RunRefused(str(err).replace("`fsseg fit --help`", "`fsseg cache-latents --help`")) from None
    init = {k: v for k, v in cfg.model.init_args.as_dict().items() if k not in TRAINING_ONLY}
    folder = init.get("latent_cache")
    if folder is None:
        name = cfg.model.class_path.rpartition(".")[2]
        raise RunRefused(
            f"{name} has no latent cache folder: set --model.init_args.latent_cache (a DiffewS model)"
        )
    model = instantiate_model(cfg.model.class_path, init, source="the configs")
    dm = FewShotDataModule(**cfg.data.as_dict())
    dm.prepare_data()
    device = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, logger=False).strategy.root_device
    cache = dm.use_latent_cache(folder, **model.latent_encoder(), device=device)
    print(
        f"fsseg cache-latents: {len(cache.image_rows)} images, {len(cache.mask_rows)} mask images in {cache.folder}"
    )
    return 0
