"""One path resolution and an offline-first loader for every method (fsseg.models.loading): package assets from any
working directory, the Hugging Face cache without network, one clear error for a missing component, downloads
only when asked for (and then only the needed subfolder in one weights format)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch

from fsseg.models import loading
from fsseg.models.baseline import PrototypeModule
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.tiny import write_tiny_sd
from fsseg.models.diffseg import DiffSegModule
from fsseg.models.loading import MissingWeightsError, download_selection, local_path

ROOT = Path(__file__).resolve().parents[1]


def fake_cache(cache: Path, repo_id: str, content: Path) -> Path:
    """``content`` placed in the Hugging Face cache layout as ``repo_id``'s ``main`` snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(content, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, and a network that fails the test if fsseg touches it."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("fsseg went online although allow_download is false")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    return cache


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("loading") / "sd", seed=0)


def test_package_assets_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path("fsseg/assets/tiny-diffews") == ROOT / "fsseg/assets/tiny-diffews"
    m = DiffewsModule(pretrained="fsseg/assets/tiny-diffews")
    assert m.hparams.pretrained == "fsseg/assets/tiny-diffews"  # stored as given, resolved at every load
    d = DiffSegModule(
        decoder="fsseg/assets/tiny-diffseg/decoder",
        prior="fsseg/assets/tiny-diffseg/prior",
        edge_source="sobel",
    )
    assert d.hparams.decoder == "fsseg/assets/tiny-diffseg/decoder"
    (tmp_path / "mine").mkdir()
    assert local_path("mine") == tmp_path / "mine"  # then the working directory
    assert local_path("missing/folder") is None


def test_hub_id_loads_from_the_cache_offline(hub_cache, sd_dir):
    fake_cache(hub_cache, "someone/tiny-sd", sd_dir)
    m = DiffewsModule(pretrained="someone/tiny-sd", generation="mi2m")
    ref = DiffewsModule(pretrained=str(sd_dir), generation="mi2m")
    assert torch.equal(m.pipeline.unet.conv_in.weight, ref.pipeline.unet.conv_in.weight)
    assert (
        m.pipeline.noise_scheduler.config.beta_end == 0.012
        and m.pipeline.noise_scheduler.config.prediction_type == "v_prediction"
    )


def test_missing_hub_component_is_one_clear_error_without_network(hub_cache):
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        DiffewsModule(pretrained="someone/not-downloaded")
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "Stable Diffusion VAE (AutoencoderKL)" in msg and str(hub_cache) in msg
    assert "hf download someone/not-downloaded --include 'vae/*'" in msg  # what to download
    assert "--local-dir <dir>` and set model.init_args.pretrained: <dir>" in msg  # where it can go instead
    assert "allow_download: true" in msg
    assert err.value.__cause__ is None and err.value.__context__ is None  # no chain of retries behind it


def test_local_folder_without_a_subfolder_and_unknown_paths(tmp_path, sd_dir):
    shutil.copytree(sd_dir, tmp_path / "sd", ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(
        MissingWeightsError, match=r"(?s)has no subfolder 'text_encoder'.*stable-diffusion-2-1"
    ):
        DiffewsModule(pretrained=str(tmp_path / "sd"))
    with pytest.raises(MissingWeightsError, match="neither an existing folder .*looked in"):
        DiffewsModule(pretrained="./not/here")
    with pytest.raises(MissingWeightsError, match="model.init_args.unet_path"):
        DiffewsModule(pretrained=str(sd_dir), unet_path=str(tmp_path / "nothing"))


def test_download_only_when_allowed_and_only_what_is_needed(hub_cache, sd_dir, monkeypatch):
    remote = sorted(str(p.relative_to(sd_dir)) for p in sd_dir.rglob("*") if p.is_file())
    remote += ["vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.safetensors"]
    fetched: list[list[str]] = []

    def list_repo_files(self, repo_id, **kw):
        return remote

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched.append(sorted(allow_patterns))
        fake_cache(hub_cache, repo_id, sd_dir)
        return ""

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(loading, "_cached_snapshot", lambda repo: _cached(hub_cache, repo))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(MissingWeightsError, match="downloads are off"):
        DiffewsModule(pretrained="someone/remote-sd")
    assert fetched == []
    m = DiffewsModule(pretrained="someone/remote-sd", allow_download=True)
    assert m.hparams.allow_download is True
    assert fetched == [["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]]  # the VAE only, once


def _cached(cache: Path, repo_id: str) -> Path | None:
    snap = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    return snap if snap.is_dir() else None


def test_download_selection_keeps_one_weights_format():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.bin",
        "vae/config.json",
    ]
    assert download_selection(files, "unet") == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert download_selection(["config.json", "pytorch_model.bin", "x/y.bin"], None) == [
        "config.json",
        "pytorch_model.bin",
    ]


def test_diffseg_and_baseline_share_the_loader(hub_cache, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"hf download kandinsky-community/kandinsky-2-2-decoder"):
        DiffSegModule(edge_source="sobel")  # the default hub ids, not in the (empty) cache
    with pytest.raises(MissingWeightsError, match=r"hf download timm/resnet18.a1_in1k`; or set"):
        PrototypeModule(backbone="resnet18", pretrained=True)
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "timm"
    weights.mkdir()
    net = timm.create_model("resnet18")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights / "model.safetensors"))
    fake_cache(hub_cache, "timm/resnet18.a1_in1k", weights)
    m = PrototypeModule(backbone="resnet18", pretrained=True, out_indices=(1,))
    torch.testing.assert_close(m.pipeline.encoder.conv1.weight, net.conv1.weight)


def test_checkpoint_keeps_the_source_as_given_and_loads_from_elsewhere(tmp_path, monkeypatch):
    import lightning as L

    rel = dict(decoder="fsseg/assets/tiny-diffseg/decoder", prior="fsseg/assets/tiny-diffseg/prior")
    m = DiffSegModule(edge_source="sobel", **rel)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert {k: saved[k] for k in rel} == rel and saved["allow_download"] is False  # nothing machine-specific
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = DiffSegModule.load_from_checkpoint(tmp_path / "run.ckpt", map_location="cpu")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())
