"""The fast path agrees with the fp32 path on the shipped tiny models and the demo's test episodes (embedded
benchmark, fold 0): bf16 autocast (``--trainer.precision bf16-mixed``), channels-last weights, batched episodes and
one VAE call per batch against fp32 at batch 1. At most 1% of the pixels differ and mIoU moves by at most 0.5; the
decoded predictions before thresholding differ by little on average (this also covers a model whose untrained
parts predict one class everywhere: DiffSeg's PAM/SCM are trained by the demo run, not shipped)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fsseg.data.datamodule import FewShotDataModule
from fsseg.data.embedded import generate_embedded_benchmark
from fsseg.metrics import FewShotIoU
from fsseg.runs import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """The demo's embedded benchmark (default generator parameters, as `make demo` uses)."""
    return generate_embedded_benchmark(tmp_path_factory.mktemp("demo") / "embedded", seed=0)


def run(config: str, root: Path, episodes: int, precision: str, batch_size: int):
    """The config's model on its test episodes: (masks [N, h, w], decoded images [N, 3, S, S] before
    thresholding, targets, class ids, the UNet's output dtypes, the fold's classes)."""
    L.seed_everything(0)  # as the config's seed_everything: untrained parts (DiffSeg's heads) start the same
    model, data = build_model(config=CONFIGS / config)
    data = {**data, "root": str(root), "test_episodes": episodes, "eval_batch_size": batch_size}
    dm = FewShotDataModule(**data)
    dtypes, decoded = set(), []
    hooks = [
        model.pipeline.unet.register_forward_hook(
            lambda m, a, out: dtypes.add(getattr(out, "sample", out).dtype)
        ),
        (
            model.pipeline.vae if hasattr(model.pipeline, "vae") else model.pipeline.movq
        ).decoder.register_forward_hook(lambda m, a, out: decoded.append(out.float())),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    try:
        out = trainer.predict(model, datamodule=dm)
    finally:
        for hook in hooks:
            hook.remove()
    ds = dm.datasets["test"]
    targets = torch.stack([ds[i]["query_mask_eval"] for i in range(len(ds))])
    classes = torch.tensor([ds.episodes[i].class_id for i in range(len(ds))])
    masks = torch.cat([o["pred"] for o in out])
    return masks, torch.cat(decoded), targets, classes, dtypes, dm.eval_class_ids("test")


def miou(pred, target, classes, class_ids) -> float:
    metric = FewShotIoU(class_ids)
    metric.update(pred, target, classes)
    return float(metric.compute()["miou"])


def check_agreement(config: str, root: Path, episodes: int, batch_size: int = 16) -> None:
    ref, ref_img, target, classes, ref_dtypes, class_ids = run(config, root, episodes, "32-true", 1)
    fast, fast_img, _, _, fast_dtypes, _ = run(config, root, episodes, "bf16-mixed", batch_size)
    assert ref_dtypes == {torch.float32} and fast_dtypes == {
        torch.bfloat16
    }  # the fast path really ran in bf16
    assert ref.shape == fast.shape == target.shape and ref.shape[0] == episodes
    assert ref_img.shape == fast_img.shape and ref_img.shape[0] == episodes
    differ = (ref != fast).float().mean().item()
    m_ref, m_fast = miou(ref, target, classes, class_ids), miou(fast, target, classes, class_ids)
    image_diff = (ref_img - fast_img).abs().mean().item()  # decoder output, in [-1, 1]
    print(
        f"{config}: {episodes} episodes, {100 * differ:.3f}% pixels differ, mIoU {m_ref:.2f} -> {m_fast:.2f}, "
        f"mean |decoded difference| {image_diff:.4f}"
    )
    assert differ <= 0.01, f"{100 * differ:.2f}% of the pixels differ"
    assert abs(m_fast - m_ref) <= 0.5, (m_ref, m_fast)
    assert 0 < image_diff <= 0.01, image_diff  # bf16 changes the numbers a little, not the predictions


@pytest.mark.parametrize("config", ["demo_diffews.yaml", "demo_diffseg.yaml"])
def test_bf16_batched_agrees_with_fp32(demo_root, config):
    check_agreement(config, demo_root, episodes=48)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["demo_diffews.yaml", "demo_diffseg.yaml"])
def test_bf16_batched_agrees_with_fp32_full_test_set(demo_root, config):
    check_agreement(config, demo_root, episodes=500)
