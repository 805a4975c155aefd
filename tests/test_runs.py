"""What runs leave behind: resumable checkpoints at the shipped cadence, no silent no-op (no checkpoint, nothing to
evaluate, nothing to train), no silent overwrite, no stray folders of failed runs, readable result files, and the
demo's folders and columns."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_cli import write_config

from fsseg.cli import run
from fsseg.cli.configs import resolve_config
from fsseg.cli.trainer import CHECKPOINT_EVERY_N_STEPS, run_cli
from fsseg.demo import resolve_test_precision
from fsseg.files import atomic_write_text
from fsseg.models.baseline import PrototypeModule
from fsseg.report import read_test_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(tmp_path, small_embedded) -> tuple[Path, str]:
    """(config, last.ckpt) of a 4-step baseline fit logged under tmp/runs/t."""
    cfg = write_config(tmp_path, small_embedded)
    return cfg, run_cli(["fit", "--config", str(cfg)]).trainer.checkpoint_callback.last_model_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- checkpoints every N steps; resuming from the newest equals the uninterrupted run -------------------------------
def test_resume_from_the_newest_checkpoint_at_the_shipped_cadence(tmp_path, small_embedded, monkeypatch):
    n = CHECKPOINT_EVERY_N_STEPS
    # one long epoch (batch 1): the cadence's checkpoint falls mid-epoch; the default config has no other callback
    cfg = write_config(tmp_path, small_embedded, max_steps=n + 6)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].update(img_size=32, batch_size=1, train_episodes=n + 50)
    cfg.write_text(yaml.safe_dump(raw))
    full = run_cli(["fit", "--config", str(cfg)])
    assert full.trainer.global_step == n + 6  # within the first epoch (n + 50 batches)
    final = torch.load(
        full.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True
    )
    assert final["global_step"] == n + 6  # last.ckpt is also written when fit ends between two cadence points

    step = PrototypeModule.training_step

    def crash(self, batch, batch_idx):
        if self.global_step == n + 3:
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PrototypeModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(["fit", "--config", str(cfg)])
    monkeypatch.undo()
    newest = (
        tmp_path / "runs/t/version_1/checkpoints/last.ckpt"
    )  # the crashed run kept its folder and checkpoint
    saved = torch.load(newest, map_location="cpu", weights_only=True)
    assert saved["global_step"] == n and saved["epoch"] == 0  # written mid-epoch, at the cadence
    resumed = run_cli(["fit", "--config", str(cfg), "--ckpt_path", str(newest)])
    assert resumed.trainer.global_step == n + 6
    expected = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_resume_with_gradient_accumulation_and_another_cadence(tmp_path, small_embedded, monkeypatch):
    """A cadence step is written after the batch that stepped, never between accumulated batches (DiffewS
    accumulates 4), and ``--checkpoint_every_n_steps`` sets the cadence."""
    cfg = write_config(tmp_path, small_embedded, max_epochs=2, accumulate_grad_batches=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].update(batch_size=2, train_episodes=40)  # 20 batches = 10 optimizer steps per epoch
    cfg.write_text(yaml.safe_dump(raw))
    every3 = ["--checkpoint_every_n_steps", "3"]
    full = run_cli(["fit", "--config", str(cfg), *every3]).model.state_dict()
    step = PrototypeModule.training_step

    def crash(self, batch, batch_idx):
        if self.global_step == 7 and batch_idx % 2 == 1:  # in the middle of accumulating step 8
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PrototypeModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(["fit", "--config", str(cfg), *every3])
    monkeypatch.undo()
    newest = tmp_path / "runs/t/version_1/checkpoints/last.ckpt"
    assert torch.load(newest, map_location="cpu", weights_only=True)["global_step"] == 6
    resumed = run_cli(["fit", "--config", str(cfg), *every3, "--ckpt_path", str(newest)])
    assert resumed.trainer.global_step == 20
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, full[k]), k


# ---- no silent no-op -----------------------------------------------------------------------------------------------
def test_test_without_checkpoint_is_refused_unless_asked(tmp_path, small_embedded, capsys):
    cfg = write_config(tmp_path, small_embedded)
    assert run(["test", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint given" in err and "--no_ckpt" in err and not (tmp_path / "runs").exists()
    assert run(["validate", "--config", str(cfg)]) == 2
    assert run(["test", "--config", str(cfg), "--no-ckpt"]) == 0
    out = tmp_path / "runs/t/test_embedded_fold0_1shot"
    assert f"-> {out}/metrics.json" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["no_ckpt"] is True and metrics["ckpt_path"] is None
    assert yaml.safe_load((out / "config.yaml").read_text())["no_ckpt"] is True


def test_nothing_to_do_says_so_and_fails(trained, tmp_path, capsys):
    cfg, ckpt = trained
    assert run(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--data.test_episodes", "0"]) == 1
    assert "nothing was tested: 0 test episodes" in capsys.readouterr().err
    assert not (tmp_path / "runs/t/test_embedded_fold0_1shot").exists()  # and no folder left behind
    assert (
        run(["validate", "--config", str(cfg), "--ckpt_path", ckpt]) == 1
    )  # the config has limit_val_batches 0
    assert "nothing was validated" in capsys.readouterr().err
    assert (
        run(["validate", "--config", str(cfg), "--ckpt_path", ckpt, "--trainer.limit_val_batches", "1.0"])
        == 0
    )
    assert "fsseg validate: val/miou" in capsys.readouterr().out
    assert run(["fit", "--config", str(cfg), "--ckpt_path", ckpt]) == 1  # max_epochs already reached
    assert "nothing was trained" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs/t").iterdir()) == [
        "validate_embedded_fold0_1shot",
        "version_0",
    ]


# ---- no silent overwrite, no stray folders -------------------------------------------------------------------------
def test_an_existing_result_is_refused_unless_overwrite(trained, tmp_path, capsys):
    cfg, ckpt = trained
    assert run(["test", "--config", str(cfg), "--ckpt_path", ckpt]) == 0
    metrics = tmp_path / "runs/t/test_embedded_fold0_1shot/metrics.json"
    before = metrics.read_text()
    metrics.write_text("{}")  # marks the old result
    capsys.readouterr()
    assert run(["test", "--config", str(cfg), "--ckpt_path", ckpt]) == 2
    assert f"{metrics} (and" in capsys.readouterr().err and metrics.read_text() == "{}"
    assert run(["test", "--config", str(cfg), "--ckpt_path", ckpt, "--overwrite"]) == 0
    assert metrics.read_text() == before
    # another setting is another folder
    assert run(["test", "--config", str(cfg), "--ckpt", ckpt, "--data.shot", "2", "--data.seed", "3"]) == 0
    assert (tmp_path / "runs/t/test_embedded_fold0_2shot_seed3/metrics.json").is_file()
    # without a logger the report goes to trainer.default_root_dir, under the same rule
    no_logger = ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "plain")]
    assert run(["test", "--config", str(cfg), "--ckpt_path", ckpt, *no_logger]) == 0
    assert (tmp_path / "plain/metrics.json").is_file()
    capsys.readouterr()
    assert run(["test", "--config", str(cfg), "--ckpt_path", ckpt, *no_logger]) == 2
    assert "plain/metrics.json (and" in capsys.readouterr().err


def test_failed_runs_leave_no_empty_folders(trained, tmp_path, monkeypatch, capsys):
    cfg, ckpt = trained

    def broken(self, *args):
        raise RuntimeError("broken model")

    monkeypatch.setattr(PrototypeModule, "predict_masks", broken)
    assert run(["test", "--config", str(cfg), "--ckpt_path", ckpt]) == 1
    assert "RuntimeError: broken model (--traceback shows where)" in capsys.readouterr().err
    monkeypatch.setattr(PrototypeModule, "training_step", broken)
    assert run(["fit", "--config", str(cfg)]) == 1
    assert [p.name for p in (tmp_path / "runs/t").iterdir()] == ["version_0"]  # no test folder, no version_1
    monkeypatch.undo()
    elsewhere = ["--trainer.logger.init_args.save_dir", str(tmp_path / "new/runs"), "--data.benchmark", "pascal5i",
                 "--data.root", str(tmp_path / "absent")]  # fmt: skip
    assert run(["fit", "--config", str(cfg), *elsewhere]) == 2
    assert "absent does not exist" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_results_are_written_readable(trained, tmp_path):
    cfg, ckpt = trained
    old = os.umask(0o022)
    try:
        out = Path(run_cli(["test", "--config", str(cfg), "--ckpt_path", ckpt]).trainer.log_dir)
        from fsseg.predict import save_png

        save_png(Image.new("L", (4, 4)), tmp_path / "mask.png")
        os.umask(0o027)
        atomic_write_text(tmp_path / "group.txt", "x")
    finally:
        os.umask(old)
    assert (
        _mode(out / "metrics.json") == _mode(out / "episodes.jsonl") == _mode(tmp_path / "mask.png") == 0o644
    )
    assert _mode(tmp_path / "group.txt") == 0o640  # the umask decides, as for any new file


def test_evaluate_seeds_refuses_a_used_out_folder(trained, tmp_path, capsys):
    cfg, ckpt = trained
    out = tmp_path / "seeds"
    base = ["evaluate-seeds", "--out", str(out), "--config", str(cfg), "--ckpt", ckpt]
    assert run([*base, "--seeds", "2"]) == 0
    assert f"-> {out / 'seeds.json'}" in capsys.readouterr().out
    assert run([*base, "--seeds", "1"]) == 2
    assert "already holds results of an earlier fsseg evaluate-seeds" in capsys.readouterr().err
    assert (out / "seed1").is_dir()
    assert run([*base, "--seeds", "1", "--overwrite"]) == 0
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0] and not (out / "seed1").exists()


def test_evaluate_seeds_builds_the_model_once_and_equals_separate_tests(trained, tmp_path, monkeypatch):
    """Every seed's episodes as a separate ``fsseg test --data.seed s`` gives them, with one model build and one read
    of the checkpoint for all seeds."""
    from fsseg.seeds import evaluate_seeds

    cfg, ckpt = trained
    args = ["--config", str(cfg), "--ckpt", ckpt]
    alone = [run_cli(["test", *args, "--data.seed", str(s)], run_dir=tmp_path / f"alone{s}") for s in (0, 1)]
    builds, loads, init, load = [], [], PrototypeModule.__init__, torch.load
    monkeypatch.setattr(
        PrototypeModule, "__init__", lambda self, *a, **k: builds.append(1) or init(self, *a, **k)
    )
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or load(f, *a, **k))
    evaluate_seeds(args, [0, 1], tmp_path / "seeds")
    monkeypatch.undo()
    assert len(builds) == 1 and loads == [ckpt]
    for s, cli in zip((0, 1), alone):
        records = [
            json.loads(line) for line in (tmp_path / f"seeds/seed{s}/episodes.jsonl").read_text().splitlines()
        ]
        assert records == cli.report.records
    assert alone[0].report.records != alone[1].report.records  # the seeds draw other episodes
    with pytest.raises(ValueError, match="other settings: temperature"):
        run_cli(["test", *args, "--model.init_args.temperature", "3"], run_dir=tmp_path / "t", reuse=alone[0])


def test_metrics_record_the_checkpoint_as_an_absolute_path(trained, tmp_path, monkeypatch):
    """A test run given a relative --ckpt_path records it absolute: its readers (tools/) work from any folder."""
    cfg, ckpt = trained
    monkeypatch.chdir(Path(ckpt).parent)
    run_cli(["test", "--config", str(cfg), "--ckpt_path", Path(ckpt).name], run_dir=tmp_path / "rel")
    assert json.loads((tmp_path / "rel/metrics.json").read_text())["ckpt_path"] == str(ckpt)
    monkeypatch.chdir(tmp_path.parent)
    assert read_test_run(tmp_path / "rel", None)[3] == Path(ckpt)


# ---- the demo ------------------------------------------------------------------------------------------------------
def test_demo_tests_each_method_with_own_and_other_class_supports(
    tmp_path, small_embedded, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # from any folder: the default demo configs are the repository's
    assert [resolve_config(c) for c in ("demo_baseline", "demo_diffews", "demo_diffseg")] == [
        REPO / f"configs/demo_{m}.yaml" for m in ("baseline", "diffews", "diffseg")
    ]
    cfg = write_config(tmp_path, small_embedded).rename(tmp_path / "tiny_demo.yaml")
    out = tmp_path / "demo"
    assert run(["demo", str(cfg), "--out", str(out), "--test-episodes", "10"]) == 0
    printed = capsys.readouterr().out
    assert "other-class" in printed and f"summary -> {out / 'summary.json'}" in printed
    assert f"report -> {out / 'report/index.html'}" in printed  # the table as a page, with the control's page
    assert (out / "report/tiny_demo_support/index.html").is_file()
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["model"] == "PrototypeModule" and row["setting"]["episodes"] == 10
    assert row["support_gain"] == pytest.approx(row["miou"] - row["miou_other_class"])
    own = json.loads((out / "tiny_demo/test/metrics.json").read_text())
    other = json.loads((out / "tiny_demo/test_other_class/metrics.json").read_text())
    assert (own["support_control"], other["support_control"]) == ("none", "other_class")
    assert own["ckpt_path"] == other["ckpt_path"] == str(out / "tiny_demo/fit/checkpoints/last.ckpt")
    assert (row["miou"], row["miou_other_class"]) == (own["miou"], other["miou"])
    assert summary["wall_seconds"] > 0 and "wall time" in summary["table"]
    expected, _ = resolve_test_precision(cfg, "auto")  # both test runs at the precision the demo printed
    assert row["test_precision"] == own["precision"] == other["precision"] == expected
    assert f"tests in {expected}" in printed and f"tests in {expected}" in summary["table"]
    refs = {r["reference"]: r for r in summary["references"]}
    for name in ("all_foreground", "paste_support_mask"):  # each reference in its own folder
        metrics = json.loads((out / "references" / name / "metrics.json").read_text())
        assert metrics["model"] in ("AllForeground", "PasteSupportMask")
        assert refs[name.replace("_", " ")]["miou"] == metrics["miou"]
    assert refs["all foreground"]["miou"] != refs["paste support mask"]["miou"]
    assert run(["demo", str(cfg), "--out", str(out), "--test-episodes", "10"]) == 2  # no silent overwrite
    assert "already holds results of an earlier fsseg demo" in capsys.readouterr().err


def test_demo_test_precision_follows_the_flag_then_the_config_then_the_device(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer: {accelerator: cpu}\n")
    for amx, avx512 in ((False, False), (False, True), (True, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        precision, why = resolve_test_precision(cfg, "auto")
        assert precision == ("bf16-mixed" if amx or avx512 else "32-true")
        assert why.startswith("auto: this CPU")
        assert resolve_test_precision(cfg, "32-true") == ("32-true", "--test-precision")
    cfg.write_text("trainer: {accelerator: cpu, precision: 32-true}\n")  # a config's own setting is kept
    assert resolve_test_precision(cfg, "auto") == ("32-true", "trainer.precision in c.yaml")
    assert resolve_test_precision(cfg, "bf16-mixed")[0] == "bf16-mixed"  # the command line wins
    cfg.write_text("trainer: {precision: bf16}\n")  # Lightning's older spelling
    assert resolve_test_precision(cfg, "auto")[0] == "bf16-mixed"
    # a model's evaluation precision (the DiffewS paper configs' fp32, training in 16-mixed) comes first
    cfg.write_text("trainer: {precision: 16-mixed}\nmodel: {init_args: {eval_precision: 32-true}}\n")
    assert resolve_test_precision(cfg, "auto") == ("32-true", "model.init_args.eval_precision in c.yaml")
    cfg.write_text("trainer: {precision: 64-true}\n")
    with pytest.raises(ValueError, match="trainer.precision 64-true"):
        resolve_test_precision(cfg, "auto")
    with pytest.raises(SystemExit):
        run(["demo", str(cfg), "--test-precision", "fp16"])


def test_demo_table_names_the_edge_stand_in_of_diffseg():
    """Where the demo's DiffSeg numbers are printed, the Sobel stand-in for HED is named (HED: nothing added)."""
    from fsseg.demo import format_table

    setting = {"dataset": "embedded", "fold": 0, "shot": 1, "episodes": 10, "resolution": 64}
    rows = [{"config": f"configs/{name}.yaml", "model": model, "edge_source": edges, "miou": 30.0,
             "miou_other_class": 20.0, "support_gain": 10.0, "fbiou": 50.0, "seconds": 1.0, "setting": setting}
            for name, model, edges in (("demo_diffseg", "DiffSegModule", "sobel"), ("full", "DiffSegModule", "hed"),
                                       ("demo_baseline", "PrototypeModule", None))]  # fmt: skip
    lines = format_table(rows, []).splitlines()
    assert "tests in" not in lines[0]  # rows that do not say
    for r, precision in zip(rows, ("bf16-mixed", "32-true", "bf16-mixed")):
        r["test_precision"] = precision
    mixed = "; tests in bf16-mixed (demo_diffseg), 32-true (full), bf16-mixed (demo_baseline)"
    assert mixed in format_table(rows, [])
    rows[1]["test_precision"] = "bf16-mixed"
    assert format_table(rows, []).splitlines()[0].endswith("; tests in bf16-mixed")
    assert "demo_diffseg (DiffSegModule, Sobel edges in place of HED)" in lines[2]
    assert "full (DiffSegModule)" in lines[3] and "demo_baseline (PrototypeModule)" in lines[4]
