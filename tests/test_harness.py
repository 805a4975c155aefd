"""The harness under misuse, signals, full disks and concurrency: results never written into a training folder,
earlier results replaced only by complete new ones and only where fsseg wrote them, one writer per folder, exit
statuses of stopped runs (a SIGTERM'd fit resumable), atomic checkpoints, stale partial caches cleaned, one-line
errors, no option prefixes, no third-party noise, and no silent test on a checkpoint's training classes."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import FSSEG, REPO, write_config

from fsseg.callbacks import AtomicCheckpointIO
from fsseg.cli import run
from fsseg.cli.checkpoints import read_checkpoint
from fsseg.cli.configs import closest_names, known_configs
from fsseg.cli.noise import quiet_third_party
from fsseg.cli.trainer import run_cli
from fsseg.files import OutputExists
from fsseg.interrupts import Interrupted
from fsseg.models.baseline import PrototypeModule
from fsseg.output_folder import (
    LOCK,
    MANIFEST,
    FolderBusy,
    IncompleteFolder,
    OutputFolder,
    check_complete,
    replacing,
)

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def trained(tmp_path, small_embedded) -> tuple[Path, Path]:
    """(config, last.ckpt) of a 4-step baseline fit on fold 0, logged under tmp/runs/t/version_0."""
    cfg = write_config(tmp_path, small_embedded)
    return cfg, Path(run_cli(["fit", "--config", str(cfg)]).trainer.checkpoint_callback.last_model_path)


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}


def _interruptible() -> None:
    """In the child, before exec: SIGINT as in a terminal. A suite started in the background (``cmd &``, nohup)
    hands its children SIGINT ignored, which Python then keeps ignored; fsseg rightly does too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fsseg(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([FSSEG, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=_interruptible)  # fmt: skip


def _dead_pid() -> int:
    """The id of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- 1. where results go: never into a training folder, no checkpoint ever removed --------------------------------
def test_a_test_of_a_checkpoint_goes_beside_its_training_run_from_any_folder(
    trained, tmp_path, monkeypatch, capsys
):
    cfg, _ = trained
    demo = tmp_path / "demo/demo_baseline/fit"  # the demo's layout: the saved config names the version `fit`
    ckpt = Path(run_cli(["fit", "--config", str(cfg)], run_dir=demo).last_checkpoint)
    saved = ckpt.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    for extra in (
        [],
        ["--overwrite"],
    ):  # before: the test folder was fit/ itself; --overwrite deleted last.ckpt
        assert run(["test", "--ckpt", str(ckpt), "--data.test_episodes", "4", *extra]) == 0, (
            capsys.readouterr()
        )
        out = capsys.readouterr().out
        assert "the config's logger version 'fit' is not used" in out
        assert f"-> {tmp_path}/demo/demo_baseline/test_embedded_fold0_1shot/metrics.json" in out
        assert ckpt.read_bytes() == saved
        assert {p.name for p in demo.iterdir() if not p.name.startswith("events.")} == {
            "checkpoints", "config.yaml", "hparams.yaml"}  # fmt: skip
    assert list(elsewhere.iterdir()) == []  # nothing relative to the current folder
    # a fit resuming with the run's own config.yaml: a new version folder beside it, the checkpoint's kept
    assert run(["fit", "--ckpt", str(ckpt), "--trainer.max_epochs", "2", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert (
        f"a new version folder beside {demo}" in out
        and f"writing to {tmp_path}/demo/demo_baseline/version_0" in out
    )
    assert ckpt.read_bytes() == saved and list(elsewhere.iterdir()) == []


def test_no_command_writes_into_or_removes_a_training_folder(trained, tmp_path, capsys):
    cfg, ckpt = trained
    saved = ckpt.read_bytes()
    into_it = ["--trainer.logger.init_args.version", "0"]  # the training run's own folder, version_0
    assert run(["fit", "--config", str(cfg), *into_it, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{ckpt.parent.parent} holds the checkpoints of a training run" in err
        and "--overwrite included" in err
    )
    # an evaluation is named by what it evaluates, whatever version a config gives
    assert run(["test", "--config", str(cfg), "--ckpt", str(ckpt), *into_it, "--overwrite"]) == 0
    assert (tmp_path / "runs/t/test_embedded_fold0_1shot/metrics.json").is_file()
    assert ckpt.read_bytes() == saved and not (ckpt.parent.parent / "metrics.json").exists()


# ---- 2. --overwrite: replaced only by a complete new result, only what fsseg wrote ---------------------------------
def test_a_failed_overwrite_leaves_the_earlier_results(trained, tmp_path, monkeypatch, capsys):
    cfg, ckpt = trained
    base = ["test", "--config", str(cfg), "--ckpt", str(ckpt), "--data.test_episodes", "4"]
    assert run(base) == 0
    folder = tmp_path / "runs/t/test_embedded_fold0_1shot"
    (folder / "notes.txt").write_text("mine")  # a user's file in the run folder
    before = _files(folder)
    assert run([*base, "--overwrite", "--data.img_size", "0"]) != 0  # fails inside the run
    assert (
        run([*base, "--overwrite", "--data.benchmark", "pascal5i", "--data.root", str(tmp_path / "no")]) == 2
    )

    def broken(self, *args):
        raise RuntimeError("broken model")

    monkeypatch.setattr(PrototypeModule, "predict_masks", broken)
    assert run([*base, "--overwrite"]) == 1
    monkeypatch.undo()
    assert _files(folder) == before  # metrics.json, episodes.jsonl, config.yaml, ... as they were
    assert (
        sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    )  # no lock, nothing set aside
    capsys.readouterr()
    assert run([*base, "--overwrite", "--data.test_episodes", "3"]) == 0
    assert json.loads((folder / "metrics.json").read_text())["episodes"] == 3
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.glob("events.out.*"))) == 1


def test_evaluate_seeds_replaces_only_its_own_results(trained, tmp_path, capsys):
    cfg, ckpt = trained
    out = tmp_path / "seeds"
    base = [
        "evaluate-seeds",
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--ckpt",
        str(ckpt),
        "--data.test_episodes",
        "3",
    ]
    assert run([*base, "--seeds", "3"]) == 0
    assert json.loads((out / MANIFEST).read_text())["entries"] == {
        "seed0": "evaluate-seeds", "seed1": "evaluate-seeds", "seed2": "evaluate-seeds",
        "seeds.json": "evaluate-seeds",
    }  # fmt: skip
    (out / "seed5").mkdir()  # not a run: a user's folder
    (out / "seed5/keep.txt").write_text("mine")
    summary = (out / "seeds.json").read_text()
    capsys.readouterr()
    assert run([*base, "--seeds", "6", "--overwrite"]) == 2  # would write seed5: refused before any work
    assert "seed5 already exists and is not recorded in" in capsys.readouterr().err
    assert (out / "seeds.json").read_text() == summary and (out / "seed2/metrics.json").is_file()
    assert run([*base, "--seeds", "2", "--overwrite", "--data.img_size", "0"]) != 0  # fails at seed 0
    assert (out / "seeds.json").read_text() == summary and (out / "seed2/metrics.json").is_file()
    assert run([*base, "--seeds", "2", "--overwrite"]) == 0
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1]
    assert not (out / "seed2").exists()  # the earlier call's third seed: replaced with all its results
    assert (out / "seed5/keep.txt").read_text() == "mine"


def test_replacing_puts_everything_back_on_any_failure(tmp_path):
    out = tmp_path / "out"
    with replacing(out, "tool", ["a", "sub/b.txt"], overwrite=False):
        (out / "a").mkdir()
        (out / "a/x").write_text("1")
        (out / "sub").mkdir()
        (out / "sub/b.txt").write_text("1")
    (out / "user.txt").write_text("mine")
    for stop in (RuntimeError("failed"), KeyboardInterrupt(), Interrupted(signal.SIGTERM)):
        with pytest.raises(type(stop)), replacing(out, "tool", ["a", "sub/b.txt"], overwrite=True):
            assert (
                not (out / "a").exists() and (out / LOCK).is_file()
            )  # set aside while the new ones are made
            (out / "a").mkdir()
            (out / "a/x").write_text("half")
            raise stop
        assert (out / "a/x").read_text() == "1" and (out / "sub/b.txt").read_text() == "1"
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a", "sub", "user.txt"]
    with pytest.raises(
        OutputExists, match="user.txt already exists and is not recorded in .*fsseg-outputs.json"
    ):
        with replacing(out, "tool", ["user.txt"], overwrite=True):
            pass
    with pytest.raises(OutputExists, match="was written by fsseg tool"):
        with replacing(out, "other", ["a"], overwrite=True):
            pass
    assert (out / "user.txt").read_text() == "mine" and not (out / LOCK).exists()


def test_compare_json_and_tool_outputs_are_checked_before_the_work(trained, tmp_path, capsys):
    cfg, ckpt = trained
    assert run(["test", "--config", str(cfg), "--ckpt", str(ckpt), "--data.test_episodes", "4"]) == 0
    a = tmp_path / "runs/t/test_embedded_fold0_1shot"
    (tmp_path / "dir").mkdir()
    capsys.readouterr()
    assert run(["compare", str(a), str(a), "--json", str(tmp_path / "dir"), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == f"fsseg compare: error: --json {tmp_path / 'dir'} is a folder: give " \
        "the name of the file to write"  # fmt: skip
    assert run(["compare", str(a), str(a), "--json", str(tmp_path / "c.json")]) == 0
    assert run(["compare", str(a), str(a), "--json", str(tmp_path / "c.json")]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err


# ---- 3. one writer per folder --------------------------------------------------------------------------------------
HOLD = """
import sys, time
from fsseg.output_folder import OutputFolder
OutputFolder(sys.argv[1], "holder").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_killed_writers_lock_taken_over(trained, tmp_path, capsys):
    cfg, ckpt = trained
    folder = tmp_path / "runs/t/test_embedded_fold0_1shot"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["test", "--config", str(cfg), "--ckpt", str(ckpt), "--data.test_episodes", "4"]
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{folder} is being written by process {holder.pid} on " in err
        with pytest.raises(IncompleteFolder, match="is being written by"):
            check_complete(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.raises(IncompleteFolder, match=f"process {holder.pid} .* stopped before finishing"):
        check_complete(folder)
    assert run(["compare", str(folder), str(folder)]) == 2
    assert "is incomplete" in capsys.readouterr().err
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert f"{folder} was left incomplete by process {holder.pid}" in out and "taking it over" in out
    assert not (folder / LOCK).exists() and (folder / "metrics.json").is_file()
    with OutputFolderHeld(folder):  # in this process: a second hold on the same folder is refused too
        with pytest.raises(FolderBusy, match=f"process {os.getpid()}"):
            OutputFolder(folder, "again").acquire()


class OutputFolderHeld:
    def __init__(self, folder: Path) -> None:
        self.out = OutputFolder(folder, "held")

    def __enter__(self):
        return self.out.acquire()

    def __exit__(self, *exc):
        self.out.release()


@pytest.mark.slow  # two `fsseg test` processes; the lock itself: test_a_second_writer_is_refused_...
def test_two_concurrent_tests_into_one_folder_never_mix(trained, tmp_path):
    cfg, ckpt = trained
    other = tmp_path / "other.ckpt"
    other.write_bytes(ckpt.read_bytes())
    procs = [subprocess.Popen([FSSEG, "test", "--config", str(cfg), "--ckpt", str(c), "--data.test_episodes", "8"],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (ckpt, other)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], (
        results
    )  # the second is refused: busy, or (if the first had finished) results exist
    folder = tmp_path / "runs/t/test_embedded_fold0_1shot"
    metrics = json.loads((folder / "metrics.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert metrics["ckpt_path"] == str(Path(config["ckpt_path"]).absolute())  # one run's files, not a mix


def test_a_killed_replacement_is_undone_by_the_next_writer(tmp_path, capsys):
    out = tmp_path / "out"
    with replacing(out, "tool", ["r.txt"], overwrite=False):
        (out / "r.txt").write_text("old")
    code = f"""
import os, signal
from pathlib import Path
from fsseg.output_folder import replacing
with replacing(Path({str(out)!r}), "tool", ["r.txt"], overwrite=True):
    Path({str(out)!r}, "r.txt").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", code], env=_env())
    assert killed.returncode == -signal.SIGKILL
    assert (out / "r.txt").read_text() == "half" and (out / LOCK).is_file()  # what the SIGKILL left
    with pytest.raises(IncompleteFolder):
        check_complete(out)
    with replacing(out, "tool", ["r.txt"], overwrite=True, say=print):
        assert not (
            out / "r.txt"
        ).exists()  # the old result was put back, then set aside again by this writer
        (out / "r.txt").write_text("new")
    printed = capsys.readouterr().out
    assert "removed its partial output (r.txt)" in printed and "put back the 1 earlier result(s)" in printed
    assert (out / "r.txt").read_text() == "new" and sorted(p.name for p in out.iterdir()) == [
        MANIFEST,
        "r.txt",
    ]


# ---- 4. exit statuses; a SIGTERM'd fit is resumable ---------------------------------------------------------------
def _signal_config(tmp_path, data, signame, stage, batch, **trainer) -> Path:
    cb = {
        "class_path": "_signals.SignalAt",
        "init_args": {"signame": signame, "stage": stage, "batch": batch},
    }
    cfg = write_config(tmp_path, data, callbacks=[cb], **trainer)
    return cfg.rename(tmp_path / f"{signame}_{stage}.yaml")


def test_sigterm_stops_fit_at_an_optimizer_step_with_a_resumable_checkpoint(tmp_path, small_embedded):
    # 8 batches of 2 episodes, 2 per optimizer step: the SIGTERM comes at the start of batch 2 (the first half of
    # step 2); the fit finishes that step, saves it and stops
    cfg = _signal_config(tmp_path, small_embedded, "SIGTERM", "train", 2, accumulate_grad_batches=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["batch_size"] = 2
    cfg.write_text(yaml.safe_dump(raw))
    res = _fsseg("fit", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 143, res.stderr[-2000:]
    ckpt = tmp_path / "runs/t/version_0/checkpoints/last.ckpt"
    assert f"stopped by SIGTERM at step 2; resumable checkpoint (step 2): {ckpt}" in res.stdout
    assert res.stderr.strip().endswith("fsseg fit: stopped by SIGTERM")
    assert read_checkpoint(ckpt)["global_step"] == 2 and not (ckpt.parent.parent / LOCK).exists()
    raw["trainer"]["callbacks"] = []
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw))
    resumed = run_cli(["fit", "--config", str(plain), "--ckpt_path", str(ckpt)])
    full = run_cli(["fit", "--config", str(plain)])
    assert resumed.trainer.global_step == full.trainer.global_step == 4
    expected = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_sigterm_and_sigint_stop_a_test_without_a_result(trained, tmp_path, small_embedded):
    cfg, ckpt = trained
    assert run(["test", "--config", str(cfg), "--ckpt", str(ckpt), "--data.test_episodes", "4"]) == 0
    folder = tmp_path / "runs/t/test_embedded_fold0_1shot"
    before = _files(folder)
    for signame, code in (("SIGTERM", 143), ("SIGINT", 130)):
        sig = _signal_config(tmp_path, small_embedded, signame, "test", 1)
        res = _fsseg("test", "--config", str(sig), "--ckpt", str(ckpt), "--overwrite", cwd=tmp_path)
        assert res.returncode == code, res.stderr[-2000:]
        assert f"fsseg test: stopped by {signame}: no result written" in res.stdout
        assert _files(folder) == before and not (folder / LOCK).exists()  # the earlier result, put back


@pytest.mark.slow  # a third `fsseg` process; SIGINT's status is also tested on `test` above
def test_sigint_stops_fit_with_status_130(tmp_path, small_embedded):
    cfg = _signal_config(tmp_path, small_embedded, "SIGINT", "train", 1)
    res = _fsseg("fit", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 130 and "fsseg fit: interrupted (SIGINT)" in res.stderr, res.stderr[-2000:]
    assert "stopped by SIGINT at step 1" in res.stdout


# ---- 5. checkpoints written atomically ----------------------------------------------------------------------------
def test_a_full_disk_never_truncates_or_replaces_a_checkpoint(trained, tmp_path, monkeypatch):
    cfg, ckpt = trained
    good = ckpt.read_bytes()
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # half of the checkpoint is written, then the disk is full
        save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=f"No space left on device: writing {ckpt} failed"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, ckpt)
    assert ckpt.read_bytes() == good and sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]
    # the same in a fit that rewrites its last.ckpt: the command fails, the checkpoint is the earlier one, intact
    monkeypatch.undo()
    resumed = ["fit", "--config", str(cfg), "--ckpt", str(ckpt), "--trainer.max_epochs", "2"]
    fit = run_cli(resumed)
    assert isinstance(fit.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    newest = Path(fit.last_checkpoint)
    good = newest.read_bytes()
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        run_cli(["fit", "--config", str(cfg), "--ckpt", str(newest), "--trainer.max_epochs", "3",
                 "--trainer.logger.init_args.version", "9"])  # fmt: skip
    monkeypatch.undo()
    assert newest.read_bytes() == good and read_checkpoint(newest)["global_step"] == 8
    assert sorted(p.name for p in (tmp_path / "runs/t/version_9/checkpoints").iterdir()) == []


# ---- 6. a killed latent-cache build's partial folder is removed by the next build -------------------------------
def test_the_next_cache_build_removes_partial_folders_of_killed_builds(tmp_path, small_embedded, capsys):
    from fsseg.data.datamodule import FewShotDataModule
    from fsseg.data.latent_cache import MOMENTS
    from fsseg.models.diffews import DiffewsModule
    from fsseg.models.diffews.tiny import write_tiny_sd

    cache = tmp_path / "cache"
    dead, host = _dead_pid(), socket.gethostname()
    stale = [
        tmp_path / f".cache.partial-{dead}-0badc0de",
        tmp_path / f".cache.partial-{host}-{dead}-0badc0de",
    ]
    alive = [
        tmp_path / f".cache.partial-{host}-{os.getpid()}-00000001",
        tmp_path / f".cache.partial-elsewhere-{dead}-2",
    ]
    for p in stale + alive:
        p.mkdir()
        (p / MOMENTS).write_bytes(b"\0" * 1000)
    dm = FewShotDataModule(root=str(small_embedded), benchmark="embedded", img_size=64, train_episodes=4)
    dm.setup("fit")
    module = DiffewsModule(pretrained=str(write_tiny_sd(tmp_path / "sd", seed=0)), latent_cache=str(cache))
    dm.use_latent_cache(cache, **module.latent_encoder())
    assert (cache / MOMENTS).is_file()
    assert [p.exists() for p in stale + alive] == [
        False,
        False,
        True,
        True,
    ]  # a live build's, another host's: kept


# ---- 7. one-line errors, no option prefixes, no third-party noise, config names -----------------------------------
def test_unclear_errors_are_one_line_naming_the_path(trained, tmp_path, capsys, monkeypatch):
    cfg, ckpt = trained
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv in (["evaluate-seeds", "--out", str(a_file), "--config", str(cfg), "--ckpt", str(ckpt)],
                 ["evaluate-seeds", "--out", str(a_file / "sub"), "--config", str(cfg), "--ckpt", str(ckpt)],
                 ["demo", str(cfg), "--out", str(a_file)]):  # fmt: skip
        assert run(argv) == 2
        err = capsys.readouterr().err
        out = argv[argv.index("--out") + 1]
        assert err.count("\n") == 1 and f"--out {out} is not a folder" in err and "Errno" not in err, err
    monkeypatch.setenv("FSSEG_CACHE", str(a_file))  # the embedded benchmark's default root is under it
    raw = yaml.safe_load(cfg.read_text())
    del raw["data"]["root"]
    cfg.write_text(yaml.safe_dump(raw))
    assert run(["test", "--config", str(cfg), "--ckpt", str(ckpt), "--data.test_episodes", "2"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and str(a_file) in err
        and f"FSSEG_CACHE is {a_file}" in err
        and "[Errno" not in err
    )


def test_option_prefixes_are_refused_in_every_command(trained, tmp_path, capsys):
    cfg, ckpt = trained
    a = str(tmp_path / "x")
    for argv in (["test", "--config", str(cfg), "--ckpt", str(ckpt), "--data.test_ep", "8"],
                 ["fit", "--config", str(cfg), "--trainer.max_ep", "1"],
                 ["evaluate-seeds", "--out", a, "--see", "2", "--config", str(cfg), "--ckpt", str(ckpt)],
                 ["demo", str(cfg), "--out", a, "--test-ep", "3"],
                 ["compare", a, a, "--n-bo", "3"],
                 ["cache-latents", "--config", str(cfg), "--data.fol", "1"],
                 ["predict-images", "--config", str(cfg), "--ckpt", str(ckpt), "--supp", a, "--support-mask", a,
                  "--query", a, "--out", a],
                 ["data", "check", "--ro", a],
                 ["report", a, "--ov"],
                 ["plan", "--config", str(cfg), "--js", a]):  # fmt: skip
        try:
            code = run(argv)
        except SystemExit as e:  # argparse's own usage error
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert any(
            p in err
            for p in (
                "test_ep",
                "max_ep",
                "--see",
                "--test-ep",
                "--n-bo",
                "data.fol",
                "--supp",
                "--ro",
                "--ov",
                "--js",
            )
        ), err
    assert not Path(a).exists()


def test_config_names_suggest_their_family_first():
    known = known_configs(REPO / "configs")
    family = closest_names("demo_nonexist", known)  # before: diffews_incontext
    assert {"demo_diffews", "demo_diffseg", "demo_baseline"} <= set(family)
    assert all(name.startswith("demo_") for name in family)
    assert closest_names("difews", known)[0] == "diffews"
    assert closest_names("diffews_incontxt", known)[0] == "diffews_incontext"


def test_third_party_noise_is_silenced_and_fsseg_warnings_are_not(trained, tmp_path):
    cfg, ckpt = trained
    res = _fsseg("test", "--config", str(cfg), "--ckpt", str(ckpt), "--data.test_episodes", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for noise in ("💡 Tip", "litlogger", "LeafSpec", "callbacks used to create the checkpoint"):
        assert noise not in res.stderr + res.stdout, noise
    import diffusers.models.modeling_utils as modeling_utils  # the filtered text is diffusers' own

    assert (
        "Cannot initialize model with low cpu memory usage because `accelerate`"
        in Path(modeling_utils.__file__).read_text()
    )
    quiet_third_party()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(handler)
    try:
        logger.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found")
        logger.warning("another diffusers warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another diffusers warning"]
    with pytest.warns(UserWarning, match="fsseg's own"):
        import warnings

        warnings.warn("fsseg's own", UserWarning, stacklevel=1)


# ---- 8. a checkpoint tested on classes it was trained on ----------------------------------------------------------
def test_testing_on_the_training_classes_is_refused_unless_allowed(trained, tmp_path, capsys):
    cfg, ckpt = trained  # trained on fold 0: the embedded benchmark's classes of folds 1-3
    argv = ["test", "--ckpt", str(ckpt), "--fold", "1", "--data.test_episodes", "4"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        "was trained on embedded fold 0, whose training classes include 5 of the 5 classes that test fold 1"
        in err
    )
    assert "--allow_trained_classes" in err and not (tmp_path / "runs/t/test_embedded_fold1_1shot").exists()
    assert run([*argv, "--allow_trained_classes"]) == 0
    folder = tmp_path / "runs/t/test_embedded_fold1_1shot"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["allow_trained_classes"] is True and metrics["trained_classes_evaluated"] == [
        5,
        6,
        7,
        8,
        9,
    ]
    assert yaml.safe_load((folder / "config.yaml").read_text())["allow_trained_classes"] is True
    capsys.readouterr()
    assert run(["test", "--ckpt", str(ckpt), "--data.test_episodes", "4"]) == 0  # its own fold: no word
    assert "trained on" not in capsys.readouterr().out
    # a checkpoint that does not record its data settings cannot be checked: said, and tested
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    del raw["datamodule_hyper_parameters"]
    bare = ckpt.parent / "bare.ckpt"
    torch.save(raw, bare)
    assert run(["test", "--ckpt", str(bare), "--fold", "1", "--data.test_episodes", "4", "--overwrite"]) == 0
    assert (
        "cannot check whether the evaluated classes were among the training classes"
        in capsys.readouterr().out
    )


def test_help_states_the_exit_statuses(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert "130 interrupted (SIGINT" in out and "143 stopped by SIGTERM" in out and "2 refused" in out


# ---- 8. one cache folder: $FSSEG_CACHE, else ~/.cache/fsseg, also in config paths ---------------------------------
def test_cache_paths_follow_fsseg_cache(tmp_path, monkeypatch):
    from fsseg.data.embedded import default_embedded_root
    from fsseg.files import cache_root, expand_path

    monkeypatch.setenv("FSSEG_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert default_embedded_root().parent == tmp_path / "c"
    for spelled in ("$FSSEG_CACHE/latents/x", "${FSSEG_CACHE}/latents/x"):
        assert expand_path(spelled) == tmp_path / "c/latents/x"
    assert expand_path("$FSSEG_CACHEX/y") == Path("$FSSEG_CACHEX/y")  # another variable's name is not ours
    monkeypatch.delenv("FSSEG_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert expand_path("$FSSEG_CACHE/latents/x") == tmp_path / "home/.cache/fsseg/latents/x"
    assert expand_path("~/z") == tmp_path / "home/z"
    # the shipped demo config names its latent cache under $FSSEG_CACHE, never a fixed home folder
    demo = yaml.safe_load((Path(__file__).parents[1] / "configs/demo_diffews.yaml").read_text())
    assert demo["model"]["init_args"]["latent_cache"].startswith("$FSSEG_CACHE/")
