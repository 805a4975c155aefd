"""Episodes as tensors, reproducibility across loader layouts, and clear errors for bad data."""

import pytest
import torch

from fsseg.data import FewShotDataModule, PascalFewShot


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
