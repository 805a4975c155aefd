"""Data that would silently give wrong numbers is refused by name: listed masks that do not show their class or hold
values outside the benchmark's labels (``data.bad_masks``), a ``data.root`` that holds no embedded benchmark, input
sizes a model cannot take; and the released DiffewS input resize (``data.image_resize: pil``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_cli import write_config
from test_data import make_dm

from fsseg.cli.trainer import run_cli
from fsseg.data import FewShotDataModule, PascalFewShot
from fsseg.data.base import BadMaskError, image_to_tensor, load_rgb
from fsseg.data.embedded import MARKER_NAME, default_embedded_root
from fsseg.data.tools import main as data_main

REPO = Path(__file__).resolve().parents[1]


# ---- listed masks that do not show what the lists say ------------------------------------------------------------
@pytest.fixture
def bad_root(small_embedded, tmp_path) -> tuple[Path, str, Path]:
    """A copy of the small benchmark whose first fold-0 test query mask lost its listed class and gained a 37."""
    root = tmp_path / "bad"
    shutil.copytree(small_embedded, root)
    ep = PascalFewShot(root, "test", fold=0, n_episodes=1, splits_dir=root / "splits").episodes[0]
    path = root / "VOC2012" / "SegmentationClassAug" / f"{ep.query}.png"
    label = np.array(Image.open(path))
    assert (label == ep.class_id + 1).any()
    label[label == ep.class_id + 1] = 0
    label[:2, :2] = 37
    Image.fromarray(label, "L").save(path)
    return root, ep.query, path


def test_a_listed_mask_without_its_class_stops_the_episode_naming_file_class_and_values(bad_root):
    root, query, path = bad_root
    dm = make_dm(root, shot=1)
    dm.setup("test")
    ds = dm.datasets["test"]
    (i, ep), *_ = [(i, ep) for i, ep in enumerate(ds.episodes) if query in (ep.query, *ep.supports)]
    with pytest.raises(BadMaskError) as err:
        ds[i]
    msg = str(err.value)
    assert (
        f"mask file {path} does not show its listed class {ep.class_id} (mask value {ep.class_id + 1})" in msg
    )
    assert (
        f"mask file {path} holds values [37] outside embedded's labels (0 background, 1..20 classes, 255"
        in msg
    )
    assert "values found: [0, " in msg and "37" in msg and "data.bad_masks: warn" in msg
    assert "fsseg data check" in msg


def test_warn_scores_the_episodes_counts_them_and_records_them_in_metrics(bad_root, tmp_path):
    root, query, path = bad_root
    cfg = write_config(tmp_path, root)
    with pytest.raises(BadMaskError, match=str(path)):  # the default refuses
        run_cli(["test", "--config", str(cfg), "--no_ckpt"])
    with pytest.warns(UserWarning, match=r"data.bad_masks: warn: \d+ of 24 test episodes read a bad mask"):
        test = run_cli(["test", "--config", str(cfg), "--no_ckpt", "--data.bad_masks", "warn", "--overwrite"])
    metrics = json.loads((Path(test.trainer.log_dir) / "metrics.json").read_text())
    record = metrics["bad_masks"]
    expected = sum(query in (ep.query, *ep.supports) for ep in test.datamodule.datasets["test"].episodes)
    assert record["setting"] == "warn" and record["episodes"] == expected > 0
    assert record["problems_total"] == 2 and all(str(path) in p for p in record["problems"])
    assert (
        metrics["episodes"] == 24
    )  # every protocol episode scored, the bad ones against what their mask shows


def test_data_check_verify_lists_bad_masks(bad_root, capsys):
    root, query, path = bad_root
    args = ["check", "--root", str(root), "--benchmark", "embedded", "--splits-dir", str(root / "splits")]
    assert data_main(args) == 0  # without --verify no mask is opened
    capsys.readouterr()
    assert data_main([*args, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "embedded: BAD MASKS (2)" in out
    assert f"bad mask: mask file {path} does not show its listed class" in out
    assert f"bad mask: mask file {path} holds values [37] outside" in out and "values found: [0," in out


def test_the_embedded_benchmark_and_its_training_lists_pass(small_embedded):
    """Every (image, class) of every fold's training and test lists shows its class with the benchmark's values."""
    for fold in range(4):
        for split in ("trn", "test"):
            ds = PascalFewShot(small_embedded, split, fold=fold, splits_dir=small_embedded / "splits")
            assert [p for k in ds.keys() for p in ds.mask_problems(k)] == []
        dm = make_dm(small_embedded, fold=fold, bad_masks="warn", test_episodes=None)
        dm.setup("test")  # warn: every test episode's masks checked at setup
        assert dm.bad_mask_scan["test"] == (0, []) and dm.describe()["bad_masks"]["episodes"] == 0


def test_bad_masks_setting_is_checked():
    with pytest.raises(
        ValueError, match=r"data.bad_masks: expected one of \('error', 'warn'\), got 'ignore'"
    ):
        FewShotDataModule(bad_masks="ignore")


# ---- the embedded benchmark is generated only where asked ----------------------------------------------------------
def test_a_mistyped_embedded_root_is_a_missing_data_error(small_embedded, tmp_path, monkeypatch):
    monkeypatch.setenv("FSSEG_CACHE", str(tmp_path / "cache"))
    typo = tmp_path / "typo"
    dm = FewShotDataModule(root=str(typo), benchmark="embedded")
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert f"data.root {typo} holds no embedded benchmark" in msg
    assert str(default_embedded_root(seed=0)) in msg and f"fsseg data build-embedded --root {typo}" in msg
    assert not typo.exists()  # nothing generated there
    with pytest.raises(FileNotFoundError, match="fsseg data build-embedded"):
        dm.setup("test")  # a rank that only reads says the same
    FewShotDataModule(root=str(small_embedded), benchmark="embedded").prepare_data()  # a generated one: used


def test_build_embedded_generates_where_asked(tmp_path, capsys):
    root = tmp_path / "mine"
    args = ["build-embedded", "--root", str(root), "--image-size", "32", "--n-train", "40", "--n-val", "40"]
    assert data_main(args) == 0
    assert (root / MARKER_NAME).is_file() and str(root) in capsys.readouterr().out
    dm = make_dm(root, shot=1, img_size=32)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.datasets["test"]) == 12
    assert data_main(args) == 2 and "already exists" in capsys.readouterr().err  # never over an existing one


@pytest.mark.slow
def test_the_default_root_is_still_generated_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("FSSEG_CACHE", str(tmp_path / "cache"))
    FewShotDataModule(benchmark="embedded").prepare_data()
    assert (default_embedded_root(seed=0) / MARKER_NAME).is_file()


# ---- input sizes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, -8, True])
def test_non_positive_img_size_refused_at_construction(size):
    with pytest.raises(ValueError, match=rf"data.img_size must be a positive integer, got {size!r}"):
        FewShotDataModule(img_size=size)
    with pytest.raises(ValueError, match="data.eval_size must be a positive integer"):
        FewShotDataModule(eval_size=0)


def test_a_size_the_model_cannot_take_is_refused_where_model_and_data_meet(small_embedded, tmp_path):
    cfg = write_config(tmp_path, small_embedded)
    args = ["test", "--config", str(cfg), "--no_ckpt", "--model.init_args.out_indices", "[1, 2]"]
    with pytest.raises(ValueError) as err:
        run_cli([*args, "--data.img_size", "7"])
    assert str(err.value) == (
        "data.img_size 7: PrototypeModule needs at least 8: its resnet18 stage(s) [1, 2] have strides [4, 8]"
    )
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))
    run_cli([*args, "--data.img_size", "8"])


def test_each_model_names_its_smallest_input():
    from fsseg.models.baseline import PrototypeModule
    from fsseg.models.diffews import DiffewsModule
    from fsseg.models.diffseg import DiffSegModule

    assert PrototypeModule(out_indices=(1,)).input_size_error(4) is None
    diffews = DiffewsModule(pretrained=str(REPO / "fsseg/assets/tiny-diffews"))
    # tiny VAE 4 x UNet 2; its first UNet block has one channel per GroupNorm group: at least a 2x2 coarsest grid
    assert "needs a multiple of 8, at least 16" in diffews.input_size_error(8)
    assert "needs a multiple of 8" in diffews.input_size_error(20)
    assert diffews.input_size_error(16) is None and diffews.input_size_error(128) is None
    diffseg = DiffSegModule(decoder=str(REPO / "fsseg/assets/tiny-diffseg/decoder"),
                            prior=str(REPO / "fsseg/assets/tiny-diffseg/prior"), edge_source="sobel")  # fmt: skip
    assert (
        "needs a multiple of 32, at least 32: its MoVQ downsamples by 4 and its UNet"
        in diffseg.input_size_error(48)
    )
    assert diffseg.input_size_error(32) is None and diffseg.input_size_error(64) is None
    # what is accepted runs, what is refused does not: DiffSeg's SCM finds no grid of its size; the tiny DiffewS's
    # one-channel groups normalise a 1x1 grid to nothing (an error for one image, predict-images' support pass)
    for model, ok, refused in ((diffews, 16, 8), (diffseg, 32, 48)):
        model.eval()
        for size in (ok, refused):
            imgs, masks = torch.rand(1, 3, size, size), torch.ones(1, size, size, dtype=torch.long)
            with torch.no_grad():
                if size == ok:
                    state = model.encode_support(imgs, masks)
                    assert model.predict_with_support(state, imgs, (size, size)).shape == (1, size, size)
                else:
                    with pytest.raises((RuntimeError, ValueError)):
                        model.predict_with_support(model.encode_support(imgs, masks), imgs, (size, size))


# ---- image resize --------------------------------------------------------------------------------------------------
def test_pil_resize_equals_a_direct_pil_resize_of_the_uint8_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8))
    for size in (32, 64, 128):
        direct = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))  # [S, S, 3] uint8
        ours = image_to_tensor(img, size, "pil")  # [3, S, S]
        assert torch.equal(ours, torch.from_numpy(direct.copy()).permute(2, 0, 1).float() / 255)
        levels = (ours - image_to_tensor(img, size, "torch")).abs() * 255
        assert levels.max() <= 1.01 and levels.max() > 0.1  # the torch form differs, by up to about one level
    with pytest.raises(ValueError, match="image resize must be one of"):
        image_to_tensor(img, 8, "nearest")


def test_image_resize_applies_to_query_and_supports_in_training_and_evaluation(small_embedded):
    with pytest.raises(ValueError, match=r"data.image_resize: expected one of \('torch', 'pil'\)"):
        FewShotDataModule(image_resize="PIL")
    dm = make_dm(small_embedded, image_resize="pil")
    dm.setup("fit")
    dm.setup("test")
    for split in ("trn", "test"):
        ds = dm.datasets[split]
        item = ds[1]
        assert torch.equal(
            item["query_img"], image_to_tensor(load_rgb(ds.image_path(item["query_name"])), 48, "pil")
        )
        for k, name in enumerate(item["support_names"]):
            assert torch.equal(
                item["support_imgs"][k], image_to_tensor(load_rgb(ds.image_path(name)), 48, "pil")
            )
    assert dm.describe()["image_resize"] == "pil"
    assert make_dm(small_embedded).describe()["image_resize"] == "torch"  # the default elsewhere


def test_diffews_paper_configs_use_the_pil_resize_and_the_demos_keep_torch():
    def data(*names):
        out = {}
        for name in names:
            out.update(yaml.safe_load((REPO / "configs" / name).read_text()).get("data") or {})
        return out

    for overlay in ("diffews_released.yaml", "diffews_incontext.yaml", "ablations/diffews/fsa_add.yaml"):
        assert data("diffews.yaml", overlay)["image_resize"] == "pil"
    for demo in ("demo_baseline.yaml", "demo_diffews.yaml", "demo_diffseg.yaml"):
        assert data(demo)["image_resize"] == "torch"
        assert "image_resize: torch" in (REPO / "configs" / demo).read_text().split("seed_everything")[0]
    for table in ("table1.yaml", "table2.yaml"):
        rows = yaml.safe_load((REPO / "configs" / "reproduce" / table).read_text())["rows"]
        diffews = [r for r in rows if "DiffewS" in r["name"]]
        assert diffews and all(r["args"]["data.image_resize"] == "pil" for r in diffews)
