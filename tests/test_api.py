"""The Python API (`fsseg.load` -> `Segmenter`): loading a run of a real `fsseg fit`, every input kind giving the
same masks at each query's size, a reusable encoded support, predict-images writing the API's masks, and the errors
named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_cli import write_config
from test_predict import noise_image, save_mask

import fsseg
from fsseg.api import Segmenter
from fsseg.cli import main as fsseg_main
from fsseg.cli.trainer import run_cli
from fsseg.data.base import image_to_tensor, load_rgb, resize_mask
from fsseg.models.baseline import PrototypeModule

SIZES = [(40, 30), (64, 64), (50, 70)]  # (w, h) of the queries


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_embedded) -> dict:
    """A 4-step baseline fit (48 px) and its files."""
    tmp = tmp_path_factory.mktemp("api_run")
    ckpt = Path(
        run_cli(
            ["fit", "--config", str(write_config(tmp, small_embedded))]
        ).trainer.checkpoint_callback.last_model_path
    )
    return {"ckpt": ckpt, "folder": ckpt.parent.parent, "config": ckpt.parent.parent / "config.yaml"}


@pytest.fixture(scope="module")
def seg(run) -> Segmenter:
    return fsseg.load(run["folder"])


@pytest.fixture
def files(tmp_path) -> dict:
    """Two supports (a red box on noise, its 0/255 mask) and three queries of different sizes, as files."""
    sup, masks = [], []
    for i, (w, h, box) in enumerate([(64, 48, (10, 8, 40, 30)), (56, 56, (20, 20, 50, 44))]):
        noise_image(w, h, i, box).save(tmp_path / f"s{i}.png")
        sup.append(tmp_path / f"s{i}.png")
        masks.append(save_mask(tmp_path / f"s{i}_mask.png", w, h, box))
    queries = []
    for j, (w, h) in enumerate(SIZES):
        noise_image(w, h, 10 + j, (w // 4, h // 4, w // 2, h // 2)).save(tmp_path / f"q{j}.png")
        queries.append(tmp_path / f"q{j}.png")
    return {"supports": sup, "masks": masks, "queries": queries}


def _np_mask(path: Path) -> np.ndarray:
    return np.array(Image.open(path))  # [H, W] in {0, 255}


def test_import_fsseg_stays_light():
    code = (
        "import sys, fsseg; assert 'torch' not in sys.modules; print('ok')"  # fsseg.load imports on first use
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


def test_run_folder_checkpoint_and_config_load_the_same_model(run, seg):
    trained = torch.load(run["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    for other in (seg, fsseg.load(run["ckpt"]), fsseg.load(ckpt=run["ckpt"], config=run["config"])):
        assert isinstance(other.model, PrototypeModule) and not other.model.training
        assert all(torch.equal(v, trained[k]) for k, v in other.model.state_dict().items())
        assert (other.img_size, other.image_resize, other.precision, str(other.device)) == (
            48,
            "torch",
            "fp32",
            "cpu",
        )
    assert fsseg.load(run["folder"], img_size=32, image_resize="pil").img_size == 32


def test_every_input_kind_gives_the_same_masks_at_each_querys_size(seg, files):
    s_path, m_path = files["supports"][0], files["masks"][0]
    pil = load_rgb(s_path)
    arr = np.asarray(pil)  # [H, W, 3] uint8
    ten = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255  # [3, H, W] in [0, 1]
    m255 = _np_mask(m_path)
    rgba = np.zeros(m255.shape + (4,), np.uint8)
    rgba[..., :3] = (
        255  # transparent white, the object opaque black: read from the alpha as predict-images does
    )
    rgba[m255 > 0] = (0, 0, 0, 255)
    supports = {"path": s_path, "str": str(s_path), "pil": pil, "numpy": arr, "tensor": ten}
    masks = {"path": m_path, "pil": Image.open(m_path), "0/255": m255, "0/1": (m255 > 0).astype(np.uint8),
             "bool": m255 > 0, "tensor": torch.from_numpy(m255 > 0), "rgba": Image.fromarray(rgba, "RGBA"),
             "rgba_array": rgba}  # fmt: skip
    q_pil = [load_rgb(q) for q in files["queries"]]
    queries = {"path": files["queries"], "pil": q_pil, "numpy": [np.asarray(q) for q in q_pil],
               "tensor": [torch.from_numpy(np.asarray(q).copy()).permute(2, 0, 1) / 255 for q in q_pil]}  # fmt: skip
    reference = seg.segment(files["queries"], s_path, m_path)
    assert [m.shape for m in reference] == [(h, w) for w, h in SIZES]
    assert all(m.dtype == bool for m in reference) and any(m.any() and not m.all() for m in reference)
    # what the method's own predict_masks gives on the episode built by hand
    model = seg.model
    s = image_to_tensor(pil, 48)[None, None]  # [1, 1, 3, 48, 48]
    sm = resize_mask((m255 > 0).astype(np.uint8), (48, 48))[None, None]  # [1, 1, 48, 48]
    for q, ref in zip(q_pil, reference):
        batch = {"query_img": image_to_tensor(q, 48)[None], "support_imgs": s, "support_masks": sm}
        with torch.no_grad():
            np.testing.assert_array_equal(
                model.predict_masks(batch, (q.height, q.width))[0].numpy() == 1, ref
            )
    for sk, sv in supports.items():
        for mk, mv in masks.items():
            got = seg.segment(files["queries"], sv, mv)
            assert all(np.array_equal(a, b) for a, b in zip(got, reference)), (sk, mk)
    for qk, qv in queries.items():
        got = seg.segment(qv, [s_path], [m_path])
        assert isinstance(got, list) and all(np.array_equal(a, b) for a, b in zip(got, reference)), qk
        single = seg.segment(qv[1], s_path, m_path)  # one query in, one mask out
        assert isinstance(single, np.ndarray) and np.array_equal(single, reference[1]), qk


def test_an_encoded_support_is_reused_and_equals_a_one_shot_call(seg, files, monkeypatch):
    calls = []
    encode = seg.model.encode_support
    monkeypatch.setattr(seg.model, "encode_support", lambda *a: calls.append(a[0].shape) or encode(*a))
    once = seg.segment(files["queries"], files["supports"], files["masks"])
    assert calls == [torch.Size([2, 3, 48, 48])]  # two shots, encoded once for the three queries
    support = seg.encode_support(files["supports"], files["masks"])
    assert support.shots == 2 and len(calls) == 2
    for _ in range(2):
        again = seg.segment(files["queries"], support=support)
        assert all(np.array_equal(a, b) for a, b in zip(again, once))
    assert len(calls) == 2  # not encoded again
    one_shot = seg.segment(files["queries"], files["supports"][:1], files["masks"][:1])
    assert any(not np.array_equal(a, b) for a, b in zip(one_shot, once))  # the second shot is used


def test_predict_images_writes_the_apis_masks(run, seg, files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict-images", "--ckpt", str(run["ckpt"]), "--out", str(out)]
    for s, m in zip(files["supports"], files["masks"]):
        args += ["--support", str(s), "--support-mask", str(m)]
    for q in files["queries"]:
        args += ["--query", str(q)]
    with pytest.raises(SystemExit) as done:
        fsseg_main(args)
    assert done.value.code == 0 and "input 48 px (torch resize), precision fp32" in capsys.readouterr().out
    expected = seg.segment(files["queries"], files["supports"], files["masks"])
    for q, mask in zip(files["queries"], expected):
        np.testing.assert_array_equal(_np_mask(out / f"{q.stem}_mask.png"), mask.astype(np.uint8) * 255)


def test_input_errors_are_named(seg, files):
    s, m = files["supports"][0], files["masks"][0]
    q = files["queries"]
    m255 = _np_mask(m)
    cases = [
        (lambda: seg.segment(q, [s, s], [m]), ValueError, "2 support images but 1 support masks"),
        (lambda: seg.segment(q, [], []), ValueError, "give at least one support image"),
        (lambda: seg.segment([], s, m), ValueError, "give at least one query image"),
        (lambda: seg.segment(q, s, np.zeros_like(m255)), ValueError,
         r"support_masks\[0\] \(a NumPy array\) is empty: it has no foreground pixel"),
        (lambda: seg.segment(q, s, m255[:32, :32]), ValueError,
         r"support_masks\[0\] \(a NumPy array\) is 32x32 \(WxH\) but its image .*s0\.png is 64x48"),
        (lambda: seg.segment(q, np.asarray(load_rgb(s)), m255[:32, :32]), ValueError,
         r"is 32x32 \(WxH\) but its image supports\[0\] is 64x48"),
        (lambda: seg.segment(q, s, np.where(m255 > 0, 3, 0) + np.eye(48, 64, dtype=int) * 5), ValueError,
         r"support_masks\[0\] \(a NumPy array\) is not binary: .*pick one with mask_value"),
        (lambda: seg.segment(q, s, m255, mask_value=7), ValueError, r"mask_value 7 does not occur"),
        (lambda: seg.segment(q, s, m255.astype(np.float32) / 2), ValueError, "expected whole values in 0..255"),
        (lambda: seg.segment(q, s, m255[None]), ValueError, r"a mask array must be H x W .*got shape \(1, 48, 64\)"),
        (lambda: seg.segment(q, s, files["queries"][0].parent / "nope.png"), FileNotFoundError, "nope.png is missing"),
        (lambda: seg.segment(np.zeros((8, 8, 3), np.float32), s, m), ValueError,
         r"queries\[0\]: a NumPy image must be H x W x 3 uint8"),
        (lambda: seg.segment(torch.rand(8, 8, 3), s, m), ValueError, r"queries\[0\]: a tensor image must be \[3, H, W\]"),
        (lambda: seg.segment(torch.rand(3, 8, 8) * 255, s, m), ValueError, r"must hold values in \[0, 1\]"),
        (lambda: seg.segment(42, s, m), TypeError, r"queries\[0\]: expected a path, a PIL image"),
        (lambda: seg.segment(q, s, m, support=seg.encode_support(s, m)), ValueError, "not both"),
        (lambda: seg.segment(q), ValueError, "give supports and support_masks"),
        (lambda: seg.segment(q, s, m255 > 0), None, None),  # the same masks, bool: accepted
    ]  # fmt: skip
    for call, error, message in cases:
        if error is None:
            call()
            continue
        with pytest.raises(error, match=message):
            call()
    dot = np.zeros_like(m255)
    dot[31, 41] = 1  # between the pixels that nearest resizing to 8 x 8 keeps
    with pytest.raises(ValueError, match=r"the object vanishes at img_size 8"):
        Segmenter(seg.model, 8).segment(q, s, dot)
    other = Segmenter(seg.model, 32)
    with pytest.raises(ValueError, match="encoded by another Segmenter"):
        other.segment(q, support=seg.encode_support(s, m))


def test_load_errors_are_named(run, tmp_path):
    with pytest.raises(
        ValueError, match=r"builds PrototypeModule, which has [\d,]+ trainable weights.*no_ckpt=True"
    ):
        fsseg.load(run["config"])
    assert fsseg.load(config=run["config"], no_ckpt=True).img_size == 48  # asked for: as the config builds it
    with pytest.raises(ValueError, match="no_ckpt=True contradicts the checkpoint"):
        fsseg.load(run["ckpt"], no_ckpt=True)
    with pytest.raises(ValueError, match="or config= / ckpt=, not both"):
        fsseg.load(run["folder"], config=run["config"])
    with pytest.raises(FileNotFoundError, match=r"run folder .*empty has no checkpoints/last.ckpt"):
        (tmp_path / "empty").mkdir()
        fsseg.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.ckpt does not exist"):
        fsseg.load(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="did you mean: demo_diffews"):
        fsseg.load("demo_difews")
    with pytest.raises(ValueError, match="threshold does not apply to PrototypeModule"):
        fsseg.load(run["ckpt"], threshold=0.3)
    with pytest.raises(ValueError, match="img_size must be a positive integer, got 0"):
        fsseg.load(run["ckpt"], img_size=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        fsseg.load(run["ckpt"], precision="fp8")
    with pytest.raises(ValueError, match="precision bf16 conflicts with the model's eval_precision 32-true"):
        fsseg.load(run["ckpt"], precision="bf16", overrides={"eval_precision": "32-true"})
    assert fsseg.load(run["ckpt"], overrides={"eval_precision": "bf16-mixed"}).precision == "bf16"
    with pytest.raises(ValueError, match="the model section does not parse"):
        fsseg.load(run["ckpt"], overrides={"no_such_argument": 1})
    with pytest.raises(ValueError, match="img_size 7: DiffewsModule needs a multiple of 8, at least 16"):
        fsseg.load(config="demo_diffews", no_ckpt=True, img_size=7)


def test_a_training_free_config_loads_without_a_checkpoint(run, files, tmp_path):
    """A method without trainable weights (here the baseline with a frozen backbone and no projection) needs no
    checkpoint and no flag; its masks are those of the model the config builds."""
    cfg = yaml.safe_load(run["config"].read_text())
    cfg["model"]["init_args"].update(freeze_backbone=True, embed_dim=0)
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    seg = fsseg.load(config=path)
    assert not seg.model.trainable_parameters()
    masks = seg.segment(files["queries"], files["supports"][0], files["masks"][0])
    assert [m.shape for m in masks] == [(h, w) for w, h in SIZES]


def test_runs_test_from_python_equals_fsseg_test_which_reads_the_checkpoint_once(run, tmp_path, monkeypatch):
    """`fsseg.runs.test` on the API's model gives `fsseg test`'s episodes exactly; the CLI's evaluation reads the
    checkpoint once (its check and its weights from the same read) and reports from memory."""
    import json

    from fsseg.data.datamodule import FewShotDataModule
    from fsseg.runs import test

    reads, real = [], torch.load

    def counted(f, *args, **kwargs):
        reads.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    cli = run_cli(["test", "--ckpt", str(run["ckpt"]), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    monkeypatch.undo()
    assert reads == [str(run["ckpt"])]
    written = json.loads((cli.report.folder / "metrics.json").read_text())
    assert written == cli.report.metrics and written["ckpt_path"] == str(run["ckpt"].absolute())

    data = yaml.safe_load(run["config"].read_text())["data"]
    report = test(fsseg.load(run["folder"]).model, FewShotDataModule(**data), folder=tmp_path / "py")
    assert report.records == cli.report.records  # every episode's intersection and union
    assert (report.miou, report.fbiou) == (cli.report.miou, cli.report.fbiou)
    assert json.loads((tmp_path / "py" / "metrics.json").read_text())["miou"] == report.miou
