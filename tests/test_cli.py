"""The CLI end to end on a small embedded benchmark: fit -> test round trip, the test report, DDP equality,
resume equality, the dispatcher (help, errors in one line, config names), and the import graph."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fsseg.cli import COMMANDS, run
from fsseg.cli.configs import ConfigNotFound, resolve_config
from fsseg.cli.trainer import CHECKPOINT_EVERY_N_STEPS, condense_parse_error, expand_shorthands, run_cli

REPO = Path(__file__).resolve().parents[1]
FSSEG = str(Path(sys.executable).parent / "fsseg")  # the installed command (DDP re-launches its command line)


def write_config(tmp: Path, data_root: Path, logger_name: str | None = "t", **trainer) -> Path:
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
                "init_args": {"save_dir": str(tmp / "runs"), "name": logger_name},
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
    fit = run_cli(["fit", "--config", str(cfg), "--fold", "2"])
    ckpt = Path(fit.trainer.checkpoint_callback.last_model_path)
    assert ckpt == tmp_path / "runs/t/version_0/checkpoints/last.ckpt" and ckpt.is_file()
    # `--ckpt` alone finds the run's saved config.yaml; `--fold` selects the held-out fold
    argv, overwrite = expand_shorthands(["test", "--ckpt", str(ckpt), "--fold", "2"])
    assert argv[:3] == ["test", "--config", str(ckpt.parent.parent / "config.yaml")] and not overwrite
    test = run_cli(argv)
    out = Path(test.trainer.log_dir)
    assert (
        out == tmp_path / "runs/t/test_embedded_fold2_1shot"
    )  # named by what was evaluated, no version number
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fold"] == 2 and metrics["shot"] == 1 and metrics["dataset"] == "embedded"
    assert metrics["episodes"] == 24 and metrics["seed"] == 0 and metrics["resolution"] == 48
    assert metrics["ckpt_path"] == str(ckpt)
    assert metrics["model_settings"]["class_path"] == "fsseg.models.baseline.PrototypeModule"
    assert metrics["model_settings"]["init_args"]["embed_dim"] == 16
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
    # a second training run takes the next version; the test folder does not count as one
    assert Path(run_cli(["fit", "--config", str(cfg)]).trainer.log_dir) == tmp_path / "runs/t/version_1"


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path, small_embedded):
    # 2 epochs of 4 batches; checkpoints every 3 steps: step 3 is mid-epoch 0, step 6 mid-epoch 1
    every3 = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "filename": "{step}"},
        }
    ]
    cfg = write_config(tmp_path, small_embedded, max_epochs=2, callbacks=every3)
    run_ = run_cli(["fit", "--config", str(cfg)])
    full = run_.model.state_dict()
    ckpts = Path(run_.trainer.log_dir) / "checkpoints"
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


def _fsseg(*args, cwd, env=None, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    res = subprocess.run([FSSEG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_ddp_test_equals_single_process(tmp_path, small_embedded):
    cfg = write_config(tmp_path, small_embedded, enable_checkpointing=True)
    fit = run_cli(["fit", "--config", str(cfg)])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    reports = []
    for name, extra in (("one", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        log = ["--trainer.logger.init_args.name", name]
        res = _fsseg("test", "--config", str(cfg), "--ckpt_path", ckpt, "--data.test_episodes", "23", *log, *extra,
                     cwd=tmp_path)  # fmt: skip
        out = tmp_path / "runs" / name / "test_embedded_fold0_1shot"
        assert (
            f"-> {out}/metrics.json" in res.stdout and res.stdout.count("fsseg test: mIoU") == 1
        )  # rank 0 only
        reports.append(((out / "metrics.json").read_text(), (out / "episodes.jsonl").read_text()))
    (m1, e1), (m2, e2) = reports
    assert e1 == e2 and len(e1.splitlines()) == 23  # 23 episodes on 2 processes: no padding, none twice
    m1, m2 = json.loads(m1), json.loads(m2)
    for key in ("miou", "fbiou", "per_class_iou", "episodes"):
        assert m1[key] == m2[key], key


# ---- the dispatcher ----------------------------------------------------------------------------------------------
def test_help_lists_every_command_and_method_without_heavy_imports(tmp_path):
    res = _fsseg("--help", cwd=tmp_path)
    listed = [
        line.split()[0] for line in res.stdout.split("commands:")[1].split("\n\n")[0].strip().splitlines()
    ]
    assert listed == list(COMMANDS) == [
        "fit", "validate", "test", "predict-images", "evaluate-seeds", "compare", "report", "demo", "data",
        "cache-latents", "plan",
    ]  # fmt: skip
    for path in ("fsseg.models.diffews.DiffewsModule", "fsseg.models.diffseg.DiffSegModule",
                 "fsseg.models.baseline.PrototypeModule"):  # fmt: skip
        assert path in res.stdout
    assert str(REPO / "configs") in res.stdout  # where bare config names are found
    assert (
        f"every {CHECKPOINT_EVERY_N_STEPS} steps" in COMMANDS["fit"][1]
    )  # the help states the shipped cadence
    # the dispatcher imports no torch/Lightning: that is what makes `fsseg --help` answer at once
    code = "import sys, fsseg.cli; fsseg.cli.usage(); print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert out.stdout.strip() == "[]", out.stderr
    # no command: the help on stderr and a failure status; a removed or mistyped command is named
    assert _fsseg(cwd=tmp_path, check=False).returncode == 2
    res = _fsseg("predict", "--config", "x.yaml", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "predict-images" in res.stderr
    res = _fsseg("tset", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "did you mean test" in res.stderr


def test_subcommand_help_documents_shorthands(capsys):
    with pytest.raises(SystemExit) as done:
        run_cli(["test", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for text in ("--fold N", "--ckpt PATH", "--no_ckpt", "--overwrite", "fsseg.models.diffews.DiffewsModule",
                 "test_<benchmark>_fold<F>_<K>shot"):  # fmt: skip
        assert text in out, text


def test_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FSSEG_CONFIGS", raising=False)
    configs = REPO / "configs"
    assert resolve_config("diffews") == configs / "diffews.yaml"
    assert resolve_config("diffews.yaml") == configs / "diffews.yaml"
    assert resolve_config("configs/diffseg.yaml") == configs / "diffseg.yaml"  # repo-relative, from elsewhere
    assert resolve_config("ablations/diffews/fusion_qkv") == configs / "ablations/diffews/fusion_qkv.yaml"
    (tmp_path / "mine.yaml").write_text("{}")
    assert resolve_config("mine") == Path("mine.yaml")  # the current folder first
    with pytest.raises(ConfigNotFound, match=r"did you mean: diffews, demo_diffews"):
        resolve_config("difews")
    with pytest.raises(ConfigNotFound, match=r"ablations/diffews/fusion_qkv"):
        resolve_config("fusion_qvk")
    # FSSEG_CONFIGS (e.g. for an installed wheel, which has no configs/) is searched first
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "diffews.yaml").write_text("{}")
    monkeypatch.setenv("FSSEG_CONFIGS", str(tmp_path / "cfgs"))
    assert resolve_config("diffews") == tmp_path / "cfgs" / "diffews.yaml"
    # the shorthands resolve --config names
    argv, _ = expand_shorthands(["fit", "--config", "diffseg", "--overwrite"])
    assert argv == ["fit", "--config", str(configs / "diffseg.yaml")]


def test_errors_are_one_line_and_traceback_on_request(tmp_path, small_embedded, capsys):
    cfg = write_config(tmp_path, small_embedded)
    assert run(["test", "--config", str(cfg), "--no_ckpt", "--data.foldd", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "foldd" in err and "fsseg test --help" in err
    assert run(["fit", "--config", str(cfg), "--trainer.max_epochs", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsseg fit: error: trainer.max_epochs:") and err.count("\n") == 1 and "abc" in err
    assert run(["fit", "--config", "difews"]) == 2
    assert "did you mean: diffews" in capsys.readouterr().err
    with pytest.raises(ConfigNotFound):  # --traceback: the exception itself
        run(["fit", "--config", "difews", "--traceback"])
    # a model that fails to build (its weights are missing): its own message, in one line
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = {"class_path": "fsseg.models.diffews.DiffewsModule",
                    "init_args": {"pretrained": str(tmp_path / "no_sd_here")}}  # fmt: skip
    (tmp_path / "diffews.yaml").write_text(yaml.safe_dump(raw))
    assert run(["fit", "--config", str(tmp_path / "diffews.yaml")]) == 2
    (line,) = [
        x for x in capsys.readouterr().err.splitlines() if x.startswith("fsseg")
    ]  # (diffusers warns too)
    assert line.startswith("fsseg fit: error: model: ") and "no_sd_here" in line
    res = _fsseg("fit", "--config", "difews", cwd=tmp_path, env={"FSSEG_TRACEBACK": "1"}, check=False)
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr


def test_condense_parse_error():
    msg = """Parser key "trainer.max_epochs":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'int'>, <class 'NoneType'>]
  Errors:
    - Expected a <class 'int'>
    - Expected a <class 'NoneType'>
  Given value type: <class 'str'>
  Given value: abc"""
    assert condense_parse_error(msg) == "trainer.max_epochs: Expected a <class 'int'> (given: abc)"
    assert condense_parse_error("unrecognized arguments: --x 1") == "unrecognized arguments: --x 1"


# ---- no import cycles ----------------------------------------------------------------------------------------------
def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The fsseg modules ``path`` imports (at any level of the file), resolved to modules that exist."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != module}
    return found


def test_no_import_cycles_in_the_package():
    files = {p: ".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "fsseg").rglob("*.py")}
    files = {p: m.removesuffix(".__init__") for p, m in files.items()}
    modules = set(files.values())
    graph = {m: _imports(p, m, modules) for p, m in files.items()}
    assert "fsseg.cli.trainer" in graph["fsseg.demo"] and "fsseg.cli" not in graph["fsseg.demo"]
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    # the dispatcher reaches its commands only by name, and no command module imports the dispatcher
    assert graph["fsseg.cli"] <= {
        "fsseg.cli.configs",
        "fsseg.cli.noise",
        "fsseg.interrupts",
    }  # standard library
    assert not [m for m, deps in graph.items() if "fsseg.cli" in deps and m != "fsseg.cli.__main__"]


def _module_level_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The fsseg modules that importing ``path`` loads: its imports outside functions (relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.ClassDef | ast.If | ast.Try | ast.With):
            todo += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for n in names:  # importing a.b.c loads a and a.b too
            found |= {".".join(n.split(".")[:i]) for i in range(2, n.count(".") + 2)} & modules
    return found - {module}


def test_models_import_no_data_code_and_read_no_data_module():
    """The layers (docs/ARCHITECTURE.md): importing a model loads no data code (episodes are `fsseg.episode`'s
    contract), and no model reaches into a data module (``trainer.datamodule``)."""
    files = {p: ".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "fsseg").rglob("*.py")}
    files = {p: m.removesuffix(".__init__") for p, m in files.items()}
    modules = set(files.values())
    graph = {m: _module_level_imports(p, m, modules) for p, m in files.items()}
    for path, m in files.items():
        if not m.startswith("fsseg.models"):
            continue
        seen, todo = set(), [m]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        data = sorted(n for n in seen if n == "fsseg.data" or n.startswith("fsseg.data."))
        assert not data, f"importing {m} loads {data}"
        tree = ast.parse(path.read_text())
        reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "datamodule"]
        assert not reads, f"{path} lines {reads} read a data module"
    assert "fsseg.models.diffews.module" in graph and graph["fsseg.models.base"]  # the scan found the models
