"""The configs compose as documented: overlays on their bases (several --config, as LightningCLI merges them), the
released DiffewS recipe, the ablation overlays' evaluation settings, and no run-name boilerplate in the overlays."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fsseg.cli.trainer import parse_command

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DIFFEWS_ABLATIONS = sorted((CONFIGS / "ablations/diffews").glob("*.yaml"))


def parse(*configs: str) -> dict:
    """The merged config of ``configs`` (relative to configs/), as ``fsseg fit`` parses it (nothing built)."""
    return parse_command(["fit", *(a for c in configs for a in ("--config", str(CONFIGS / c)))]).as_dict()


def sched(cfg: dict) -> dict:
    return cfg["model"]["init_args"]["scheduler"]["init_args"]


def test_incontext_is_an_overlay_on_the_paper_recipe():
    base, ctx = parse("diffews.yaml"), parse("diffews.yaml", "diffews_incontext.yaml")
    assert ctx["trainer"]["max_steps"] == sched(ctx)["total_iters"] == 30000
    assert ctx["trainer"]["limit_val_batches"] == 0 and ctx["data"]["train_benchmarks"] == [
        "coco20i",
        "ade20k",
        "pascal5i",
    ]
    assert ctx["data"]["test_episodes"] is None
    for key in ("effective_batch_size", "batch_size", "img_size", "eval_size"):  # inherited
        assert ctx["data"][key] == base["data"][key]
    assert ctx["model"]["init_args"]["optimizer"] == base["model"]["init_args"]["optimizer"]
    assert base["data"]["effective_batch_size"] == 16 and base["trainer"]["accumulate_grad_batches"] == 1
    assert base["trainer"]["max_steps"] == sched(base)["total_iters"] == 10000


@pytest.mark.parametrize(
    "overlays",
    [(), ("diffews_incontext.yaml",), ("diffews_released.yaml",)],
    ids=["paper", "incontext", "released"],
)
def test_diffews_paper_configs_train_in_16_mixed_and_evaluate_in_fp32(overlays):
    cfg = parse("diffews.yaml", *overlays)
    assert (
        cfg["trainer"]["precision"] == "16-mixed" and cfg["model"]["init_args"]["eval_precision"] == "32-true"
    )


def test_released_recipe():
    cfg = parse("diffews.yaml", "diffews_released.yaml")
    assert cfg["seed_everything"] == 42 and cfg["data"]["seed"] == 0  # published evaluation episodes
    assert cfg["trainer"]["max_steps"] == sched(cfg)["total_iters"] == 20000
    assert cfg["data"]["effective_batch_size"] == 4 and cfg["data"]["batch_size"] == 1
    assert cfg["model"]["init_args"]["train_shots"] == 2 and cfg["data"]["shot"] == 2
    assert cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1e-5
    assert cfg["trainer"]["precision"] == "16-mixed"  # the script trains with fp16 mixed precision
    # 2000 optimizer steps per epoch at 4 episodes per step: the script's validation/checkpoint interval
    assert cfg["data"]["train_episodes"] // cfg["data"]["effective_batch_size"] == 2000


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_released_schedule_equals_diffusers_polynomial_decay_to_1e7():
    """LinearLR(end_factor 0.01) over 20k steps is diffusers' polynomial schedule (power 1, lr_end 1e-7)."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    s = sched(parse("diffews.yaml", "diffews_released.yaml"))
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    ours = torch.optim.lr_scheduler.LinearLR(ours_opt, **s)
    ref = get_polynomial_decay_schedule_with_warmup(ref_opt, 0, 20000, lr_end=1e-7, power=1.0)
    for step in range(20001):
        if step % 2500 == 0 or step == 20000:
            assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-6, abs=1e-13), step
        ours.step(), ref.step()  # no optimizer step needed to move the schedules
    assert ours.get_last_lr()[0] == pytest.approx(1e-7)


def test_diffseg_coco_is_an_overlay_selecting_the_40_20_20_split():
    base, coco = parse("diffseg.yaml"), parse("diffseg.yaml", "diffseg_coco.yaml")
    assert coco["data"]["benchmark"] == "coco_40_20_20"
    assert {k: v for k, v in coco["data"].items() if k != "benchmark"} == {
        k: v for k, v in base["data"].items() if k != "benchmark"
    }
    assert coco["model"] == base["model"] and coco["trainer"] == base["trainer"]
    assert "diffseg_coco" in (CONFIGS / "diffseg_coco.yaml").read_text().splitlines()[2]  # its own command


@pytest.mark.parametrize("path", DIFFEWS_ABLATIONS, ids=lambda p: p.stem)
def test_diffews_ablation_overlay_evaluation_and_batch(path):
    raw = yaml.safe_load(path.read_text())
    assert "logger" not in (raw.get("trainer") or {})
    test_time = path.stem.startswith(("threshold_", "nshot_"))
    bases = (
        ("diffews.yaml", "diffews_incontext.yaml") if path.stem.startswith("nshot_") else ("diffews.yaml",)
    )
    cfg = parse(*bases, f"ablations/diffews/{path.name}")
    init = cfg["model"]["init_args"]
    if test_time:  # evaluation rows run in fp32, as the released evaluation
        assert cfg["trainer"]["precision"] == "32-true"
    else:  # trained as the paper's ablations: 4 episodes per optimizer step
        assert cfg["data"]["effective_batch_size"] == 4
    if path.stem.startswith("threshold_"):
        kind, value = path.stem.split("_")[1:]
        assert (init["threshold_mode"], init["threshold"]) == (kind, float(value))
    elif path.stem.startswith(
        ("nshot_", "train_shots_")
    ):  # Tables 6/7 rows equal Tables 1/2: the relative 0.25
        assert (init["threshold_mode"], init["threshold"]) == ("relative", 0.25)
    else:  # the released evaluation's absolute 0.1 (inferred; see the header)
        assert (init["threshold_mode"], init["threshold"]) == ("absolute", 0.1)
        assert "46.64" in path.read_text() and "main_oss.py" in path.read_text()


def test_no_overlay_names_its_run():
    overlays = [*CONFIGS.glob("ablations/*/*.yaml"), CONFIGS / "diffews_incontext.yaml",
                CONFIGS / "diffews_released.yaml", CONFIGS / "diffseg_coco.yaml"]  # fmt: skip
    assert len(overlays) == 58
    for path in overlays:
        assert "logger" not in path.read_text(), path


def test_no_config_restates_max_steps_as_the_schedule_length():
    for path in sorted(CONFIGS.rglob("*.yaml")):
        sched_args = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {}
        given = ((sched_args.get("scheduler") or {}).get("init_args")) or {}
        assert not {"total_iters", "T_max", "total_steps"} & set(given), path


def test_schedule_length_follows_max_steps_and_a_different_one_is_refused(capsys):
    from fsseg.cli.trainer import RunRefused

    base = ["fit", "--config", str(CONFIGS / "diffews.yaml")]
    assert (
        parse_command([*base, "--trainer.max_steps", "700"]).model.init_args.scheduler.init_args.total_iters
        == 700
    )
    assert "LinearLR total_iters = trainer.max_steps (700)" in capsys.readouterr().out
    key = "--model.init_args.scheduler.init_args.total_iters"
    same = parse_command([*base, "--trainer.max_steps", "700", key, "700"])  # the same value given: accepted
    assert same.model.init_args.scheduler.init_args.total_iters == 700
    with pytest.raises(RunRefused, match=r"total_iters 900 differs from trainer.max_steps 700"):
        parse_command([*base, "--trainer.max_steps", "700", key, "900"])
    with pytest.raises(RunRefused, match=r"derived from trainer.max_steps, which is not set"):
        parse_command([*base, "--trainer.max_steps", "-1"])
    # a scheduler that requires its length (jsonargparse refuses it without): given, and checked
    cosine = [
        "--model.init_args.scheduler",
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "--trainer.max_steps",
        "40",
    ]
    assert parse_command([*base, *cosine, "--model.init_args.scheduler.init_args.T_max", "40"])
    with pytest.raises(RunRefused, match=r"T_max 50 differs from trainer.max_steps 40"):
        parse_command([*base, *cosine, "--model.init_args.scheduler.init_args.T_max", "50"])
    epochs = parse_command(
        [*base, "--model.init_args.scheduler_interval", "epoch", "--trainer.max_steps", "-1"]
    )
    assert epochs.model.init_args.scheduler.init_args.total_iters == 5  # an epoch-wise schedule is as given
