"""The DiffewS training latent cache: the cached posteriors are the VAE's, training from them draws the same latents
(same seed, same loss) as live encoding, the cache is memory-mapped, refuses other inputs by name, and `fsseg fit`
builds and uses it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fsseg.cli import main as fsseg_main
from fsseg.cli.trainer import run_cli
from fsseg.data.base import image_to_tensor, load_rgb
from fsseg.data.datamodule import FewShotDataModule
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews import latent_cache as lc
from fsseg.models.diffews.inputs import binary_mask, mask_image
from fsseg.models.diffews.tiny import write_tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return str(write_tiny_sd(tmp_path_factory.mktemp("diffews_lc") / "sd", seed=0))


def datamodule(root: Path, shot: int = 2, fold: int = 0, img_size: int = 64, **kw) -> FewShotDataModule:
    kw = {"batch_size": 3, **kw}
    dm = FewShotDataModule(
        root=str(root), benchmark="embedded", fold=fold, shot=shot, img_size=img_size, **kw
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_embedded, sd_dir):
    """A cache of fold 0's training images and a module training from it."""
    folder = tmp_path_factory.mktemp("lc") / "cache"
    dm = datamodule(small_embedded)
    m = DiffewsModule(pretrained=sd_dir, latent_cache=str(folder))
    m.use_latent_cache(folder, dm.train_datasets())
    return folder, dm, m


def test_cache_holds_the_vae_posteriors_memory_mapped(built):
    folder, dm, m = built
    cache = m.latent_store
    assert isinstance(cache.moments, np.memmap) and cache.moments.dtype == np.float32
    ds = dm.datasets["trn"]
    pairs = {(k, c) for c in ds.class_ids() for k in ds.classwise[c]}
    assert set(cache.image_rows) == {k for k, _ in pairs}
    assert set(cache.mask_rows) == {f"{k}\t{c}" for k, c in pairs}
    assert cache.moments.shape == (len(cache.image_rows) + len(cache.mask_rows), 8, 32, 32)
    key, c = sorted(pairs)[3]
    with torch.no_grad():
        live = m.posterior(torch.stack([lc.load_image(ds, key), lc.load_mask_image(ds, key, c)])).parameters
    rows = [cache.image_rows[key], cache.mask_rows[f"{key}\t{c}"]]
    torch.testing.assert_close(torch.from_numpy(cache.moments[rows]), live, rtol=1e-5, atol=1e-5)
    # the mask image is the white-foreground image of that class, 255 (ignore) as background
    mask = ds.load_mask(key, c)
    assert (mask == 255).any() and set(np.unique(mask)) <= {0, 1, 255}
    expected = mask_image(binary_mask(torch.from_numpy(mask.astype(np.int64))))
    assert torch.equal(lc.load_mask_image(ds, key, c), expected)  # 64 px images: no resize


@pytest.mark.parametrize("train_shots", [None, 2], ids=["all_shots", "random_shots"])
def test_same_seed_same_latents_and_loss_as_live_encoding(built, sd_dir, train_shots):
    folder, dm, cached = built
    live = DiffewsModule(pretrained=sd_dir, train_shots=train_shots)
    cached.hparams.train_shots = train_shots
    live.load_state_dict(cached.state_dict())
    batch = next(iter(dm.train_dataloader()))
    assert batch["support_imgs"].shape[1] == 2
    seen = {}
    for name, m in (("live", live), ("cached", cached)):
        z: list[torch.Tensor] = []
        hook = m.unet.register_forward_pre_hook(lambda mod, args, z=z: z.append(args[0].detach().clone()))
        try:
            torch.manual_seed(123)
            loss = m.training_loss(batch)["loss"]
        finally:
            hook.remove()
        seen[name] = (loss.detach(), z[0])
    torch.testing.assert_close(seen["cached"][0], seen["live"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["cached"][1], seen["live"][1], rtol=1e-5, atol=1e-5)  # UNet input latents
    torch.manual_seed(124)  # another seed, other draws: the test above is not vacuous
    assert not torch.allclose(cached.training_loss(batch)["loss"], seen["live"][0], rtol=1e-4)
    cached.hparams.train_shots = None


def test_cached_latents_are_a_posterior_sample(built):
    """``encode_episode`` with cached moments draws ``mean + std * eps`` with the generator's next draws."""
    _, dm, m = built
    batch = next(iter(dm.train_dataloader()))
    idx = torch.arange(2)
    moments = m.latent_store.episode_moments(batch, idx, "concat")  # [3 + 3 + 6 + 6, 8, h, w]
    assert moments.shape[0] == 18
    q, s, sm = batch["query_img"], batch["support_imgs"], binary_mask(batch["support_masks"])
    torch.manual_seed(5)
    (z_q, z_mq), support = m.encode_episode(
        [q, mask_image(binary_mask(batch["query_mask"]))], s, sm, True, moments
    )
    torch.manual_seed(5)
    eps = torch.randn(18, 4, 32, 32)
    mean, logvar = moments.chunk(2, 1)
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) * m.scaling_factor
    ours = torch.cat(
        [z_q, z_mq, *support["x"].chunk(2, 1)]
    )  # rows: queries, query masks, supports, their masks
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_cache_refuses_other_inputs(built, sd_dir, small_embedded, tmp_path):
    folder, dm, m = built
    other_vae = DiffewsModule(pretrained=str(write_tiny_sd(tmp_path / "other", seed=3)))
    with pytest.raises(lc.LatentCacheMismatch, match="vae_sha256"):
        other_vae.use_latent_cache(folder, dm.train_datasets(), build_missing=False)
    with pytest.raises(
        lc.LatentCacheMismatch, match="entries_sha256"
    ):  # other split lists (fold 1's training)
        m.use_latent_cache(folder, datamodule(small_embedded, fold=1).train_datasets())
    with pytest.raises(lc.LatentCacheMismatch, match="img_size"):
        m.use_latent_cache(folder, datamodule(small_embedded, img_size=32).train_datasets())
    pil = datamodule(small_embedded, image_resize="pil").train_datasets()  # the released DiffewS input resize
    with pytest.raises(lc.LatentCacheMismatch, match="image_resize: cache 'torch', this run 'pil'"):
        m.use_latent_cache(folder, pil)
    (ds48,) = datamodule(small_embedded, img_size=48, image_resize="pil").train_datasets()
    key = ds48.keys()[0]
    assert torch.equal(lc.load_image(ds48, key), image_to_tensor(load_rgb(ds48.image_path(key)), 48, "pil"))
    ds = dm.datasets["trn"]
    image = ds.image_path(ds.keys()[0])
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the data changed
    try:
        with pytest.raises(lc.LatentCacheMismatch, match="files_sha256.*delete the folder"):
            m.use_latent_cache(folder, dm.train_datasets())
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    m.use_latent_cache(folder, dm.train_datasets())  # unchanged again: accepted
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.use_latent_cache(tmp_path / "none", dm.train_datasets(), build_missing=False)


@pytest.mark.parametrize(
    "kw,name",
    [({"supervision": "real_fg"}, "supervision='real_fg'"), ({"injection": "add"}, "injection='add'")],
)
def test_unsupported_variants_are_refused_by_name(sd_dir, tmp_path, kw, name):
    with pytest.raises(ValueError, match=name):
        DiffewsModule(pretrained=sd_dir, latent_cache=str(tmp_path / "c"), **kw)


def fit_args(sd_dir: str, root: Path, tmp: Path, cache: Path) -> list[str]:
    return [
        "--model",
        "fsseg.models.diffews.DiffewsModule",
        f"--model.init_args.pretrained={sd_dir}",
        f"--model.init_args.latent_cache={cache}",
        "--data.benchmark=embedded",
        f"--data.root={root}",
        "--data.img_size=64",
        "--data.batch_size=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp}",
        "--trainer.logger=false",
    ]


def test_fit_builds_then_uses_the_cache(sd_dir, small_embedded, tmp_path):
    cache = tmp_path / "cache"
    cli = run_cli(["fit", *fit_args(sd_dir, small_embedded, tmp_path, cache)])
    assert cli.trainer.global_step == 2
    assert cli.model.latent_store is not None and cli.model.latent_store.folder == cache
    stamp = (cache / lc.MOMENTS).stat().st_mtime_ns
    fingerprint = json.loads((cache / lc.FINGERPRINT).read_text())
    assert fingerprint["img_size"] == 64 and fingerprint["benchmarks"] == ["embedded"]
    # a second run, in bf16 from the command line, reads the cache and writes nothing to it
    bf16 = ["--trainer.precision=bf16-mixed"]
    second = run_cli(["fit", *fit_args(sd_dir, small_embedded, tmp_path / "second", cache), *bf16])
    assert (cache / lc.MOMENTS).stat().st_mtime_ns == stamp
    assert second.trainer.precision == "bf16-mixed" and second.trainer.global_step == 2
    # `fsseg test` in bf16 from the same command line: the result records its precision
    args = [a for a in fit_args(sd_dir, small_embedded, tmp_path / "test", cache) if "max_steps" not in a]
    ckpt = second.last_checkpoint
    tested = run_cli(["test", *args, *bf16, "--data.test_episodes=4", f"--ckpt_path={ckpt}"])
    metrics = json.loads((Path(tested.trainer.default_root_dir) / "metrics.json").read_text())
    assert metrics["precision"] == "bf16-mixed" and metrics["episodes"] == 4


def test_cache_latents_command(sd_dir, small_embedded, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = [a for a in fit_args(sd_dir, small_embedded, tmp_path, cache) if not a.startswith("--trainer.")]
    with pytest.raises(SystemExit) as exit_:
        fsseg_main(["cache-latents", *args])
    assert exit_.value.code == 0
    assert (cache / lc.FINGERPRINT).is_file() and str(cache) in capsys.readouterr().out
    stamp = (cache / lc.MOMENTS).stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_:  # an existing cache is checked, not rebuilt
        fsseg_main(["cache-latents", *args])
    assert exit_.value.code == 0 and (cache / lc.MOMENTS).stat().st_mtime_ns == stamp
    no_folder = [a for a in args if not a.startswith("--model.init_args.latent_cache")]
    with pytest.raises(SystemExit) as exit_:
        fsseg_main(["cache-latents", *no_folder])
    assert exit_.value.code == 2 and "latent_cache" in capsys.readouterr().err


def test_cache_with_channel_permutation(small_embedded, sd_dir, tmp_path, built):
    """``data.train_augment: channel_permutation``: a row per image and permutation; training from the cache draws
    what live encoding of the permuted episode draws; a cache of the other setting is refused by name."""
    dm = datamodule(small_embedded, batch_size=6, train_augment="channel_permutation")
    folder = tmp_path / "cache"
    cached = DiffewsModule(pretrained=sd_dir, latent_cache=str(folder))
    cached.use_latent_cache(folder, dm.train_datasets())
    plain_images = len(built[2].latent_store.image_rows)
    assert len(cached.latent_store.image_rows) == 6 * plain_images
    assert len(cached.latent_store.mask_rows) == len(built[2].latent_store.mask_rows)
    batch = next(iter(dm.train_dataloader()))
    assert len(set(batch["colour_variant"].tolist())) > 1
    live = DiffewsModule(pretrained=sd_dir)
    live.load_state_dict(cached.state_dict())
    losses = []
    for m in (live, cached):
        torch.manual_seed(7)
        losses.append(m.training_loss(batch)["loss"].detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.manual_seed(7)  # the un-permuted rows give another loss: the lookup by colour_variant matters
    unpermuted = cached.training_loss({**batch, "colour_variant": torch.zeros_like(batch["colour_variant"])})
    assert not torch.allclose(unpermuted["loss"], losses[0], rtol=1e-4)
    with pytest.raises(
        lc.LatentCacheMismatch, match="train_augment: cache 'channel_permutation', this run 'none'"
    ):
        cached.use_latent_cache(folder, datamodule(small_embedded).train_datasets())
    with pytest.raises(
        lc.LatentCacheMismatch, match="train_augment: cache 'none', this run 'channel_permutation'"
    ):
        cached.use_latent_cache(built[0], dm.train_datasets())
