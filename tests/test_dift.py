"""The training-free DIFT-style method (`fsseg.models.dift`): the pipeline's math on tiny in-process components, that
the frozen shipped tiny SD stand-in segments what its support shows (and not another class's), and the module through
`fsseg test`, `fsseg fit` (refused), `fsseg demo` and the reproduction spec.

The two-disc task is tests/test_support_mechanism.py's, at 64 px (two discs of two colours per query; the support's
mask marks which colour is foreground).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDIMScheduler

from fsseg.cli import run
from fsseg.episode import fake_batch
from fsseg.metrics import FewShotIoU
from fsseg.models.diffews.tiny import SD21_SCHEDULER, tiny_unet, tiny_vae
from fsseg.models.dift import DiftModule, DiftPipeline
from fsseg.models.dift.pipeline import unet_blocks, unet_layer_features
from tests.test_support_mechanism import PALETTE

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "fsseg" / "assets" / "tiny-diffews"
SIZE = 64


def _scene(classes: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A grey-noise image [3, S, S] with one disc (radius 8-12 px) per class (colour), and its label map."""
    img = 0.35 + 0.1 * torch.rand(3, SIZE, SIZE, generator=gen)
    label = torch.zeros(SIZE, SIZE, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for c in classes:
        r = int(torch.randint(SIZE // 8, SIZE // 5, (1,), generator=gen))
        cy, cx = torch.randint(r, SIZE - r, (2,), generator=gen).tolist()
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[:, disc] = PALETTE[c - 1][:, None]
        label[disc] = c
    return img, label


def two_disc_episodes(n: int, seed: int, control: str = "none") -> dict[str, torch.Tensor]:
    """``n`` 1-shot episodes; ``control='other_class'`` shows each query's distractor colour in the support."""
    gen = torch.Generator().manual_seed(seed)
    q, qm, s, sm, cls = [], [], [], [], []
    for _ in range(n):
        target, distractor = (torch.randperm(len(PALETTE), generator=gen)[:2] + 1).tolist()
        img, label = _scene([target, distractor], gen)
        shown = distractor if control == "other_class" else target
        s_img, s_label = _scene([shown], gen)
        q.append(img)
        qm.append((label == target).long())
        s.append(s_img[None])
        sm.append((s_label == shown).long()[None])
        cls.append(target)
    return {
        "query_img": torch.stack(q),  # [n, 3, S, S]
        "query_mask": torch.stack(qm),  # [n, S, S]
        "support_imgs": torch.stack(s),  # [n, 1, 3, S, S]
        "support_masks": torch.stack(sm),  # [n, 1, S, S]
        "class_id": torch.tensor(cls),
    }


@pytest.fixture(scope="module")
def tiny_parts():
    """Randomly initialised tiny SD components built in-process, and an empty-prompt stand-in [1, 77, 32]."""
    prompt = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    return tiny_vae(1).eval(), tiny_unet(0).eval(), DDIMScheduler(**SD21_SCHEDULER), prompt


def _pipe(parts, **kw) -> DiftPipeline:
    return DiftPipeline(*parts, **{"timestep": 50, "layer": "up1", **kw})


@pytest.mark.parametrize("similarity", ["prototype", "nearest"])
def test_scores_are_the_cosine_matching_of_the_method(tiny_parts, similarity):
    """Scores against a float64 reference: the query cells' cosine to the K-shot pooled foreground prototype, or to
    the nearest support foreground cell; resized, min-max normalised; masks are the scores above the threshold."""
    pipe, batch = (
        _pipe(tiny_parts, similarity=similarity, threshold=0.6),
        fake_batch(b=3, k=2, size=32, seed=1),
    )
    q_imgs, s_imgs, s_masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    support = pipe.encode_support(s_imgs, s_masks)
    scores = pipe.scores(support, q_imgs, (24, 24)).double()  # [3, 24, 24]
    q = F.normalize(pipe.features(q_imgs).double(), dim=1)  # [3, C, h, w]
    s = pipe.features(s_imgs.flatten(0, 1)).double().unflatten(0, (3, 2))  # [3, 2, C, h, w]
    w = F.adaptive_avg_pool2d((s_masks == 1).double().flatten(0, 1)[:, None], q.shape[-2:]).unflatten(
        0, (3, 2)
    )
    if similarity == "prototype":
        proto = F.normalize((s * w).sum((1, 3, 4)) / w.sum((1, 2, 3, 4))[:, None], dim=1)  # [3, C]
        sim = torch.einsum("bchw,bc->bhw", q, proto)
    else:
        cells = F.normalize(s, dim=2).permute(0, 1, 3, 4, 2).flatten(1, 3)  # [3, 2hw, C]
        share = w.flatten(1)
        on = (share > 0) & (share >= 0.5 * share.amax(1, keepdim=True))
        cos = torch.einsum("bcq,bsc->bqs", q.flatten(2), cells).masked_fill(~on[:, None], -2)
        sim = cos.amax(-1).unflatten(1, q.shape[-2:])
    sim = F.interpolate(sim[:, None], size=(24, 24), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = sim.flatten(1).amin(1)[:, None, None], sim.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(scores, (sim - lo) / (hi - lo), atol=1e-4, rtol=0)
    masks = pipe.segment_episodes(q_imgs, s_imgs, s_masks, (24, 24))
    assert masks.dtype == torch.long and masks.shape == (3, 24, 24)
    sure = (scores - 0.6).abs() > 1e-3  # away from the threshold
    assert torch.equal(masks[sure], (scores[sure] > 0.6).long())


def test_one_support_serves_many_queries_and_a_mask_does_not_depend_on_its_batch(tiny_parts):
    pipe, batch = _pipe(tiny_parts, feature_cache_mb=0), fake_batch(b=4, k=1, size=32, seed=2)
    one = pipe.encode_support(batch["support_imgs"][:1], batch["support_masks"][:1])  # B_s = 1
    together = pipe.scores(one, batch["query_img"], (32, 32))
    alone = torch.cat([pipe.scores(one, batch["query_img"][i : i + 1], (32, 32)) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    episodes = pipe.segment_episodes(
        batch["query_img"][:1], batch["support_imgs"][:1], batch["support_masks"][:1], (32, 32)
    )
    assert torch.equal(episodes[0], pipe.segment(one, batch["query_img"][:1], (32, 32))[0])
    again = _pipe(tiny_parts).segment(
        one, batch["query_img"], (32, 32)
    )  # deterministic: one seeded noise map
    assert torch.equal(again, pipe.segment(one, batch["query_img"], (32, 32)))
    other_noise = _pipe(tiny_parts, noise_seed=1).scores(one, batch["query_img"], (32, 32))
    assert not torch.allclose(other_noise, together)  # the seed is used


def test_features_of_seen_images_come_from_a_bounded_cache(tiny_parts):
    """Reused images (supports across episodes) are not recomputed; the cache gives what computing gives and keeps
    at most ``feature_cache_mb`` (least recently used dropped)."""
    images = fake_batch(b=5, k=1, size=32, seed=4)["query_img"]  # [5, 3, 32, 32]
    pipe, computed = _pipe(tiny_parts), _pipe(tiny_parts, feature_cache_mb=0)
    calls = []
    encode = pipe.encode_features
    pipe.encode_features = lambda x: calls.append(len(x)) or encode(x)
    first = pipe.features(images[[0, 1, 0, 2]])  # a repeated image is computed once
    again = pipe.features(images[[2, 1, 3]])  # only the new one is computed
    assert calls == [3, 1] and len(pipe.cache) == 4 and len(computed.cache) == 0
    # what computing the same batches gives, bit for bit (the same batches run the same kernels on any CPU)
    with torch.no_grad():
        batch1, batch2 = computed.encode_features(images[[0, 1, 2]]), computed.encode_features(images[[3]])
    assert torch.equal(first, batch1[[0, 1, 0, 2]])
    assert torch.equal(again, torch.cat([batch1[[2, 1]], batch2]))
    one = first[0].nelement() * first[0].element_size()
    pipe.cache.max_bytes = 2 * one  # room for two images' features
    pipe.features(images[[4]])
    assert len(pipe.cache) == 2 and calls == [3, 1, 1]
    pipe.features(images[[3, 4]])  # the two most recent are kept
    assert calls == [3, 1, 1]
    with pytest.raises(ValueError, match="feature_cache_mb"):
        _pipe(tiny_parts, feature_cache_mb=-1)


@pytest.mark.parametrize("similarity", ["prototype", "nearest"])
def test_a_support_without_foreground_gives_background(tiny_parts, similarity):
    pipe, batch = _pipe(tiny_parts, similarity=similarity), fake_batch(b=2, k=2, size=32, seed=3)
    masks = batch["support_masks"].clone()
    masks[1] = torch.where(masks[1] == 1, 255, masks[1])  # episode 1: only background and ignored pixels
    out = pipe.segment_episodes(batch["query_img"], batch["support_imgs"], masks, (32, 32))
    assert not out[1].any() and out[0].any()


def test_settings_are_checked_by_name(tiny_parts):
    for kw, match in ((dict(similarity="knn"), "similarity must be one of"),
                      (dict(timestep=1000), r"timestep.*\[0, 999\]"),
                      (dict(layer="up7"), "layer 'up7' is not a block")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            _pipe(tiny_parts, **kw)
    z = torch.randn(2, 4, 8, 8)  # [B, 4, h, w]
    feats = unet_layer_features(
        tiny_parts[1], tiny_parts[2], z, tiny_parts[3], 50, list(unet_blocks(tiny_parts[1]))
    )
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "down0": (2, 32, 4, 4), "down1": (2, 64, 4, 4), "mid": (2, 64, 4, 4), "up0": (2, 64, 8, 8),
        "up1": (2, 32, 8, 8),
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown UNet layer.*up7"):
        unet_layer_features(tiny_parts[1], tiny_parts[2], z, tiny_parts[3], 50, ["up7"])


# ---- the shipped stand-in, frozen: it follows the support -------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return DiftModule(str(ASSET), timestep=50, layer="mid", threshold=0.8).pipeline


@torch.no_grad()
def _miou(pipe: DiftPipeline, control: str) -> float:
    ep = two_disc_episodes(24, seed=7, control=control)
    pred = pipe.segment_episodes(ep["query_img"], ep["support_imgs"], ep["support_masks"], (SIZE, SIZE))
    metric = FewShotIoU(list(range(1, len(PALETTE) + 1)))
    metric.update(pred, ep["query_mask"], ep["class_id"])
    return float(metric.compute()["miou"])


def test_frozen_features_follow_the_support(shipped):
    own, other = _miou(shipped, "none"), _miou(shipped, "other_class")
    assert own > 45.0, own
    assert own - other > 30.0, (own, other)


# ---- the module: fsseg test / fit / demo, the reproduction spec ---------------------------------------------------
def _config(tmp_path: Path, root: Path) -> Path:
    """configs/demo_dift.yaml on the tests' small 64 px embedded benchmark, fold 1, 6 test episodes."""
    cfg = yaml.safe_load((REPO / "configs/demo_dift.yaml").read_text())
    cfg["data"].update(root=str(root), img_size=64, fold=1, test_episodes=6, eval_batch_size=3)
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "dift_small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fsseg_test_without_a_checkpoint_and_with_the_support_control(tmp_path, small_embedded):
    cfg = _config(tmp_path, small_embedded)
    assert run(["test", "--config", str(cfg)]) == 2  # a checkpoint or --no_ckpt, as for every method
    results = {}
    for control in ("none", "other_class"):
        assert run(["test", "--config", str(cfg), "--no_ckpt", "--data.support_control", control]) == 0
        folder = (
            tmp_path
            / "runs/demo_dift"
            / ("test_embedded_fold1_1shot" + ("" if control == "none" else "_other_class"))
        )
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (
            metrics["model"] == "DiftModule" and metrics["support_control"] == control and metrics["no_ckpt"]
        )
        assert (
            metrics["model_settings"]["init_args"]["timestep"]
            == yaml.safe_load(cfg.read_text())["model"]["init_args"]["timestep"]
        )
        results[control] = [json.loads(line) for line in (folder / "episodes.jsonl").read_text().splitlines()]
    assert len(results["none"]) == len(results["other_class"]) == 6
    assert all(r["support_class"] != r["class_id"] for r in results["other_class"])


def test_fit_is_refused_by_name_and_leaves_nothing(tmp_path, small_embedded, capsys):
    cfg = _config(tmp_path, small_embedded)
    assert run(["fit", "--config", str(cfg)]) == 2
    assert "DiftModule is training-free: there is nothing to fit" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("**/*.ckpt")) and not list(
        (tmp_path / "runs").glob("**/config.yaml")
    )


def test_demo_tests_it_without_fitting(tmp_path, small_embedded, capsys):
    from fsseg.demo import training_free

    assert training_free(REPO / "configs/demo_dift.yaml") and not training_free(
        REPO / "configs/demo_baseline.yaml"
    )
    out = tmp_path / "demo"
    assert (
        run(["demo", str(_config(tmp_path, small_embedded)), "--out", str(out), "--test-episodes", "3"]) == 0
    )
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    assert (
        row["model"] == "DiftModule" and row["runs"]["fit"] is None and not (out / "dift_small/fit").exists()
    )
    other = json.loads((out / "dift_small/test_other_class/metrics.json").read_text())
    assert row["miou_other_class"] == other["miou"] and other["support_control"] == "other_class"


def test_reproduction_rows_test_it_as_built():
    from fsseg.reproduce.runner import test_argv
    from fsseg.reproduce.spec import build_cells, load_spec

    spec = load_spec(REPO / "configs/reproduce/table1.yaml")
    rows = ["DIFT matching", "DIFT matching (COCO-20i)"]
    for smoke in (True, False):
        cells = build_cells(spec, "/data", "/ckpts", smoke, rows)
        assert cells and all(not c.train and c.ckpt is None for c in cells)
        assert all("--no_ckpt" in test_argv(c, "/data") for c in cells)
    smoke_cells = build_cells(spec, None, None, True, rows)
    assert {Path(c.configs[0]).name for c in smoke_cells} == {"demo_dift.yaml"}
    assert {c.benchmark for c in build_cells(spec, "/data", "/ckpts", False, rows)} == {"pascal5i", "coco20i"}


def test_missing_weights_name_the_setting(tmp_path):
    from fsseg.models.loading import MissingWeightsError

    with pytest.raises(MissingWeightsError, match=r"model.init_args.pretrained = .*nowhere"):
        DiftModule(str(tmp_path / "nowhere"))
