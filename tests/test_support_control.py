"""Support-use controls (``data.support_control``): other-class supports and empty support masks keep every
episode's query, class and ground truth, are recorded in metrics.json / episodes.jsonl, and pair with the normal
run in ``fsseg compare``. The baseline, which segments from its support, falls under both controls."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsseg.data.pascal import PascalFewShot
from fsseg.data.protocol import control_episodes

N = 30


def _ds(bench, control, shot=1, seed=0):
    return PascalFewShot(
        bench,
        split="test",
        fold=1,
        shot=shot,
        img_size=64,
        n_episodes=N,
        seed=seed,
        splits_dir=bench / "splits",
        support_control=control,
    )


def test_other_class_keeps_query_and_replaces_supports(small_embedded):
    plain, other = _ds(small_embedded, "none", shot=2), _ds(small_embedded, "other_class", shot=2)
    assert len(plain) == len(other) == N
    for i in range(N):
        a, b = plain[i], other[i]
        assert a["query_name"] == b["query_name"] and int(a["class_id"]) == int(b["class_id"])
        assert torch.equal(a["query_mask"], b["query_mask"]) and torch.equal(a["query_img"], b["query_img"])
        s_cls = int(b["support_class_id"])
        assert s_cls != int(b["class_id"]) and s_cls in other.class_ids()
        assert b["query_name"] not in b["support_names"]
        for name, mask in zip(b["support_names"], b["support_masks"]):
            assert name in other.classwise[s_cls]  # an image of the other class, with that class's mask
            assert (mask == 1).any()
        assert b["support_control"] == "other_class" and int(a["support_class_id"]) == int(a["class_id"])
    # deterministic from the protocol seed; another seed draws other supports
    again = _ds(small_embedded, "other_class", shot=2)
    assert again.episodes == other.episodes
    assert _ds(small_embedded, "other_class", shot=2, seed=1).episodes != other.episodes


def test_empty_mask_keeps_support_images(small_embedded):
    plain, empty = _ds(small_embedded, "none"), _ds(small_embedded, "empty_mask")
    for i in range(8):
        a, b = plain[i], empty[i]
        assert a["support_names"] == b["support_names"]
        assert torch.equal(a["support_imgs"], b["support_imgs"])
        assert (a["support_masks"] == 1).any() and (b["support_masks"] == 0).all()


def test_control_validation(small_embedded):
    with pytest.raises(ValueError, match="support_control"):
        _ds(small_embedded, "shuffled")
    with pytest.raises(ValueError, match="evaluation episodes, not to training"):
        PascalFewShot(small_embedded, split="trn", fold=1, img_size=64, splits_dir=small_embedded / "splits",
                      support_control="other_class")  # fmt: skip
    from fsseg.data.protocol import Episode

    with pytest.raises(ValueError, match="no other class"):
        control_episodes([Episode(0, "a", ("b",))], "other_class", {0: ["a", "b"]}, [0], 1, 0)


def test_support_mask_size_is_checked(small_embedded, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "bench"
    shutil.copytree(small_embedded, root)
    ds = _ds(root, "none")
    support = ds.episodes[0].supports[0]
    path = root / "VOC2012" / "SegmentationClassAug" / f"{support}.png"
    with Image.open(path) as im:
        im.resize((32, 32), Image.NEAREST).save(path)
    with pytest.raises(ValueError, match=f"{support}.jpg"):
        ds[0]


@pytest.mark.parametrize("control", ["other_class", "empty_mask"])
def test_baseline_falls_under_controls_and_compare_pairs_runs(small_embedded, tmp_path, control, monkeypatch):
    """Train the prototype baseline briefly, test it with and without the control, and compare the runs."""
    from fsseg.cli.trainer import run_cli
    from fsseg.compare import compare_runs
    from fsseg.reproduce.stats import load_run

    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(Path(__file__).parents[1] / "configs" / "demo_baseline.yaml"),
        "--data.root",
        str(small_embedded),
        "--data.img_size",
        "64",
        "--data.fold",
        "1",
        "--data.test_episodes",
        "40",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "[]",
    ]
    fit = run_cli(["fit", *common, "--trainer.max_epochs", "1", "--trainer.max_steps", "60"])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    runs = {}
    for name in ("none", control):
        t = run_cli(["test", *common, "--ckpt_path", ckpt, "--data.support_control", name])
        runs[name] = t.trainer.log_dir
        metrics = json.loads(open(f"{t.trainer.log_dir}/metrics.json").read())
        assert metrics["support_control"] == name
        recs = [json.loads(line) for line in open(f"{t.trainer.log_dir}/episodes.jsonl")]
        assert {r["support_control"] for r in recs} == {name}
        if name == "other_class":
            assert all(r["support_class"] != r["class_id"] for r in recs)
    r = compare_runs(load_run(runs["none"]), load_run(runs[control]))
    assert r["support_control"] == ["none", control]
    assert r["miou_a"] > 30 and r["diff"] < -20, r  # the baseline uses its support
    assert np.isfinite(r["interval"]).all()
