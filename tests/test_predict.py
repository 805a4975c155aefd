"""``fsseg predict-images`` on generated images: every method with a checkpoint, outputs at the query's size equal to
the method's own `predict_masks`, the support encoded once (DiffewS: its K/V computed once), and clear errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fsseg.api import Segmenter
from fsseg.cli import main as fsseg_main
from fsseg.cli.trainer import run_cli
from fsseg.data.base import image_to_tensor, load_rgb
from fsseg.models.baseline import PrototypeModule
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.tiny import write_tiny_sd
from fsseg.models.diffseg import DiffSegModule
from fsseg.models.diffseg.tiny import save_tiny_components
from fsseg.predict import predict_images
from fsseg.runs import build_model
from fsseg.user_inputs import load_support, read_support_mask

QUERY_SIZES = {"a.png": (40, 30), "b.jpg": (64, 64), "c.png": (50, 70)}  # (w, h)


def noise_image(w: int, h: int, seed: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = (230, 40, 40)  # a red object
    return Image.fromarray(arr)


def save_mask(path: Path, w: int, h: int, box, value: int = 255, mode: str = "L") -> Path:
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = value
    Image.fromarray(m, mode).save(path)
    return path


@pytest.fixture
def images(tmp_path) -> dict:
    """Two supports (a red box, its 0/255 mask) and a folder of three queries of different sizes."""
    sup = []
    for i, (w, h, box) in enumerate([(64, 48, (10, 8, 40, 30)), (56, 56, (20, 20, 50, 44))]):
        noise_image(w, h, i, box).save(tmp_path / f"s{i}.png")
        sup.append((tmp_path / f"s{i}.png", save_mask(tmp_path / f"s{i}_mask.png", w, h, box)))
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for j, (name, (w, h)) in enumerate(QUERY_SIZES.items()):
        noise_image(w, h, 10 + j, (w // 4, h // 4, w // 2, h // 2)).save(qdir / name)
    (qdir / "notes.txt").write_text("not an image: skipped by extension")
    return {"supports": sup, "queries": qdir, "out": tmp_path / "out"}


def cli_args(images: dict, shots: int = 1) -> list[str]:
    args = []
    for img, mask in images["supports"][:shots]:
        args += ["--support", str(img), "--support-mask", str(mask)]
    return args + ["--query", str(images["queries"]), "--out", str(images["out"])]


def direct_predictions(
    model, images: dict, shots: int, img_size: int, resize: str = "torch"
) -> dict[str, np.ndarray]:
    """The method's own `predict_masks` on an episode batch built by hand, per query."""
    pairs = [load_support(i, m, img_size, image_resize=resize) for i, m in images["supports"][:shots]]
    s_imgs, s_masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    out = {}
    for name in QUERY_SIZES:
        img = load_rgb(images["queries"] / name)
        batch = {
            "query_img": image_to_tensor(img, img_size, resize)[None],
            "support_imgs": s_imgs[None],
            "support_masks": s_masks[None],
        }
        with torch.no_grad():
            out[Path(name).stem] = model.predict_masks(batch, (img.height, img.width))[0].numpy()
    return out


def check_outputs(images: dict, expected: dict[str, np.ndarray], tolerance: float = 0.0) -> None:
    """The written masks equal ``expected`` (up to a ``tolerance`` fraction of pixels: DiffewS's cached K/V path
    differs from the joint call by float noise, which can move a decoded value across a uint8 level)."""
    out = images["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{Path(n).stem}_{k}.png" for n in QUERY_SIZES for k in ("mask", "overlay")
    )
    for name, (w, h) in QUERY_SIZES.items():
        stem = Path(name).stem
        mask = np.array(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        if tolerance == 0:
            np.testing.assert_array_equal(mask == 255, expected[stem] == 1)
        assert ((mask == 255) != (expected[stem] == 1)).mean() <= tolerance
        with Image.open(out / f"{stem}_overlay.png") as ov:
            assert ov.size == (w, h) and ov.mode == "RGB"


def save_lightning_checkpoint(model: L.LightningModule, run_dir: Path, config: dict) -> Path:
    """A checkpoint in the layout of a training run: <run>/config.yaml, <run>/checkpoints/last.ckpt."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return run_dir / "checkpoints" / "last.ckpt"


# ---- the baseline, from a checkpoint of a real `fsseg fit` --------------------------------------------------------
@pytest.fixture(scope="module")
def baseline_ckpt(tmp_path_factory, small_embedded) -> Path:
    tmp = tmp_path_factory.mktemp("baseline_run")
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
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "p"},
            },
        },
        "model": {
            "class_path": "fsseg.models.baseline.PrototypeModule",
            "init_args": {
                "out_indices": [1],
                "embed_dim": 16,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
            },
        },
        "data": {
            "root": str(small_embedded),
            "benchmark": "embedded",
            "img_size": 48,
            "batch_size": 4,
            "train_episodes": 8,
        },
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    fit = run_cli(["fit", "--config", str(tmp / "config.yaml")])
    return Path(fit.trainer.checkpoint_callback.last_model_path)


@pytest.mark.parametrize("shots", [1, 2])
def test_baseline_from_checkpoint(baseline_ckpt, images, shots):
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--ckpt", str(baseline_ckpt), *cli_args(images, shots)])
    assert done.value.code == 0
    model, data = build_model(ckpt=baseline_ckpt)
    assert data["img_size"] == 48  # the run's input size is the default
    trained = torch.load(baseline_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    check_outputs(images, direct_predictions(model, images, shots, 48))


# ---- DiffewS and DiffSeg, tiny models in their real folder layouts ------------------------------------------------
@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return str(write_tiny_sd(tmp_path_factory.mktemp("predict_diffews") / "sd", seed=0))


@pytest.fixture(scope="module")
def kandinsky_dir(tmp_path_factory) -> Path:
    return save_tiny_components(tmp_path_factory.mktemp("predict_diffseg"), seed=0)


def test_diffews_from_checkpoint(sd_dir, images, tmp_path):
    config = {
        "model": {"class_path": "fsseg.models.diffews.DiffewsModule", "init_args": {"pretrained": sd_dir}},
        "data": {"img_size": 32},
    }
    L.seed_everything(3)
    model = DiffewsModule(pretrained=sd_dir)
    with torch.no_grad():
        model.pipeline.unet.conv_in_ref.weight.add_(
            0.05 * torch.randn_like(model.pipeline.unet.conv_in_ref.weight)
        )  # differs from a fresh init
    ckpt = save_lightning_checkpoint(model, tmp_path / "run", config)
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--ckpt", str(ckpt), "--threshold", "0.5", *cli_args(images, 2)])
    assert done.value.code == 0
    with_threshold = DiffewsModule(pretrained=sd_dir, threshold=0.5).eval()  # what --threshold sets
    with_threshold.load_state_dict(model.state_dict())
    check_outputs(
        images, direct_predictions(with_threshold, images, 2, 32), 0.01
    )  # the checkpoint's weights were used


def test_diffseg_from_config_and_checkpoint(kandinsky_dir, images, tmp_path):
    init = {
        "decoder": str(kandinsky_dir / "decoder"),
        "prior": str(kandinsky_dir / "prior"),
        "edge_source": "sobel",
        "scm_zero_init": False,
    }
    config = {
        "model": {"class_path": "fsseg.models.diffseg.DiffSegModule", "init_args": init},
        "data": {"img_size": 64},
    }
    L.seed_everything(4)
    model, _ = build_model(config=_write(tmp_path / "c.yaml", config))
    ckpt = save_lightning_checkpoint(model, tmp_path / "run", config)
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--ckpt", str(ckpt), "--threshold", "0.45", *cli_args(images, 1)])
    assert done.value.code == 0
    with_threshold = DiffSegModule(**init, threshold=0.45)  # what --threshold sets
    with_threshold.load_state_dict(model.state_dict())
    check_outputs(images, direct_predictions(with_threshold, images, 1, 64))


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ---- the support is encoded once ----------------------------------------------------------------------------------
CachedDiffews = DiffewsModule  # binds the support cache as encode_support / predict_with_support


def cached_image(model: DiffewsModule, state, queries: torch.Tensor) -> torch.Tensor:
    """The decoded prediction of `predict_with_support`: `predict_image` with the stored support's UNet call."""
    return model.pipeline.decode_queries(state, queries)


def _count_rows(module: torch.nn.Module) -> list[int]:
    """Records the batch size of every forward call of ``module``."""
    rows: list[int] = []

    def hook(mod, args, kwargs):
        rows.append(int((args[0] if args else next(iter(kwargs.values()))).shape[0]))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def _spy(model, name: str, calls: list) -> None:
    method = getattr(model, name)

    def wrapper(*args):
        calls.append(name)
        return method(*args)

    setattr(model, name, wrapper)


def test_support_encoded_once_for_all_queries(images):
    model = PrototypeModule(out_indices=(1,), embed_dim=8)
    calls: list[str] = []
    _spy(model, "encode_support", calls)
    _spy(model, "predict_with_support", calls)
    queries = sorted(images["queries"].glob("*.*g"))
    predict_images(Segmenter(model, 32), images["supports"], queries, images["out"])
    assert calls == ["encode_support"] + ["predict_with_support"] * 3


@pytest.mark.parametrize(
    "kw", [{}, {"injection": "attention_mask", "generation": "mi2m", "num_inference_steps": 2}]
)
def test_diffews_support_keys_values_computed_once(sd_dir, images, kw):
    """One support pass (K rows) per visited timestep, then query-only UNet passes (1 row each); the prediction
    equals the joint one-pass call of `DiffewsModule.predict_masks`."""
    torch.manual_seed(0)
    model = CachedDiffews(pretrained=sd_dir, **kw).eval()
    unet_rows, vae_rows = _count_rows(model.pipeline.unet), _count_rows(model.pipeline.vae.encoder)
    queries = sorted(images["queries"].glob("*.*g"))
    predict_images(Segmenter(model, 32), images["supports"], queries, images["out"])
    steps = kw.get("num_inference_steps", 1)
    support_rows = (
        2 if kw.get("injection") == "attention_mask" else 4
    )  # concat also encodes the 2 mask images
    assert vae_rows == [support_rows] + [1] * 3  # the supports once, then each query
    assert unet_rows == [2] * steps + [1] * 3 * steps
    # the stored K/V give what the joint one-pass call gives (up to uint8 rounding of the decoded image)
    pairs = [load_support(i, m, 32) for i, m in images["supports"]]
    s_imgs, s_masks = (
        torch.stack([p[0] for p in pairs]),
        torch.stack([p[1] for p in pairs]),
    )  # [2, 3, 32, 32], [2, 32, 32]
    q = torch.stack([image_to_tensor(load_rgb(p), 32) for p in queries])  # [3, 3, 32, 32]
    batch = {
        "query_img": q,
        "support_imgs": s_imgs.expand(3, -1, -1, -1, -1),
        "support_masks": s_masks.expand(3, -1, -1, -1),
    }
    with torch.no_grad():
        joint = model.pipeline.decode_episodes(
            batch["query_img"], batch["support_imgs"], batch["support_masks"]
        )
    cached = cached_image(model, model.encode_support(s_imgs, s_masks), q)
    assert joint.std() > 0.01 and (cached - joint).abs().max() <= 1 / 255 + 1e-6


# every variant's cached support against its joint call: tests/test_diffews_cache.py


CachedDiffSeg = DiffSegModule  # binds the support cache as encode_support / predict_with_support


def test_diffseg_support_latent_and_embedding_computed_once(kandinsky_dir, images):
    torch.manual_seed(0)
    model = CachedDiffSeg(
        decoder=str(kandinsky_dir / "decoder"),
        prior=str(kandinsky_dir / "prior"),
        edge_source="sobel",
        scm_zero_init=False,
    ).eval()
    movq_rows, clip_rows = _count_rows(model.pipeline.movq.encoder), _count_rows(model.pipeline.image_encoder)
    predict_images(
        Segmenter(model, 64), images["supports"], sorted(images["queries"].glob("*.*g")), images["out"]
    )
    assert movq_rows == [2, 1, 1, 1] and clip_rows == [2]  # the 2 masked supports once, then each query
    check_outputs(images, direct_predictions(model, images, 2, 64))  # what the joint predict_masks gives


# ---- clear errors ------------------------------------------------------------------------------------------------
def test_support_mask_errors_name_the_file(tmp_path):
    box = (4, 4, 20, 20)
    with pytest.raises(ValueError, match=r"empty\.png is empty"):
        read_support_mask(save_mask(tmp_path / "empty.png", 32, 32, (0, 0, 0, 0)))
    multi = np.zeros((32, 32), np.uint8)
    multi[2:10, 2:10], multi[12:20, 12:20] = 100, 200
    Image.fromarray(multi).save(tmp_path / "multi.png")
    with pytest.raises(ValueError, match=r"multi\.png is not binary.*100, 200.*--mask-value"):
        read_support_mask(tmp_path / "multi.png")
    assert read_support_mask(tmp_path / "multi.png", mask_value=200).sum() == 64
    with pytest.raises(ValueError, match=r"multi\.png: --mask-value 7 does not occur"):
        read_support_mask(tmp_path / "multi.png", mask_value=7)
    palette = save_mask(tmp_path / "palette.png", 32, 32, box, value=15, mode="P")  # a VOC-style class index
    assert read_support_mask(palette).sum() == 16 * 16
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"garbage\.png is unreadable"):
        read_support_mask(tmp_path / "garbage.png")
    with pytest.raises(FileNotFoundError, match=r"missing\.png is missing"):
        read_support_mask(tmp_path / "missing.png")


def test_support_pair_errors_name_the_files(tmp_path):
    noise_image(64, 48, 0).save(tmp_path / "img.png")
    with pytest.raises(ValueError, match=r"small\.png is 32x32 \(WxH\) but its image .*img\.png is 64x48"):
        load_support(tmp_path / "img.png", save_mask(tmp_path / "small.png", 32, 32, (4, 4, 20, 20)), 32)
    with pytest.raises(ValueError, match=r"dot\.png: the object vanishes at --img-size 8"):
        load_support(tmp_path / "img.png", save_mask(tmp_path / "dot.png", 64, 48, (33, 25, 34, 26)), 8)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"bad\.jpg is unreadable"):
        load_support(tmp_path / "bad.jpg", tmp_path / "small.png", 32)


def test_cli_errors_are_one_line_naming_the_file(baseline_ckpt, images, capsys):
    (images["queries"] / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--ckpt", str(baseline_ckpt), *cli_args(images)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "query image" in err and "broken.png is unreadable" in err
    assert not images["out"].exists()  # nothing written before the inputs are checked
    (images["queries"] / "broken.png").unlink()
    bad = [
        "--support",
        str(images["supports"][0][0]),
        "--support-mask",
        str(images["supports"][1][1]),
    ]  # 56x56 mask for a 64x48 image
    with pytest.raises(SystemExit) as done:
        fsseg_main(
            [
                "predict-images",
                "--ckpt",
                str(baseline_ckpt),
                *bad,
                "--query",
                str(images["queries"]),
                "--out",
                str(images["out"]),
            ]
        )
    assert done.value.code == 2 and "s1_mask.png is 56x56" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--ckpt", str(baseline_ckpt), "--threshold", "0.3", *cli_args(images)])
    assert done.value.code == 2 and "--threshold does not apply to PrototypeModule" in capsys.readouterr().err
    # a method whose weights are not there says which and where they go
    missing = images["out"].parent / "no_sd_here"
    config = _write(
        images["out"].parent / "diffews.yaml",
        {
            "model": {
                "class_path": "fsseg.models.diffews.DiffewsModule",
                "init_args": {"pretrained": str(missing)},
            }
        },
    )
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--config", str(config), "--no_ckpt", *cli_args(images)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "no_sd_here" in err and "Stable Diffusion" in err


# ---- weights, config names, sizes, masks with transparency, broken queries --------------------------------------
def test_config_without_checkpoint_needs_no_ckpt(baseline_ckpt, images, capsys):
    config = baseline_ckpt.parent.parent / "config.yaml"
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--config", str(config), *cli_args(images)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "no checkpoint given" in err and "--no_ckpt" in err
    assert not images["out"].exists()
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--ckpt", str(baseline_ckpt), "--no_ckpt", *cli_args(images)])
    assert done.value.code == 2 and "--no_ckpt contradicts --ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--config", str(config), "--no_ckpt", *cli_args(images)])
    assert done.value.code == 0 and "no checkpoint (--no_ckpt" in capsys.readouterr().out
    torch.manual_seed(
        0
    )  # the model as the config builds it: its initialisation, seeded as predict-images seeds it
    assert len(list(images["out"].glob("*_mask.png"))) == 3


def test_config_names_resolve_as_for_every_command(images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repository: `demo_diffews` is a name, not a file here
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--config", "demo_diffews", "--no_ckpt", *cli_args(images)])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "input 128 px (torch resize)" in out
    with pytest.raises(SystemExit) as done:
        fsseg_main(
            ["predict-images", "--config", "demo_difews", "--no_ckpt", *cli_args(images), "--overwrite"]
        )
    assert done.value.code == 2 and "did you mean: demo_diffews" in capsys.readouterr().err


def test_sizes_the_model_cannot_take_are_refused_by_name(images, capsys):
    for size, expected in (("7", "--img-size 7: DiffewsModule needs a multiple of 8, at least 16"),
                           ("0", "--img-size must be a positive integer, got 0")):  # fmt: skip
        with pytest.raises(SystemExit) as done:
            fsseg_main(["predict-images", "--config", "demo_diffews", "--no_ckpt", "--img-size", size,
                        *cli_args(images)])  # fmt: skip
        (line,) = [
            x for x in capsys.readouterr().err.splitlines() if x.startswith("fsseg")
        ]  # (diffusers warns)
        assert done.value.code == 2 and line.startswith(f"fsseg predict-images: error: {expected}")
        assert not images["out"].exists()


def test_the_runs_image_resize_is_used(baseline_ckpt, images):
    with pytest.raises(SystemExit) as done:
        fsseg_main(
            ["predict-images", "--ckpt", str(baseline_ckpt), "--image-resize", "pil", *cli_args(images)]
        )
    assert done.value.code == 0
    model, _ = build_model(ckpt=baseline_ckpt)
    check_outputs(images, direct_predictions(model, images, 1, 48, "pil"))


def _rgba(path: Path, alpha: np.ndarray, colour_opaque, colour_clear) -> Path:
    """An RGBA mask: ``colour_opaque`` where ``alpha`` is set, ``colour_clear`` elsewhere."""
    rgba = np.zeros(alpha.shape + (4,), np.uint8)
    rgba[...] = (*colour_clear, 0)
    rgba[alpha > 0] = (*colour_opaque, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_masks_with_transparency_are_read_from_alpha_or_refused_as_ambiguous(tmp_path):
    obj = np.zeros((32, 32), np.uint8)
    obj[4:20, 6:12] = 1
    # the object opaque in one colour, the rest transparent: read from the alpha, whatever the colours
    for name, opaque, clear in (("black_on_clear_white", (0, 0, 0), (255, 255, 255)),  # luminance would invert it
                                ("white_on_clear_white", (255, 255, 255), (255, 255, 255)),  # luminance: all object
                                ("black_on_clear_black", (0, 0, 0), (0, 0, 0)),  # luminance: empty
                                ("red_on_clear_black", (255, 0, 0), (0, 0, 0))):  # fmt: skip
        np.testing.assert_array_equal(
            read_support_mask(_rgba(tmp_path / f"{name}.png", obj, opaque, clear)), obj
        )
    # colours that vary where it is opaque, and mark other pixels than the alpha: refused, naming the file
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = obj * 255
    rgba[:16, :, :3] = 255  # the top half white, across object and background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ambiguous.png")
    with pytest.raises(
        ValueError,
        match=r"support mask .*ambiguous\.png is ambiguous: its alpha channel and its colours mark different",
    ):
        read_support_mask(tmp_path / "ambiguous.png")
    # colours that mark the same pixels as the alpha (a label map with transparency): its values, as without alpha
    rgba[..., :3] = 0
    rgba[4:20, 6:9, :3], rgba[4:20, 9:12, :3] = 100, 200  # two objects, opaque, on transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "labels.png")
    with pytest.raises(ValueError, match=r"labels\.png is not binary.*100, 200"):
        read_support_mask(tmp_path / "labels.png")
    second = np.zeros_like(obj)
    second[4:20, 9:12] = 1
    np.testing.assert_array_equal(read_support_mask(tmp_path / "labels.png", mask_value=200), second)
    # fully opaque RGBA and grey+alpha: the colours, as before
    opaque = np.zeros((32, 32, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[obj > 0, :3] = 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(read_support_mask(tmp_path / "opaque.png"), obj)
    la = np.stack([np.full((32, 32), 90, np.uint8), obj * 255], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_support_mask(tmp_path / "la.png"), obj)


def test_a_truncated_query_fails_before_any_output(baseline_ckpt, images, capsys):
    good = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(good).save(images["queries"] / "z.jpg", quality=95)
    data = (images["queries"] / "z.jpg").read_bytes()
    (images["queries"] / "z.jpg").write_bytes(data[: len(data) // 2])  # its header parses, its pixels do not
    with pytest.raises(SystemExit) as done:
        fsseg_main(["predict-images", "--ckpt", str(baseline_ckpt), *cli_args(images)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "z.jpg is unreadable" in err and "truncated" in err
    assert not images["out"].exists()  # a.png, b.jpg, c.png (sorted before z.jpg) not written either
    (images["queries"] / "z.jpg").unlink()
    with pytest.raises(SystemExit) as done:  # the rerun needs no --overwrite
        fsseg_main(["predict-images", "--ckpt", str(baseline_ckpt), *cli_args(images)])
    assert done.value.code == 0


# ---- --precision bf16 ---------------------------------------------------------------------------------------------
def _unet_dtypes(model) -> set:
    dtypes: set = set()
    model.pipeline.unet.register_forward_hook(lambda m, a, out: dtypes.add(getattr(out, "sample", out).dtype))
    return dtypes


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*_mask.png"))}


def test_diffews_bf16_agrees_with_fp32(images, tmp_path):
    """The shipped tiny DiffewS: bf16 autocast runs the UNet in bf16 and gives (almost) the fp32 masks."""
    model = DiffewsModule(pretrained="fsseg/assets/tiny-diffews").eval()
    dtypes = _unet_dtypes(model)
    queries = sorted(images["queries"].glob("*.*g"))
    out = {}
    for precision in ("fp32", "bf16"):
        dtypes.clear()
        predict_images(
            Segmenter(model, 128, precision=precision), images["supports"], queries, tmp_path / precision
        )
        assert dtypes == {torch.float32 if precision == "fp32" else torch.bfloat16}
        out[precision] = _masks(tmp_path / precision)
    assert len(out["fp32"]) == 3 and out["fp32"].keys() == out["bf16"].keys()
    differ = np.mean([(out["fp32"][k] != out["bf16"][k]).mean() for k in out["fp32"]])
    assert differ <= 0.01, differ
    assert any((m == 255).any() for m in out["fp32"].values())


def test_precision_flag(kandinsky_dir, images, tmp_path, capsys):
    init = {
        "decoder": str(kandinsky_dir / "decoder"),
        "prior": str(kandinsky_dir / "prior"),
        "edge_source": "sobel",
    }
    config = _write(
        tmp_path / "c.yaml",
        {
            "model": {"class_path": "fsseg.models.diffseg.DiffSegModule", "init_args": init},
            "data": {"img_size": 64},
        },
    )
    with pytest.raises(SystemExit) as done:
        fsseg_main(
            [
                "predict-images",
                "--config",
                str(config),
                "--no_ckpt",
                "--precision",
                "bf16",
                *cli_args(images, 1),
            ]
        )
    assert done.value.code == 0
    assert "precision bf16" in capsys.readouterr().out and len(_masks(images["out"])) == 3
    with pytest.raises(SystemExit) as done:
        fsseg_main(
            [
                "predict-images",
                "--config",
                str(config),
                "--no_ckpt",
                "--precision",
                "fp8",
                *cli_args(images, 1),
            ]
        )
    assert done.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.gpu
def test_diffews_bf16_on_gpu(images, tmp_path):
    model = DiffewsModule(pretrained="fsseg/assets/tiny-diffews").eval()
    dtypes = _unet_dtypes(model)
    queries = sorted(images["queries"].glob("*.*g"))
    predict_images(
        Segmenter(model, 128, device="cuda", precision="bf16"), images["supports"], queries, tmp_path
    )
    assert dtypes == {torch.bfloat16} and len(_masks(tmp_path)) == 3


# ---- the model's evaluation precision -----------------------------------------------------------------------------
def test_precision_follows_the_models_eval_precision_and_a_conflict_is_refused(baseline_ckpt, images, capsys):
    from fsseg.user_inputs import resolve_precision

    assert resolve_precision(None, None) == "fp32"
    assert resolve_precision(None, "bf16-mixed") == "bf16" and resolve_precision("bf16", None) == "bf16"
    assert resolve_precision("fp32", "32-true") == "fp32"
    with pytest.raises(
        ValueError, match="--precision bf16 conflicts with the model's eval_precision 32-true"
    ):
        resolve_precision("bf16", "32-true")
    cfg = yaml.safe_load((baseline_ckpt.parent.parent / "config.yaml").read_text())
    cfg["model"]["init_args"]["eval_precision"] = "32-true"
    config = _write(images["out"].parent / "fp32_eval.yaml", cfg)
    args = ["predict-images", "--config", str(config), "--ckpt", str(baseline_ckpt), *cli_args(images)]
    with pytest.raises(SystemExit) as done:
        fsseg_main([*args, "--precision", "bf16"])
    assert done.value.code == 2 and "eval_precision 32-true" in capsys.readouterr().err
    assert not images["out"].exists()  # refused before anything was written
    with pytest.raises(SystemExit) as done:
        fsseg_main(args)
    assert done.value.code == 0 and "precision fp32" in capsys.readouterr().out


# ---- --overwrite replaces results only once new ones exist -------------------------------------------------------
def test_overwrite_replaces_masks_only_once_every_query_is_predicted(
    baseline_ckpt, images, monkeypatch, capsys
):
    def files() -> dict[str, tuple[bytes, int]]:  # name -> (content, inode): an atomic replace is a new inode
        return {p.name: (p.read_bytes(), p.stat().st_ino) for p in images["out"].iterdir()}

    args = ["predict-images", "--ckpt", str(baseline_ckpt), *cli_args(images)]
    with pytest.raises(SystemExit) as done:
        fsseg_main(args)
    assert done.value.code == 0
    before = files()
    assert len(before) == 6
    with pytest.raises(SystemExit) as done:  # refused up front without --overwrite, naming a file
        fsseg_main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and "a_mask.png (and 5 more) already exists: pass --overwrite" in err
    # a run with --overwrite that fails on its second query: the earlier files untouched, nothing half-written
    original = PrototypeModule.predict_with_support
    calls = []

    def fails_on_the_second_query(self, *a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(self, *a)

    monkeypatch.setattr(PrototypeModule, "predict_with_support", fails_on_the_second_query)
    with pytest.raises(SystemExit) as done:
        fsseg_main([*args, "--overwrite"])
    assert done.value.code == 1 and "out of memory" in capsys.readouterr().err
    assert files() == before
    monkeypatch.setattr(PrototypeModule, "predict_with_support", original)
    with pytest.raises(SystemExit) as done:  # the same run, succeeding: every file replaced by a new one
        fsseg_main([*args, "--overwrite"])
    assert done.value.code == 0
    after = files()
    assert after.keys() == before.keys()
    assert all(after[k][0] == before[k][0] and after[k][1] != before[k][1] for k in after)
