"""Every DiffSeg config (PASCAL, COCO, each ablation row of Tables 3-6, the demo) parses through the fsseg CLI classes,
instantiates on the tiny Kandinsky-shaped components and runs one CPU training step plus one prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _steps import assert_one_step_then_predict
from lightning.pytorch.cli import LightningCLI
from safetensors.torch import save_file

from fsseg.data.datamodule import FewShotDataModule
from fsseg.episode import fake_batch
from fsseg.models.base import FewShotModule
from fsseg.models.diffseg import DiffSegModule
from fsseg.models.diffseg.hed import HED
from fsseg.models.diffseg.tiny import save_tiny_components

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((ROOT / "configs/ablations/diffseg").glob("*.yaml"))
CONFIGS = [
    [ROOT / "configs/diffseg.yaml"],
    [ROOT / "configs/diffseg.yaml", ROOT / "configs/diffseg_coco.yaml"],
] + [[ROOT / "configs/diffseg.yaml", p] for p in ABLATIONS]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = save_tiny_components(tmp_path_factory.mktemp("diffseg_variants"), seed=0)
    torch.manual_seed(0)
    save_file(HED().state_dict(), str(d / "hed.safetensors"))  # random weights in the converted layout
    return d


def build(configs: list[Path], tiny: Path, edge_source: str | None = None) -> LightningCLI:
    args = [a for c in configs for a in ("--config", str(c))]
    args += [
        "--model.init_args.decoder",
        str(tiny / "decoder"),
        "--model.init_args.prior",
        str(tiny / "prior"),
        "--model.init_args.hed_weights",
        str(tiny / "hed.safetensors"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.logger",
        "false",
    ]
    if edge_source:
        args += ["--model.init_args.edge_source", edge_source]
    return LightningCLI(FewShotModule, FewShotDataModule, subclass_mode_model=True, args=args, run=False)


def test_every_ablation_row_has_a_config():
    names = {p.stem for p in ABLATIONS}
    assert {"full", "modules_no_unet_scm", "modules_no_scm", "modules_no_pam"} <= names  # Table 3
    assert {
        "knowledge_self_only",
        "knowledge_cross_only",
        "knowledge_frb",
        "knowledge_fst",
    } <= names  # Table 4
    pam = {
        "none_none_none",
        "none_attn_attn",
        "attn_none_attn",
        "attn_attn_none",
        "conv_conv_conv",
        "conv_attn_attn",
        "attn_conv_attn",
        "attn_attn_conv",
    }
    assert {f"pam_{r}" for r in pam} <= names  # Table 5
    assert {"scm_without_8", "scm_without_16", "scm_without_32", "scm_per_level"} <= names  # Table 6


@pytest.mark.parametrize("configs", CONFIGS, ids=lambda cs: cs[-1].stem)
def test_config_instantiates_and_trains_one_step(configs, tiny_dir):
    ablation = len(configs) > 1
    cli = build(configs, tiny_dir, edge_source="sobel" if ablation else None)  # the main configs use HED
    model, dm = cli.model, cli.datamodule
    assert isinstance(model, DiffSegModule)
    hp = model.hparams
    assert hp.decoder == str(tiny_dir / "decoder")
    row = (yaml.safe_load(configs[-1].read_text()).get("model") or {}).get("init_args", {})
    for key, value in row.items():  # the row's own settings arrived
        if key not in ("optimizer", "scheduler", "decoder", "prior", "hed_weights", "edge_source"):
            assert list(hp[key]) == value if isinstance(value, list) else hp[key] == value, key
    opt = model.configure_optimizers()
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.01
    assert isinstance(sched["scheduler"], torch.optim.lr_scheduler.StepLR) and sched["interval"] == "epoch"
    assert cli.trainer.max_epochs == 200
    batch = fake_batch(2, dm.hparams.shot, seed=1)
    assert_one_step_then_predict(model, optimizer, batch, (24, 24))


def test_demo_config_runs_on_the_shipped_tiny_assets():
    assets = ROOT / "fsseg/assets/tiny-diffseg"
    cfg = yaml.safe_load((ROOT / "configs/demo_diffseg.yaml").read_text())
    assert (
        cfg["model"]["init_args"]["decoder"] == "fsseg/assets/tiny-diffseg/decoder"
    )  # relative to the repo root
    assert cfg["data"]["benchmark"] == "embedded" and cfg["trainer"]["accelerator"] == "cpu"
    args = [
        "--config",
        str(ROOT / "configs/demo_diffseg.yaml"),
        "--model.init_args.decoder",
        str(assets / "decoder"),
        "--model.init_args.prior",
        str(assets / "prior"),
        "--trainer.logger",
        "false",
    ]
    cli = LightningCLI(FewShotModule, FewShotDataModule, subclass_mode_model=True, args=args, run=False)
    model = cli.model
    assert isinstance(model, DiffSegModule) and model.hparams.edge_source == "sobel"
    optimizer = model.configure_optimizers()
    batch = fake_batch(2, 1, size=cli.datamodule.hparams.img_size, seed=1)
    model.train()
    loss = model.training_loss(batch)["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
