"""The CLI end to end on a small embedded benchmark: fit -> test round trip, the test report, DDP equality,
resume equality, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fsseg.cli import expand_shorthands, main, run_cli


def write_config(tmp: Path, data_root: Path, **trainer) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "deterministic": True,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "t"},
            },
            **trainer,
        },
        "model": {
            "class_path": "fsseg.models.baseline.PrototypeModule",
            "init_args": {
                "backbone": "resnet18",
                "out_indices": [1],
                "embed_dim": 16,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
            },
        },
        "data": {
            "root": str(data_root),
            "benchmark": "embedded",
            "fold": 0,
            "shot": 1,
            "img_size": 48,
            "batch_size": 4,
            "eval_batch_size": 4,
            "train_episodes": 16,
            "test_episodes": 24,
            "val_episodes": 8,
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_then_test_with_shorthands_writes_report(tmp_path, small_embedded):
    cfg = write_config(tmp_path, small_embedded)
    fit = run_cli(["fit", "--config", str(cfg)])
    ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()
    # `--ckpt` alone finds the run's saved config.yaml; `--fold` selects the held-out fold
    argv = expand_shorthands(["test", "--ckpt", str(ckpt), "--fold", "2"])
    assert argv[:3] == ["test", "--config", str(ckpt.parent.parent / "config.yaml")]
    test = run_cli(argv)
    out = Path(test.trainer.log_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fold"] == 2 and metrics["shot"] == 1 and metrics["dataset"] == "embedded"
    assert metrics["episodes"] == 24 and metrics["seed"] == 0 and metrics["resolution"] == 48
    assert set(metrics["per_class_iou"]) == {"10", "11", "12", "13", "14"}
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["fbiou"] <= 100
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert [e["episode"] for e in episodes] == list(range(24))
    assert all(len(e["inter"]) == 2 and len(e["union"]) == 2 and len(e["supports"]) == 1 for e in episodes)
    # the report's mIoU is recomputed from the episode records (docs/PROTOCOL.md §2)
    per_class = {}
    for e in episodes:
        i, u = per_class.setdefault(e["class_id"], [0, 0]), e
        i[0] += u["inter"][1]
        i[1] += u["union"][1]
    miou = 100 * sum(i / max(u, 1) for i, u in per_class.values()) / 5
    assert metrics["miou"] == pytest.approx(miou)


def test_mistyped_config_key_is_named(tmp_path, small_embedded, capsys):
    cfg = write_config(tmp_path, small_embedded)
    with pytest.raises(SystemExit):
        main(["test", "--config", str(cfg), "--data.foldd", "1"])
    assert "foldd" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_shorthands(["test", "--ckpt", str(tmp_path / "missing.ckpt")])


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path, small_embedded):
    # 2 epochs of 4 batches; checkpoints every 3 steps: step 3 is mid-epoch 0, step 6 mid-epoch 1
    every3 = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "filename": "{step}"},
        }
    ]
    cfg = write_config(tmp_path, small_embedded, max_epochs=2, callbacks=every3)
    run = run_cli(["fit", "--config", str(cfg)])
    full = run.model.state_dict()
    ckpts = Path(run.trainer.log_dir) / "checkpoints"
    for name in ("step=3.ckpt", "step=6.ckpt"):  # a fit stopped part-way, resumed with --ckpt
        resumed = run_cli(["fit", "--config", str(cfg), "--ckpt_path", str(ckpts / name)])
        assert resumed.trainer.global_step == 8
        state = resumed.model.state_dict()
        for k, v in full.items():
            assert torch.equal(v, state[k]), (name, k)
    other = run_cli(
        ["fit", "--config", str(cfg), "--seed_everything", "1", "--data.seed", "1"]
    ).model.state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in full.items())


def _fsseg(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "fsseg"), *args]  # DDP re-launches this command line per process
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_ddp_test_equals_single_process(tmp_path, small_embedded):
    cfg = write_config(tmp_path, small_embedded, enable_checkpointing=True)
    fit = run_cli(["fit", "--config", str(cfg)])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    reports = []
    for name, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        log = ["--trainer.logger.init_args.name", name]
        _fsseg(
            "test",
            "--config",
            str(cfg),
            "--ckpt_path",
            ckpt,
            "--data.test_episodes",
            "23",
            *log,
            *extra,
            cwd=tmp_path,
        )
        out = tmp_path / "runs" / name / "version_0"
        reports.append(((out / "metrics.json").read_text(), (out / "episodes.jsonl").read_text()))
    (m1, e1), (m2, e2) = reports
    assert e1 == e2 and len(e1.splitlines()) == 23  # 23 episodes on 2 processes: no padding, none twice
    m1, m2 = json.loads(m1), json.loads(m2)
    for key in ("miou", "fbiou", "per_class_iou", "episodes"):
        assert m1[key] == m2[key], key
