"""Settings given with a checkpoint are used (and recorded), never replaced by the checkpoint's saved ones: per
method, an override given with ``--ckpt_path`` changes the result; a setting that changes the architecture, or a
checkpoint of another method, is refused by name; an unreadable checkpoint's error names the file."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_cli import write_config

from fsseg.cli import run
from fsseg.cli.checkpoints import CheckpointError, read_checkpoint
from fsseg.cli.trainer import run_cli
from fsseg.models.diffews.tiny import write_tiny_sd

REPO = Path(__file__).resolve().parents[1]


def method_config(tmp: Path, data_root: Path, model: dict, img_size: int) -> Path:
    """A tiny fit (2 steps) / test (12 episodes) config for ``model``, logged under tmp/runs/<derived name>."""
    cfg = yaml.safe_load(write_config(tmp, data_root, logger_name=None).read_text())
    model.setdefault("init_args", {})["optimizer"] = {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": 1e-3},
    }
    cfg["model"] = model
    cfg["trainer"]["max_steps"] = 2
    cfg["data"].update(img_size=img_size, batch_size=2, eval_batch_size=4, train_episodes=4, test_episodes=12)
    path = tmp / "method.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def overlay(tmp: Path, name: str, init_args: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_args": init_args}}))
    return path


def fit(cfg: Path) -> str:
    return run_cli(["fit", "--config", str(cfg)]).trainer.checkpoint_callback.last_model_path


def evaluate(argv: list[str]) -> tuple[dict, dict, Path]:
    """(metrics.json, config.yaml, run folder) of an `fsseg test` run."""
    out = Path(run_cli(["test", *argv]).trainer.log_dir)
    return (
        json.loads((out / "metrics.json").read_text()),
        yaml.safe_load((out / "config.yaml").read_text()),
        out,
    )


# ---- DiffewS -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffews_run(tmp_path_factory, small_embedded):
    tmp = tmp_path_factory.mktemp("diffews_override")
    sd = write_tiny_sd(tmp / "sd", seed=0)
    cfg = method_config(tmp, small_embedded, {"class_path": "fsseg.models.diffews.DiffewsModule",
                                              "init_args": {"pretrained": str(sd)}}, img_size=32)  # fmt: skip
    return tmp, cfg, fit(cfg)


def test_diffews_threshold_overlay_with_a_checkpoint_is_used(diffews_run):
    tmp, cfg, ckpt = diffews_run
    plain, _, plain_dir = evaluate(["--config", str(cfg), "--ckpt_path", ckpt])
    ablation = overlay(tmp, "threshold_absolute", {"threshold_mode": "absolute", "threshold": 0.01})
    m, config, out = evaluate(["--config", str(cfg), "--config", str(ablation), "--ckpt_path", ckpt])
    # before: the checkpoint's `threshold_mode: relative` silently replaced the overlay's and the numbers were equal
    assert m["model_settings"]["init_args"]["threshold_mode"] == "absolute"
    assert m["model_settings"]["init_args"]["threshold"] == 0.01
    assert config["model"]["init_args"]["threshold_mode"] == "absolute"  # config.yaml records what was used
    assert m["miou"] != plain["miou"] and m["fbiou"] != plain["fbiou"]
    # runs named after the configs given (no logger name in them): the ablation is not filed under the base
    assert plain_dir == tmp / "runs/method_fold0/test_embedded_fold0_1shot"
    assert out == tmp / "runs/method+threshold_absolute_fold0/test_embedded_fold0_1shot"


def test_diffews_tests_with_another_data_seed_and_vae_batch(diffews_run):
    """``--data.seed 1`` beside DiffewS's own model ``seed`` (0): both settings of that name are kept, each where it
    belongs (before: Lightning refused to log the two hparams named ``seed`` with different values, so every
    evaluate-seeds seed but 0 failed for DiffewS); ``vae_batch`` reaches the pipeline and is recorded."""
    tmp, cfg, ckpt = diffews_run
    m, config, _ = evaluate(["--config", str(cfg), "--ckpt_path", ckpt, "--data.seed", "1",
                             "--model.init_args.vae_batch", "1"])  # fmt: skip
    assert m["seed"] == 1 and config["data"]["seed"] == 1 and config["model"]["init_args"]["seed"] == 0
    assert m["model_settings"]["init_args"]["vae_batch"] == 1 and m["episodes"] == 12


def test_readme_ablation_route_with_a_named_base_gives_each_overlay_its_own_result(diffews_run):
    """`fsseg test --config <base naming its run> --config ablations/diffews/threshold_* --ckpt X` (the README's
    route; the demo configs name their runs): the shipped overlay's setting is used and each evaluation gets a folder
    of its own, so the base's result and every threshold row sit side by side (before: the same folder, refused)."""
    tmp, cfg, ckpt = diffews_run
    named = tmp / "named_base.yaml"
    base = yaml.safe_load(cfg.read_text())
    base["trainer"]["logger"]["init_args"]["name"] = "base"
    named.write_text(yaml.safe_dump(base))
    results = {}
    for row in (None, "threshold_absolute_0.1", "threshold_absolute_0.3"):
        overlay_args = ["--config", str(REPO / f"configs/ablations/diffews/{row}.yaml")] if row else []
        m, _, out = evaluate(["--config", str(named), *overlay_args, "--ckpt_path", ckpt])
        assert out == tmp / "runs" / ("base" + (f"+{row}" if row else "")) / "test_embedded_fold0_1shot"
        results[row] = m
    for row in ("threshold_absolute_0.1", "threshold_absolute_0.3"):
        init = results[row]["model_settings"]["init_args"]
        assert (init["threshold_mode"], init["threshold"]) == ("absolute", float(row.split("_")[-1]))
    assert results[None]["model_settings"]["init_args"]["threshold_mode"] == "relative"
    assert len({m["fbiou"] for m in results.values()}) == 3  # three thresholds, three results


def test_diffews_architecture_change_or_other_method_is_refused(diffews_run, capsys):
    tmp, cfg, ckpt = diffews_run
    code = run(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--model.init_args.interaction", "qkv"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "model.init_args.interaction: the checkpoint was trained with 'fsa', the config gives 'qkv'" in err
    (tmp / "b").mkdir()
    baseline = write_config(tmp / "b", tmp)
    code = run(["test", "--config", str(baseline), "--ckpt_path", ckpt])
    err = capsys.readouterr().err
    assert code == 2 and "is a fsseg.models.diffews.DiffewsModule checkpoint" in err
    assert "the config builds fsseg.models.baseline.PrototypeModule" in err
    assert not (tmp / "b" / "runs").exists()  # refused before anything was written


# ---- DiffSeg -------------------------------------------------------------------------------------------------------
def test_diffseg_threshold_on_the_command_line_with_a_checkpoint_is_used(tmp_path, small_embedded, capsys):
    assets = REPO / "fsseg/assets/tiny-diffseg"
    model = {"class_path": "fsseg.models.diffseg.DiffSegModule",
             "init_args": {"decoder": str(assets / "decoder"), "prior": str(assets / "prior"), "edge_source": "sobel",
                           "pam_dim": 16, "pam_heads": 2, "scm_width": 16, "scm_edge_channels": 8}}  # fmt: skip
    cfg = method_config(tmp_path, small_embedded, model, img_size=64)
    ckpt = fit(cfg)
    low, low_cfg, _ = evaluate(
        ["--config", str(cfg), "--ckpt_path", ckpt, "--model.init_args.threshold", "0.01"]
    )
    assert "model.init_args.threshold: 0.01 (the checkpoint's run: 0.5)" in capsys.readouterr().out
    high, _, _ = evaluate(["--config", str(cfg), "--ckpt_path", ckpt, "--model.init_args.threshold", "0.99",
                         "--overwrite"])  # fmt: skip
    assert (
        low["model_settings"]["init_args"]["threshold"] == 0.01
        and low_cfg["model"]["init_args"]["threshold"] == 0.01
    )
    assert high["model_settings"]["init_args"]["threshold"] == 0.99
    assert low["miou"] != high["miou"]
    code = run(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--model.init_args.pam_dim", "8"])
    assert (
        code == 2 and "model.init_args.pam_dim: the checkpoint was trained with 16" in capsys.readouterr().err
    )


# ---- the prototype baseline ----------------------------------------------------------------------------------------
def test_baseline_override_with_a_checkpoint_reaches_the_model(tmp_path, small_embedded, capsys):
    """The baseline has no setting that keeps its weights' shapes and changes its prediction (a temperature scales
    both logits alike): the override is shown to reach the model and the records; the architecture is checked."""
    cfg = write_config(tmp_path, small_embedded)
    ckpt = fit(cfg)
    cli = run_cli(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--model.init_args.temperature", "5"])
    assert (
        cli.model.pipeline.temperature == 5.0
    )  # LightningCLI's default behaviour restored the checkpoint's 20
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["model_settings"]["init_args"]["temperature"] == 5.0
    code = run(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--model.init_args.embed_dim", "8",
                "--overwrite"])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        code == 2
        and "model.init_args.embed_dim: the checkpoint was trained with 16, the config gives 8" in err
    )
    # a checkpoint that does not record its settings (saved outside the CLI) is checked by its weights' shapes
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hyper_parameters"] = {}
    torch.save(state, tmp_path / "bare.ckpt")
    code = run(["test", "--config", str(cfg), "--ckpt_path", str(tmp_path / "bare.ckpt"),
                "--model.init_args.embed_dim", "8", "--overwrite"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "bare.ckpt does not fit the configured PrototypeModule" in err
    assert "proj.weight [16, 64, 1, 1] in the checkpoint, [8, 64, 1, 1] in the model" in err


# ---- unreadable checkpoints ------------------------------------------------------------------------------------------
class NotPlainData:
    pass


class RunsACommand:  # pickled as a call of os.system: torch's weights-only unpickler blocks its module
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_unreadable_checkpoints_are_named_and_never_unpickled(tmp_path, small_embedded, capsys):
    cfg = write_config(tmp_path, small_embedded)
    good = Path(fit(cfg))
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a checkpoint\n" * 10)
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"state_dict": {}, "extra": NotPlainData()}, tmp_path / "objects.ckpt")
    torch.save({"state_dict": {}, "extra": RunsACommand()}, tmp_path / "unsafe.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    with zipfile.ZipFile(tmp_path / "badpickle.ckpt", "w") as z:  # an archive whose pickle is damaged
        z.writestr("archive/data.pkl", b"not a pickle")
        z.writestr("archive/version", b"3\n")
    expected = {"garbage.ckpt": "not a complete PyTorch checkpoint archive",
                "truncated.ckpt": "not a complete PyTorch checkpoint archive", "badpickle.ckpt": "is corrupt",
                "objects.ckpt": "NotPlainData), not only tensors and plain values; fsseg loads checkpoints with "
                                "weights_only=True and never unpickles objects",
                "unsafe.ckpt": "holds a Python object (posix.system), not only tensors and plain values",
                "plain.ckpt": "not a Lightning checkpoint"}  # fmt: skip
    for name, reason in expected.items():
        with pytest.raises(CheckpointError, match=re.escape(reason)):
            read_checkpoint(tmp_path / name)
        code = run(["test", "--config", str(cfg), "--ckpt_path", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and str(tmp_path / name) in err and reason in err, err
        assert "weights_only=False" not in err and "trust" not in err  # never a suggestion to load unsafely
    Image.new("RGB", (32, 32)).save(tmp_path / "q.png")
    code = run(["predict-images", "--ckpt", str(tmp_path / "garbage.ckpt"), "--config", str(cfg), "--support",
                "s.png", "--support-mask", "m.png", "--query", str(tmp_path / "q.png"), "--out", str(tmp_path / "p")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "garbage.ckpt cannot be read" in err and "weights_only=False" not in err
