"""Seeing results: mask overlays and grids, the TensorBoard episode-panel callback (read back from the event file),
and tools/qualitative_figure.py on a real test run."""

from __future__ import annotations

import io
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fsseg.callbacks import EpisodePanels, foreground_iou
from fsseg.cli.trainer import run_cli
from fsseg.visual import GT_COLOR, MASK_COLOR, PAD, TITLE_H, column_titles, grid, overlay

ROOT = Path(__file__).resolve().parents[1]


def test_overlay_tints_foreground_greys_ignore_and_keeps_the_image_size():
    img = torch.zeros(3, 20, 30)  # black [3, H, W]
    mask = torch.zeros(10, 15, dtype=torch.long)  # half resolution: resized (nearest) to the image
    mask[2:8, 2:8] = 1
    mask[0, :] = 255
    out = np.asarray(overlay(img, mask, MASK_COLOR, alpha=0.5))
    assert out.shape == (20, 30, 3)
    inside, outside, ignore = out[10, 10], out[16, 25], out[0, 20]
    np.testing.assert_allclose(inside, np.array(MASK_COLOR) * 0.5, atol=1.5)  # half-tinted interior
    assert outside.tolist() == [0, 0, 0]
    assert ignore[0] == ignore[1] == ignore[2] > 0  # grey
    assert out[4, 10].tolist() == list(MASK_COLOR)  # the outline is drawn in full colour


def test_grid_size_and_titles():
    cells = [[Image.new("RGB", (7, 9), (0, 0, 255))] * 4, [Image.new("RGB", (5, 5))] * 3]
    g = grid(cells, 32, column_titles(2), ["a", "b"])
    assert g.size == (4 * 32 + 5 * PAD, TITLE_H + 2 * (32 + TITLE_H) + 3 * PAD)
    assert column_titles(2) == ["support 1", "support 2", "query", "ground truth", "prediction"]
    assert column_titles(1, with_gt=False) == ["support", "query", "prediction"]
    assert np.asarray(g)[TITLE_H + PAD + TITLE_H + 5, PAD + 5].tolist() == [
        0,
        0,
        255,
    ]  # first cell, below its label


def test_foreground_iou_ignores_255():
    pred = torch.tensor([[1, 1, 0, 1]])
    target = torch.tensor([[1, 0, 0, 255]])
    assert foreground_iou(pred, target) == pytest.approx(50.0)
    assert np.isnan(foreground_iou(torch.zeros(2, 2), torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="every_n_steps"):
        EpisodePanels(every_n_steps=-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_embedded) -> dict:
    """A baseline fitted with the panel callback (4 steps, panels every 2) through the CLI, like any config."""
    tmp = tmp_path_factory.mktemp("visual_run")
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "v"},
            },
            "callbacks": [
                {
                    "class_path": "fsseg.callbacks.EpisodePanels",
                    "init_args": {"every_n_steps": 2, "n_episodes": 3, "cell": 48},
                }
            ],
        },
        "model": {
            "class_path": "fsseg.models.baseline.PrototypeModule",
            "init_args": {"out_indices": [1], "embed_dim": 16},
        },
        "data": {
            "root": str(small_embedded),
            "benchmark": "embedded",
            "img_size": 48,
            "batch_size": 4,
            "train_episodes": 16,
            "val_episodes": 4,
            "eval_batch_size": 2,
            "test_episodes": 10,
        },
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    fit = run_cli(["fit", "--config", str(tmp / "config.yaml")])
    return {
        "config": tmp / "config.yaml",
        "log_dir": Path(fit.trainer.log_dir),
        "ckpt": fit.trainer.checkpoint_callback.last_model_path,
    }


def test_callback_writes_episode_panels_to_tensorboard(trained):
    acc = EventAccumulator(str(trained["log_dir"]), size_guidance={"images": 0})
    acc.Reload()
    assert {"train/episodes", "val/episodes"} <= set(acc.Tags()["images"])
    train = acc.Images("train/episodes")
    assert [e.step for e in train] == [2, 4]  # 16 episodes / batch 4 = 4 steps, a panel every 2
    cell, cols = 48, 4  # support, query, ground truth, prediction
    for event, rows in (
        (train[0], 3),
        (acc.Images("val/episodes")[0], 2),
    ):  # 3 of a batch of 4; the val batch has 2
        img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert (event.width, event.height) == (
            cols * cell + (cols + 1) * PAD,
            TITLE_H + rows * (cell + TITLE_H) + (rows + 1) * PAD,
        )
        assert img.shape == (event.height, event.width, 3)
        assert (img == GT_COLOR).all(-1).any() and (img == MASK_COLOR).all(
            -1
        ).any()  # the masks' outlines are drawn


def _figure(capsys, *args: str) -> tuple[int, str]:
    """Run the script's main() in this process (its own module namespace); returns (exit code, stderr)."""
    code = runpy.run_path(str(ROOT / "tools" / "qualitative_figure.py"))["main"](list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def test_run(trained) -> Path:
    """The log folder of an `fsseg test` run of the trained checkpoint."""
    test = run_cli(["test", "--config", str(trained["config"]), "--ckpt_path", trained["ckpt"]])
    return Path(test.trainer.log_dir)


def test_qualitative_figure_from_a_test_run(test_run, tmp_path, capsys):
    run_dir = test_run
    out = tmp_path / "fig.png"
    code, err = _figure(capsys, str(run_dir), "--n", "3", "--cell", "64", "--out", str(out))
    assert code == 0, err
    assert "warning" not in err  # the recomputed predictions give the recorded IoUs
    with Image.open(out) as fig:
        assert fig.size == (4 * 64 + 5 * PAD, TITLE_H + 3 * (64 + TITLE_H) + 4 * PAD)
        px = np.asarray(fig.convert("RGB"))
    assert (px == GT_COLOR).all(-1).any() and len(
        np.unique(px.reshape(-1, 3), axis=0)
    ) > 100  # real pictures, not blank
    code, err = _figure(capsys, str(run_dir), "--n", "1", "--cell", "64", "--out", str(out))
    assert code == 2 and "already exists: pass --overwrite" in err  # the project's overwrite policy
    assert _figure(capsys, str(run_dir), "--n", "1", "--cell", "64", "--out", str(out), "--overwrite")[0] == 0
    with Image.open(out) as fig:
        assert fig.size[1] == TITLE_H + (64 + TITLE_H) + 2 * PAD  # replaced: one row now
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    code, err = _figure(capsys, str(empty), "--out", str(tmp_path / "x.png"))
    assert code == 2 and "missing" in err and "episodes.jsonl" in err
    assert not (tmp_path / "x.png").exists()


def test_error_breakdown_from_a_test_run(test_run, tmp_path, capsys):
    """tools/error_breakdown.py: the recomputed predictions' pixels split into target, other objects and background
    agree with the run's recorded intersections, and add up."""
    run_dir = test_run
    out = tmp_path / "b.json"
    tool = runpy.run_path(str(ROOT / "tools" / "error_breakdown.py"))
    assert tool["main"]([str(run_dir), "--n", "6", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    records = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()][:6]
    px = res["pixels"]
    assert res["episodes"] == 6 and px["predicted"] > 0
    assert px["on_target"] == sum(r["inter"][1] for r in records)  # the metric's foreground intersection
    assert px["predicted"] + px["target"] - px["on_target"] == sum(r["union"][1] for r in records)
    share = res["share_of_prediction"]
    assert share["target"] + share["other_objects"] + share["background"] == pytest.approx(1.0, abs=1e-6)
    assert "wrote" in capsys.readouterr().out
    assert tool["main"]([str(run_dir), "--n", "1", "--out", str(out)]) == 2  # the project's overwrite policy
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert json.loads(out.read_text()) == res  # untouched
    assert tool["main"]([str(run_dir), "--n", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["episodes"] == 1
    # the attribute names, and a hand-made episode
    assert (
        tool["shared"](1, 7) == "shape"
        and tool["shared"](1, 9) == "colour"
        and tool["shared"](1, 2) == "nothing"
    )
    label = np.zeros((4, 4), dtype=np.uint8)
    label[0, :2], label[1, :2], label[3, 3] = 1, 9, 255  # target class 1, an object of class 9 (same colour)
    pred = np.zeros((4, 4), dtype=bool)
    pred[0, 0], pred[1, :2], pred[2, 0], pred[3, 3] = (
        True,
        True,
        True,
        True,
    )  # 1 target, 2 object, 1 bg, 1 ignore
    row = tool["breakdown"](pred, label, 1)
    assert (row["predicted"], row["on_target"], row["on_background"], row["on_objects"]) == (4, 1, 1, {9: 2})
    s = tool["summarise"]([row])
    assert s["precision"] == 0.25 and s["recall"] == 0.5
    assert s["other_object_coverage_by_shared_attribute"] == {"colour": {"mean_covered": 1.0, "objects": 1}}
    assert s["iou_per_class"] == {"red-striped-disc": pytest.approx(100 / 5)}
