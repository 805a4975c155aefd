"""`fsseg compare`: paired mIoU difference with a seeded bootstrap over episodes, per-class table, and refusal when
the two runs did not evaluate the same episodes. Runs are written from real masks through the real metric."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsseg.cli import main
from fsseg.compare import EpisodeMismatch, compare_runs
from fsseg.metrics import FewShotIoU, episode_inter_union
from fsseg.reproduce.stats import bootstrap_fold_mean, load_run, percentile_interval

CLASSES = [5, 6, 7, 8, 9]


def write_run(folder: Path, skill: float, seed: int, n: int = 60, fold: int = 1, data_seed: int = 0) -> Path:
    """A test run folder: episodes drawn under ``data_seed``, predictions that agree with the target with
    probability ``skill`` (noise under ``seed``); metrics.json from `FewShotIoU`, records from `episode_inter_union`."""
    draw = torch.Generator().manual_seed(100 + data_seed)
    noise = torch.Generator().manual_seed(seed)
    metric = FewShotIoU(CLASSES)
    records = []
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        target = (torch.rand(1, 16, 16, generator=draw) < 0.3 + 0.1 * (i % 4)).long()
        target[:, :, 0] = 255
        flip = torch.rand(1, 16, 16, generator=noise) > skill
        pred = torch.where(flip, 1 - target.clamp(max=1), target.clamp(max=1))
        metric.update(pred, target, torch.tensor([cls]))
        inter, union = episode_inter_union(pred, target)
        support = int(torch.randint(0, 1000, (1,), generator=draw))
        records.append(
            {
                "episode": i,
                "query": f"q{i}",
                "supports": [f"s{support}"],
                "class_id": cls,
                "inter": inter[0].tolist(),
                "union": union[0].tolist(),
            }
        )
    values = metric.compute()
    metrics = {
        "miou": float(values["miou"]),
        "fbiou": float(values["fbiou"]),
        "per_class_iou": {str(c): float(v) for c, v in zip(CLASSES, values["per_class_iou"])},
        "dataset": "embedded",
        "fold": fold,
        "shot": 1,
        "resolution": 16,
        "seed": data_seed,
        "episodes": n,
        "model": "Fake",
    }
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / "a", skill=0.7, seed=1), write_run(tmp_path / "b", skill=0.85, seed=2)


def test_paired_difference_interval_and_per_class_table(runs):
    a, b = map(load_run, runs)
    r = compare_runs(a, b, n_boot=500, seed=0)
    assert r["miou_a"] == pytest.approx(a.metrics["miou"]) and r["miou_b"] == pytest.approx(b.metrics["miou"])
    assert r["diff"] == pytest.approx(b.metrics["miou"] - a.metrics["miou"]) and r["diff"] > 0
    lo, hi = r["interval"]
    assert lo < r["diff"] < hi and lo > 0  # B is clearly better on these episodes
    assert [c["class_id"] for c in r["per_class"]] == CLASSES
    for c in r["per_class"]:
        assert c["iou_a"] == pytest.approx(a.metrics["per_class_iou"][str(c["class_id"])], abs=1e-4)
        assert c["iou_b"] == pytest.approx(b.metrics["per_class_iou"][str(c["class_id"])], abs=1e-4)
        assert c["episodes"] == 12
    # seeded: the same seed gives the same interval, another seed another one
    assert compare_runs(a, b, n_boot=500, seed=0) == r
    assert compare_runs(a, b, n_boot=500, seed=1)["interval"] != r["interval"]
    # a run against itself: difference 0 with a zero-width interval (paired resamples)
    same = compare_runs(a, load_run(runs[0]), n_boot=200)
    assert same["diff"] == 0 and same["interval"] == [0.0, 0.0]


def test_bootstrap_recomputes_the_pooled_miou_not_an_episode_mean(runs):
    run = load_run(runs[0])
    one = bootstrap_fold_mean([run], n_boot=300, seed=3)
    assert one.shape == (300,)
    lo, hi = percentile_interval(one)
    assert lo < run.metrics["miou"] < hi
    np.testing.assert_array_equal(one, bootstrap_fold_mean([run], n_boot=300, seed=3))
    assert not np.array_equal(one, bootstrap_fold_mean([run], n_boot=300, seed=4))
    episode_mean = 100 * np.mean([e["inter"][1] / max(e["union"][1], 1) for e in run.episodes])
    assert run.miou() == pytest.approx(run.metrics["miou"]) and abs(run.miou() - episode_mean) > 1e-3


def test_cli_prints_and_writes_json(runs, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    with pytest.raises(SystemExit) as e:
        main(["compare", str(runs[0]), str(runs[1]), "--n-boot", "200", "--json", str(out)])
    assert e.value.code == 0
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert f"B - A {saved['diff']:+.2f}" in text and saved["n_boot"] == 200 and len(saved["per_class"]) == 5


def test_refuses_runs_on_different_episodes(tmp_path, runs, capsys):
    a = load_run(runs[0])
    other_draws = load_run(write_run(tmp_path / "c", skill=0.85, seed=2, data_seed=1))
    with pytest.raises(EpisodeMismatch, match=r"episode 0: supports \['s\d+'\] \(A\) vs") as e:
        compare_runs(a, other_draws)
    assert "more episodes differ" in str(e.value)
    other_fold = load_run(write_run(tmp_path / "d", skill=0.85, seed=2, fold=2))
    with pytest.raises(EpisodeMismatch, match=r"fold: 1 \(A\) vs 2 \(B\)"):
        compare_runs(a, other_fold)
    fewer = load_run(write_run(tmp_path / "e", skill=0.85, seed=2, n=50))
    with pytest.raises(EpisodeMismatch, match="A has 60 episodes, B has 50"):
        compare_runs(a, fewer)
    with pytest.raises(SystemExit) as e:
        main(["compare", str(runs[0]), str(tmp_path / "c")])
    assert e.value.code == 2 and "did not evaluate the same episodes" in capsys.readouterr().err


def test_unreadable_runs_are_named(tmp_path, runs):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing .*episodes.jsonl"):
        load_run(tmp_path / "x")
    bad = Path(runs[1]) / "episodes.jsonl"
    bad.write_text(bad.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="episodes.jsonl line 61"):
        load_run(runs[1])
    a = load_run(runs[0])
    meta = json.loads((Path(runs[0]) / "metrics.json").read_text())
    meta["miou"] += 1.0
    (Path(runs[0]) / "metrics.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="inconsistent"):
        compare_runs(load_run(runs[0]), a)
