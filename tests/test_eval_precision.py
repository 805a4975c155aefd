"""``model.init_args.eval_precision``: evaluation in its own precision whatever precision trains. The DiffewS paper
config trains in 16-mixed and evaluates in fp32, as the released evaluation does; ``metrics.json`` records the
precision the evaluation used; a command line asking for another one is refused by name."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.data import DataLoader

from fsseg.cli.trainer import RunRefused, run_cli
from fsseg.models.base import eval_precision_conflict
from fsseg.models.baseline import PrototypeModule
from fsseg.models.diffews.tiny import random_episodes, write_tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return str(write_tiny_sd(tmp_path_factory.mktemp("eval_precision") / "sd", seed=0))


@contextmanager
def output_dtypes(kind: type):
    """The dtypes of every ``kind`` module's outputs while the block runs (a global forward hook)."""
    seen: set = set()

    def hook(module, args, out):
        if isinstance(module, kind):
            seen.add(getattr(out, "sample", out).dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def paper_config_test(sd_dir: str, root: Path, *extra: str):
    """``fsseg test --config diffews --no_ckpt`` on the tiny SD and 4 embedded-benchmark episodes at 32 px."""
    return run_cli(["test", "--config", "diffews", "--no_ckpt", "--model.init_args.pretrained", sd_dir,
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
                    "--data.root", str(root), "--data.benchmark", "embedded", "--data.img_size", "32",
                    "--data.eval_size", "32", "--data.test_episodes", "4", "--data.num_workers", "0", *extra])  # fmt: skip


def metrics_of(cli) -> dict:
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def test_paper_config_tests_in_fp32_while_it_trains_in_16_mixed(
    sd_dir, small_embedded, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with output_dtypes(UNet2DConditionModel) as seen:
        cli = paper_config_test(sd_dir, small_embedded)
    metrics = metrics_of(cli)
    # the config's training precision 16-mixed, which Lightning runs as bf16-mixed on a CPU: autocast around each step
    assert str(cli.trainer.precision) == "bf16-mixed"
    assert seen == {torch.float32} and metrics["precision"] == "32-true"
    assert metrics["model_settings"]["init_args"]["eval_precision"] == "32-true"
    # eval_precision null: the evaluation follows trainer.precision, and says so
    monkeypatch.chdir(tmp_path / "runs")
    with output_dtypes(UNet2DConditionModel) as seen:
        cli = paper_config_test(sd_dir, small_embedded, "--model.init_args.eval_precision", "null")
    assert seen == {torch.bfloat16} and metrics_of(cli)["precision"] == "bf16-mixed"


def test_a_command_line_precision_contradicting_eval_precision_is_refused(
    sd_dir, small_embedded, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for given in (["--trainer.precision", "bf16-mixed"], ["--trainer.precision=16-mixed"]):
        with pytest.raises(RunRefused, match=r"--trainer.precision \S+ conflicts with model.init_args.eval_precision "
                                             r"32-true.*--model.init_args.eval_precision"):  # fmt: skip
            paper_config_test(sd_dir, small_embedded, *given)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    # an explicit request that agrees (Lightning's alias 32 = 32-true) runs, as do both set explicitly
    with output_dtypes(UNet2DConditionModel) as seen:
        cli = paper_config_test(sd_dir, small_embedded, "--trainer.precision", "32")
    assert seen == {torch.float32} and metrics_of(cli)["precision"] == "32-true"
    monkeypatch.chdir(tmp_path / "runs")
    with output_dtypes(UNet2DConditionModel) as seen:
        cli = paper_config_test(sd_dir, small_embedded, "--trainer.precision", "16-mixed",
                                "--model.init_args.eval_precision", "16-mixed")  # fmt: skip
    assert seen == {torch.float16} and metrics_of(cli)["precision"] == "16-mixed"


def test_conflict_rule():
    assert eval_precision_conflict(None, "bf16-mixed") is None  # no eval_precision: the trainer's precision
    assert eval_precision_conflict("32-true", None) is None  # nothing asked on the command line
    assert (
        eval_precision_conflict("32-true", 32) is None
        and eval_precision_conflict("bf16-mixed", "bf16") is None
    )
    assert "eval_precision 16-mixed" in eval_precision_conflict("32-true", "16")


def _items(n: int = 2) -> list[dict]:
    ep = random_episodes(b=n, k=1, size=32, seed=1)
    return [{k: (v[i] if torch.is_tensor(v) or k == "query_name" else [s[i] for s in v]) for k, v in ep.items()}
            for i in range(n)]  # fmt: skip


def _trainer(precision: str) -> L.Trainer:
    return L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)  # fmt: skip


def test_eval_precision_applies_to_predict_steps_and_is_checked():
    torch.manual_seed(0)
    m = PrototypeModule(out_indices=(1,), embed_dim=8, eval_precision="bf16-mixed")
    with output_dtypes(torch.nn.Conv2d) as seen:
        out = _trainer("32-true").predict(m, DataLoader(_items(), batch_size=2))
    assert seen == {torch.bfloat16} and out[0]["pred"].shape == (2, 32, 32)
    m.eval_precision = "32-true"  # a trainer keeping the weights in float64 cannot evaluate in fp32 autocast
    with pytest.raises(
        ValueError, match="eval_precision 32-true needs fp32 weights, but trainer.precision 64-true"
    ):
        _trainer("64-true").predict(m, DataLoader(_items(), batch_size=2))
    with pytest.raises(ValueError, match=r"eval_precision must be null or one of .*got 'fp32'"):
        PrototypeModule(eval_precision="fp32")
