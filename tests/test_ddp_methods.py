"""DDP for every method on 2 CPU processes (the embedded benchmark, tiny models): training runs, and evaluation
writes the same metrics and episode records as one process. Through the installed ``fsseg`` command in a
subprocess, since DDP re-launches the command line once per process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def baseline_model(tmp: Path) -> dict:
    return {"class_path": "fsseg.models.baseline.PrototypeModule",
            "init_args": {"backbone": "resnet18", "out_indices": [1], "embed_dim": 16}}  # fmt: skip


def diffews_model(tmp: Path) -> dict:
    from fsseg.models.diffews.tiny import write_tiny_sd

    sd = write_tiny_sd(tmp / "tiny-sd", seed=0)  # built in-process under a fixed seed, SD 2.1 folder layout
    return {"class_path": "fsseg.models.diffews.DiffewsModule", "init_args": {"pretrained": str(sd)}}


def diffseg_model(tmp: Path) -> dict:
    assets = REPO / "fsseg/assets/tiny-diffseg"  # the tiny Kandinsky-shaped parts shipped for the demo
    return {"class_path": "fsseg.models.diffseg.DiffSegModule",
            "init_args": {"decoder": str(assets / "decoder"), "prior": str(assets / "prior"), "edge_source": "sobel",
                          "pam_dim": 16, "pam_heads": 2, "scm_width": 16, "scm_edge_channels": 8}}  # fmt: skip


def write_config(tmp: Path, data_root: Path, model: dict) -> Path:
    model["init_args"]["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}}
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "deterministic": True, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp / "runs"), "name": "t"}}},
        "model": model,
        "data": {"root": str(data_root), "benchmark": "embedded", "fold": 0, "shot": 1, "img_size": 64,
                 "batch_size": 2, "eval_batch_size": 2, "train_episodes": 8, "test_episodes": 11},
    }  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fsseg(*args, cwd: Path) -> None:
    cmd = [str(Path(sys.executable).parent / "fsseg"), *args]
    res = subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", [baseline_model, diffews_model, diffseg_model], ids=["baseline", "diffews", "diffseg"]
)
def test_ddp_training_runs_and_ddp_evaluation_equals_one_process(model, tmp_path, small_embedded):
    cfg = write_config(tmp_path, small_embedded, model(tmp_path))
    fsseg("fit", "--config", str(cfg), "--trainer.logger.init_args.name", "fit", *DDP, cwd=tmp_path)
    ckpt = tmp_path / "runs/fit/version_0/checkpoints/last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2  # 8 training episodes, batch 2 per process, 2 processes: 2 steps
    reports = []
    for name, extra in (("one", []), ("ddp", DDP)):
        fsseg("test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--trainer.logger.init_args.name", name, *extra,
              cwd=tmp_path)  # fmt: skip
        out = tmp_path / "runs" / name / "test_embedded_fold0_1shot"
        reports.append((json.loads((out / "metrics.json").read_text()), (out / "episodes.jsonl").read_text()))
    (m1, e1), (m2, e2) = reports
    assert e1 == e2 and len(e1.splitlines()) == 11  # 11 episodes over 2 processes: none padded, none twice
    for key in ("miou", "fbiou", "per_class_iou", "episodes", "dataset", "fold", "shot", "resolution"):
        assert m1[key] == m2[key], key
