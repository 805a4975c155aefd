"""Episodes as tensors, reproducibility across loader layouts, and clear errors for bad data."""

import typing

import pytest
import torch
from torch.utils.data import default_collate

from fsseg.data import FewShotDataModule, PascalFewShot
from fsseg.episode import Episode, EpisodeBatch, fake_batch, unbatch


def make_dm(root, **kw):
    args = dict(
        root=str(root),
        benchmark="embedded",
        fold=0,
        shot=2,
        img_size=48,
        batch_size=4,
        eval_batch_size=3,
        val_episodes=12,
        test_episodes=12,
        train_episodes=16,
    )
    args.update(kw)
    return FewShotDataModule(**args)


def test_episode_tensors(small_embedded):
    ds = PascalFewShot(
        small_embedded,
        "test",
        fold=1,
        shot=2,
        img_size=48,
        eval_size=40,
        n_episodes=5,
        splits_dir=small_embedded / "splits",
    )
    ep = ds[0]
    assert ep["query_img"].shape == (3, 48, 48) and ep["query_img"].dtype == torch.float32
    assert 0 <= ep["query_img"].min() and ep["query_img"].max() <= 1
    assert ep["support_imgs"].shape == (2, 3, 48, 48) and ep["support_masks"].shape == (2, 48, 48)
    assert ep["query_mask_eval"].shape == (40, 40)
    assert set(ep["query_mask"].unique().tolist()) <= {0, 1, 255} and (ep["query_mask"] == 1).any()
    assert int(ep["class_id"]) in range(5, 10) and ds.class_ids() == [5, 6, 7, 8, 9]
    original = PascalFewShot(
        small_embedded,
        "test",
        fold=1,
        eval_size="original",
        n_episodes=1,
        splits_dir=small_embedded / "splits",
    )
    assert original[0]["query_mask_eval"].shape == (64, 64)


def test_episodes_and_fake_batches_hold_the_contracts_keys(small_embedded):
    """A dataset's episode has every required key of `fsseg.episode.Episode` and no key it does not declare; the
    one test factory, `fake_batch`, gives what the default collate makes of such episodes."""
    required = {k for k in Episode.__annotations__ if k in Episode.__required_keys__}
    dm = make_dm(small_embedded)
    dm.setup("test")
    ep = dm.datasets["test"][0]
    assert required <= set(ep) <= set(Episode.__annotations__)
    batch = next(iter(dm.test_dataloader()))
    fake = fake_batch(3, 2, size=48)
    assert set(fake) == set(batch) and set(fake) <= set(EpisodeBatch.__annotations__)
    for key in fake:
        if torch.is_tensor(batch[key]):
            assert fake[key].dtype == batch[key].dtype and fake[key].shape[1:] == batch[key].shape[1:], key
    collated = default_collate(unbatch(fake))  # unbatch: the episodes of a batch
    assert all(torch.equal(collated[k], fake[k]) for k in fake if torch.is_tensor(fake[k]))
    assert [list(names) for names in collated["support_names"]] == fake["support_names"]
    assert typing.get_type_hints(Episode)["query_img"] is torch.Tensor
    mine = torch.zeros(3, 48, 48, dtype=torch.long)
    assert fake_batch(3, size=48, query_mask=mine)["query_mask"] is mine  # an episode's own tensors
    with pytest.raises(KeyError, match="query_image"):
        fake_batch(query_image=mine)


def _names(loader):
    return [(n, tuple(s)) for b in loader for n, *s in zip(b["query_name"], *b["support_names"])]


def test_training_episodes_same_for_any_worker_count_and_differ_per_epoch(small_embedded):
    runs = []
    for workers in (0, 2):
        dm = make_dm(small_embedded, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(0)
        e0 = _names(loader)
        loader.sampler.set_epoch(1)
        runs.append((e0, _names(loader)))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]
    # training folds only: fold 0's test classes (0..4) never appear in training
    dm = make_dm(small_embedded)
    dm.setup("fit")
    assert all(int(dm.datasets["trn"][i]["class_id"]) >= 5 for i in range(16))


def test_eval_episodes_same_for_any_batch_size_or_workers(small_embedded):
    seqs = []
    for bs, workers in ((1, 0), (5, 2)):
        dm = make_dm(small_embedded, eval_batch_size=bs, num_workers=workers)
        dm.setup("test")
        seqs.append(_names(dm.test_dataloader()))
    assert seqs[0] == seqs[1] and len(seqs[0]) == 12


def test_missing_root_and_unknown_benchmark(tmp_path):
    dm = FewShotDataModule(root=str(tmp_path / "nowhere"), benchmark="pascal5i")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup("test")
    with pytest.raises(ValueError, match="unknown benchmark 'pascal'"):
        FewShotDataModule(root=str(tmp_path), benchmark="pascal")


def test_missing_and_corrupt_files_are_named(small_embedded, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(small_embedded, root)
    ds = PascalFewShot(root, "test", fold=0, shot=1, img_size=32, n_episodes=3, splits_dir=root / "splits")
    ep = ds.episodes[0]
    mask = root / "VOC2012" / "SegmentationClassAug" / f"{ep.query}.png"
    mask.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"mask file .*{ep.query}.png is unreadable or corrupt"):
        ds[0]
    image = root / "VOC2012" / "JPEGImages" / f"{ep.query}.jpg"
    image.unlink()
    with pytest.raises(FileNotFoundError, match=f"image file .*{ep.query}.jpg is missing"):
        ds[0]


def test_bad_split_list_line_is_named(small_embedded, tmp_path):
    (tmp_path / "pascal5i" / "val").mkdir(parents=True)
    (tmp_path / "pascal5i" / "val" / "fold0.txt").write_text("2001_000000__01\n2001_000001__99\n")
    with pytest.raises(ValueError, match=r"fold0.txt:2: expected IMAGEID__CLASS"):
        PascalFewShot(small_embedded, "test", fold=0, splits_dir=tmp_path)


def test_supports_never_equal_query(small_embedded):
    ds = PascalFewShot(
        small_embedded, "test", fold=2, shot=5, n_episodes=40, splits_dir=small_embedded / "splits"
    )
    assert all(ep.query not in ep.supports for ep in ds.episodes)
    tr = PascalFewShot(small_embedded, "trn", fold=2, shot=3, splits_dir=small_embedded / "splits")
    eps = [tr.episode(i) for i in range(30)]
    assert all(ep.query not in ep.supports for ep in eps)
    assert eps == [tr.episode(i) for i in range(30)]  # per-index generator: same again
    assert (
        {tr.episode(i).class_id for i in range(len(tr))}
        == set(tr.class_ids())
        == set(range(20)) - set(range(10, 15))
    )


# ---- effective batch ------------------------------------------------------------------------------------------------
def test_accumulation_arithmetic():
    from fsseg.data.datamodule import accumulation_steps

    assert (
        accumulation_steps(16, 1, 1) == 16
        and accumulation_steps(16, 2, 1) == 8
        and accumulation_steps(16, 4, 1) == 4
    )
    assert (
        accumulation_steps(4, 1, 1) == 4
        and accumulation_steps(4, 2, 1) == 2
        and accumulation_steps(4, 4, 1) == 1
    )
    assert accumulation_steps(8, 2, 2) == accumulation_steps(8, 1, 4) == 2  # 2 processes x 2 = 1 process x 4
    with pytest.raises(
        ValueError, match=r"effective_batch_size 4 is not a multiple of 8 process\(es\) x data.batch_size 1"
    ):
        accumulation_steps(4, 8, 1)
    with pytest.raises(ValueError, match="effective_batch_size 16 is not a multiple of 3 process"):
        accumulation_steps(16, 3, 1)
    with pytest.raises(ValueError, match="effective_batch_size"):
        FewShotDataModule(effective_batch_size=0)
    assert accumulation_steps(8, 1, 2, given=4) == 4  # an explicit accumulation that agrees is used
    with pytest.raises(ValueError, match="accumulate_grad_batches 1 was given, .* needs 4"):
        accumulation_steps(8, 1, 2, given=1)


def test_effective_batch_sets_the_accumulation_of_a_fit(tmp_path, small_embedded):
    """16 episodes per epoch, batch 2, effective batch 8: accumulation 4, so 2 optimizer steps (8 without it)."""
    from test_cli import write_config

    from fsseg.cli.trainer import run_cli

    cfg = write_config(tmp_path, small_embedded)
    common = ["fit", "--config", str(cfg), "--data.batch_size", "2"]
    fit = run_cli([*common, "--data.effective_batch_size", "8"])
    assert fit.trainer.accumulate_grad_batches == 4 and fit.trainer.global_step == 2
    assert run_cli(common).trainer.global_step == 8  # null: the trainer's own accumulation (1)
    # an explicit accumulation that differs from the derived one is refused by name, 1 (the Trainer's default)
    # included, from the command line or a config file; an explicit one that agrees is used
    for given in ("2", "1"):
        with pytest.raises(
            ValueError,
            match=f"trainer.accumulate_grad_batches {given} was given, but data.effective_batch_size 8",
        ):
            run_cli([*common, "--data.effective_batch_size", "8", "--trainer.accumulate_grad_batches", given])
    overlay = tmp_path / "acc1.yaml"
    overlay.write_text("trainer:\n  accumulate_grad_batches: 1\ndata:\n  effective_batch_size: 8\n")
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches 1 was given"):
        run_cli([*common, "--config", str(overlay)])
    agreed = run_cli([*common, "--data.effective_batch_size", "8", "--trainer.accumulate_grad_batches", "4"])
    assert agreed.trainer.accumulate_grad_batches == 4 and agreed.trainer.global_step == 2
    with pytest.raises(
        ValueError, match="effective_batch_size 6 is not a multiple of 1 process\\(es\\) x data.batch_size 4"
    ):
        run_cli(["fit", "--config", str(cfg), "--data.effective_batch_size", "6"])


@pytest.mark.slow
def test_effective_batch_same_optimizer_steps_on_two_ddp_processes(tmp_path, small_embedded):
    """2 CPU processes x batch 2 at effective batch 8 accumulate 2: the same 2 optimizer steps as one process."""
    from test_cli import _fsseg, write_config

    cfg = write_config(tmp_path, small_embedded)
    steps = {}
    for name, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        _fsseg("fit", "--config", str(cfg), "--data.batch_size", "2", "--data.effective_batch_size", "8",
               "--trainer.logger.init_args.name", name, *extra, cwd=tmp_path)  # fmt: skip
        ckpt = tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"
        steps[name] = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert steps == {"one": 2, "ddp": 2}
