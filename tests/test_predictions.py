"""Predictions kept with a test run (``pred_rle`` in episodes.jsonl): COCO RLE round trips exactly, every episode of a
real `fsseg test` run keeps its mask, and re-scoring the run from them reproduces its numbers exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import make_runs

from fsseg.compare import compare_runs
from fsseg.episodes import RunEpisodes
from fsseg.predictions import FIELD, decode_mask, encode_mask, encode_masks, has_predictions, rescore
from fsseg.reproduce.stats import load_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_embedded) -> dict[str, Path]:
    return make_runs(tmp_path_factory.mktemp("runs"), small_embedded)


def test_rle_round_trip_is_exact():
    gen = torch.Generator().manual_seed(0)
    masks = [
        (torch.rand(37, 53, generator=gen) > 0.5).long(),  # noise: the worst case for run lengths
        torch.zeros(64, 64, dtype=torch.long),
        torch.ones(64, 64, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
    ]
    for m in masks:
        rle = encode_mask(m)
        assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
        json.dumps(rle)  # JSON-ready
        np.testing.assert_array_equal(decode_mask(json.loads(json.dumps(rle))), m.numpy().astype(bool))
    batch = torch.stack([masks[1], masks[2]])
    assert [decode_mask(r).sum() for r in encode_masks(batch)] == [0, 64 * 64]
    with pytest.raises(ValueError, match="not a COCO RLE mask"):
        decode_mask({"counts": "abc"})
    with pytest.raises(ValueError, match=r"one \[h, w\] mask"):
        encode_mask(batch)


def test_a_test_run_keeps_every_prediction_and_rescoring_reproduces_it(runs):
    for name in ("own", "other_class"):
        folder = runs[name]
        records = [json.loads(line) for line in (folder / "episodes.jsonl").read_text().splitlines()]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert has_predictions(records) and len(records) == metrics["episodes"] == 24
        assert all(r[FIELD]["size"] == [48, 48] for r in records)  # at the evaluation resolution
        again = rescore(folder)
        # exactly: the same integer counts through the same metric
        assert again["miou"] == metrics["miou"] and again["fbiou"] == metrics["fbiou"]
        assert again["per_class_iou"] == metrics["per_class_iou"]
        assert again["inter"] == [r["inter"] for r in records] and again["union"] == [
            r["union"] for r in records
        ]
        assert 0 < metrics["miou"] < 100  # neither trivial case: the masks are real predictions
    # the ground truth read alone (without the episode's images) is the dataset item's own
    episodes = RunEpisodes.open(runs["other_class"])
    for r in episodes.records:
        assert torch.equal(episodes.ground_truth(r), episodes.item(r)["query_mask_eval"])


def test_old_runs_without_predictions_still_compare_but_cannot_be_rescored(runs, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in ("metrics.json", "config.yaml"):
        (old / f).write_text((runs["own"] / f).read_text())
    lines = [json.loads(line) for line in (runs["own"] / "episodes.jsonl").read_text().splitlines()]
    (old / "episodes.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != FIELD}) + "\n"
                                                for r in lines))  # fmt: skip
    with pytest.raises(ValueError, match="keeps no predictions"):
        rescore(old)
    r = compare_runs(load_run(old), load_run(runs["untrained"]), n_boot=50)
    assert r["miou_a"] == pytest.approx(json.loads((old / "metrics.json").read_text())["miou"])
