"""``fsseg plan``: the live-storage tracker, CUDA's autocast lists on CPU tensors, the weight-less architectures,
and the plan on fake tensors against the same steps on real tensors (tiny DiffewS / DiffSeg, built in-process)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fsseg.cli import run
from fsseg.plan import cuda_autocast as ca
from fsseg.plan.build import build_module
from fsseg.plan.core import GIB, Setting, fits, plan, run_steps
from fsseg.plan.measure import measure_step
from fsseg.plan.tracker import LiveMemory

REPO = Path(__file__).resolve().parents[1]


# ---- the tracker -------------------------------------------------------------------------------------------------
def test_live_memory_counts_each_storage_once_until_it_is_freed():
    t = LiveMemory()
    with t:
        a = torch.empty(1000)  # 4000 bytes
        v = a[10:]  # a view: no new storage
        b = a * 2  # 4000
        del a
        assert t.total == 8000  # v keeps a's storage alive
        del v
        c = torch.empty(10)  # 40
    assert (t.peak, t.total, t.current["activations"]) == (8000, 4040, 4040)
    p = torch.nn.Parameter(torch.empty(100))
    t.track(p, "parameters")
    t.track(b, "gradients")  # a storage already counted takes the new category
    assert t.current == {**t.current, "parameters": 400, "gradients": 4000, "activations": 40}
    cuda = LiveMemory(granularity=512)
    with cuda:
        x = torch.empty(1000)  # 4000 -> 4096, as the CUDA caching allocator's blocks
        y = torch.empty(1)  # 4 -> 512
    assert cuda.total == 4096 + 512 and x.numel() + y.numel() == 1001 and c.numel() == 10


# ---- CUDA autocast on CPU tensors -------------------------------------------------------------------------------
def _header_ops(text: str, macro: str) -> set[str]:
    body = text.split(f"#define {macro}(_)")[1].split("\n\n")[0]
    return set(re.findall(r"_\((?:ADD_NS\()?(\w+)", body))


def test_cuda_autocast_lists_are_those_of_the_installed_torch():
    header = Path(torch.__file__).parent / "include/ATen/autocast_mode.h"
    if not header.is_file():
        pytest.skip(f"this torch installation has no C++ headers ({header})")
    text = header.read_text()
    assert _header_ops(text, "AT_FORALL_LOWER_PRECISION_FP") == ca.LOWER_PRECISION
    assert _header_ops(text, "AT_FORALL_FP32") == ca.FP32
    assert _header_ops(text, "AT_FORALL_FP32_SET_OPT_DTYPE") | {"norm"} == ca.FP32_OUTPUT
    assert "norm" in _header_ops(text, "AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE")
    assert _header_ops(text, "AT_FORALL_PROMOTE") == ca.PROMOTE


def test_cuda_autocast_casts_by_the_cuda_lists_where_cpu_autocast_would_not():
    lin, x = torch.nn.Linear(64, 64), torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_norm = F.group_norm(lin(x)[:, :, None, None], 4)  # CPU autocast keeps group_norm in bf16
        with ca.CudaAutocast() as mode:
            y = lin(x)
            norm = F.group_norm(y[:, :, None, None], 4)
            up = F.interpolate(y[:, :, None, None], scale_factor=2.0)
            soft, total = y.softmax(-1), y.sum()
            both = torch.addcmul(x, y, y)  # promote: the widest of bf16 and fp32
            assert id(lin.weight) in mode._cache and id(x) not in mode._cache  # the weight cast, kept
            assert lin(x).dtype == torch.bfloat16 and len(mode._cache) == 2  # weight and bias, cast once
            with torch.autocast("cpu", enabled=False):  # a region the model switches off
                off = lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), ca.CudaAutocast() as uncached:
        assert lin(x).dtype == torch.bfloat16 and not uncached._cache  # Lightning's autocast keeps no cache
    assert cpu_norm.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert norm.dtype == up.dtype == soft.dtype == total.dtype == both.dtype == off.dtype == torch.float32


def test_fits_leaves_room_for_the_context_and_the_allocator():
    assert fits(int(20 * GIB), 24) == "yes"  # 20 x 1.1 + 1 = 23
    assert fits(int(22 * GIB), 24) == "tight"  # 22 + 1 <= 24 < 22 x 1.1 + 1
    assert fits(int(23.5 * GIB), 24) == "no"


# ---- plan (fake tensors) == the same steps on real tensors ----------------------------------------------------------
def tiny_diffews(tmp: Path) -> dict:
    from fsseg.models.diffews.tiny import write_tiny_sd

    return {
        "class_path": "fsseg.models.diffews.DiffewsModule",
        "init_args": {
            "pretrained": str(write_tiny_sd(tmp / "sd", seed=0)),
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}},
        },
    }


def tiny_diffseg(tmp: Path) -> dict:
    assets = REPO / "fsseg/assets/tiny-diffseg"
    return {
        "class_path": "fsseg.models.diffseg.DiffSegModule",
        "init_args": {
            "decoder": str(assets / "decoder"),
            "prior": str(assets / "prior"),
            "edge_source": "sobel",
            "pam_dim": 16,
            "pam_heads": 2,
            "scm_width": 16,
            "scm_edge_channels": 8,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}},
        },
    }


def test_plan_for_cuda_recomputes_checkpointed_blocks_by_the_cuda_lists(tmp_path):
    # the recomputation in the backward must cast as the forward did (else torch's CheckpointError: other dtypes,
    # group_norm's output float32 in the forward by CUDA's lists, bf16 in a recomputation by the CPU's)
    model = tiny_diffews(tmp_path)
    model["init_args"]["gradient_checkpointing"] = True
    setting = Setting(model, "bf16-mixed", batch_size=1, eval_batch_size=1, shot=1, img_size=32, eval_size=32,
                      accumulate=1, clip_val=None, clip_algorithm="norm")  # fmt: skip
    train = plan(setting, "cuda", ("fit",))["train"]
    at = train["at_peak_bytes"]
    assert at["gradients"] > 0 and train["peak_bytes"] > at["parameters"] + at["gradients"]


@pytest.mark.parametrize(
    "model", [tiny_diffews, pytest.param(tiny_diffseg, marks=pytest.mark.slow)], ids=["diffews", "diffseg"]
)
def test_plan_on_fake_tensors_matches_the_steps_on_real_tensors(model, tmp_path):
    # a fake step costs Python time per operation, whatever the sizes: DiffSeg (more of them) is a slow test
    setting = Setting(model(tmp_path), "32-true", batch_size=2, eval_batch_size=3, shot=2, img_size=32,
                      eval_size=40, accumulate=4, clip_val=1.0, clip_algorithm="norm")  # fmt: skip
    planned = plan(setting, "cpu")
    module, _, _ = build_module(setting.model, None, None)  # the config's own weights, as a run loads them
    real = run_steps(module, setting, ("fit", "test"), "cpu", 1, emulate_cuda=False, notes=[])
    at = planned["train"]["at_peak_bytes"]
    assert at["optimizer"] > 0 and at["parameters"] > 0 and planned["train"]["peak_phase"] != "setup"
    for key in ("train", "eval"):
        assert planned[key]["peak_bytes"] == pytest.approx(real[key]["peak_bytes"], rel=0.01), key
    # the tracker against the CPU allocator's own accounting (torch.profiler), the measurement of benchmarks/memory.py
    measured = measure_step(module, setting, "test", torch.device("cpu"))
    assert measured["measured_bytes"] == pytest.approx(planned["eval"]["peak_bytes"], rel=0.05)


def test_plan_builds_the_shipped_sd21_architecture_at_full_size(tmp_path):
    from fsseg.plan.skeleton import write_source

    info = write_source("stabilityai/stable-diffusion-2-1", ["unet", "vae", "text_encoder", "tokenizer"],
                        tmp_path, "model.init_args.pretrained")  # fmt: skip
    # the published parameter counts of SD 2.1's UNet, VAE and OpenCLIP ViT-H text tower
    assert [info[k]["parameters"] for k in ("unet", "vae", "text_encoder")] == [
        865910724,
        83653863,
        340387840,
    ]
    assert info["unet"]["from"] == "shipped architecture"
    weights = tmp_path / "unet/diffusion_pytorch_model.bin"
    assert weights.stat().st_size > 3.4e9 and weights.stat().st_blocks * 512 < 1e8  # full size, no data


def test_plan_builds_a_released_unet_with_its_extra_input_conv(tmp_path):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from fsseg.models.diffews.tiny import tiny_unet

    unet = tiny_unet(seed=1)  # saved as released DiffewS UNets are: conv_in_ref.* and in_channels_ref: 8
    unet.add_module("conv_in_ref", torch.nn.Conv2d(8, unet.conv_in.out_channels, 3, padding=1))
    unet.register_to_config(in_channels_ref=8)
    unet.save_pretrained(tmp_path / "released")
    model = tiny_diffews(tmp_path)
    model["init_args"]["unet_path"] = str(tmp_path / "released")
    module, components, _ = build_module(model, tmp_path / "skeleton", FakeTensorMode())
    conv = module.pipeline.unet.conv_in_ref
    assert isinstance(conv.weight, FakeTensor) and conv.in_channels == 8
    assert components["unet_path"]["components"]["from"] == "local"


# ---- the command ----------------------------------------------------------------------------------------------------
def test_plan_evaluates_in_the_models_eval_precision(tmp_path):
    # the DiffewS paper configs train in 16-mixed and evaluate in 32-true (model.init_args.eval_precision)
    model = tiny_diffews(tmp_path)
    setting = Setting(model, "32-true", batch_size=1, eval_batch_size=2, shot=1, img_size=32, eval_size=32,
                      accumulate=1, clip_val=None, clip_algorithm="norm")  # fmt: skip
    fp32 = plan(setting, "cuda", ("test",))["eval"]
    setting.precision = "bf16-mixed"
    bf16 = plan(setting, "cuda", ("test",))["eval"]
    model["init_args"]["eval_precision"] = "32-true"
    bf16_training = plan(setting, "cuda", ("test",))["eval"]
    assert (fp32["precision"], bf16["precision"], bf16_training["precision"]) == (
        "32-true",
        "bf16-mixed",
        "32-true",
    )
    assert bf16_training["peak_bytes"] == fp32["peak_bytes"] != bf16["peak_bytes"]
    setting.precision = (
        "bf16-true"  # the weights in bf16: the run refuses an fp32 evaluation, so does the plan
    )
    with pytest.raises(ValueError, match="eval_precision 32-true needs fp32 weights"):
        plan(setting, "cuda", ("test",))


def test_fsseg_plan_command_writes_json_and_refuses_what_it_cannot_plan(tmp_path, capsys):
    cfg = {
        "trainer": {"precision": "bf16-mixed", "gradient_clip_val": 1.0},
        "model": tiny_diffews(tmp_path),
        "data": {"root": str(tmp_path), "benchmark": "embedded", "shot": 1, "img_size": 32, "batch_size": 2,
                 "effective_batch_size": 8, "eval_batch_size": 2},
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "plan.json"
    assert run(["plan", "--config", str(path), "--json", str(out), "--data.shot", "2"]) == 0
    text = capsys.readouterr().out
    assert "train step: peak" in text and "fits: 24 GB: train yes, eval yes" in text and str(out) in text
    result = json.loads(out.read_text())
    assert (
        result["target"] == "cuda" and result["setting"]["shot"] == 2 and result["setting"]["accumulate"] == 4
    )
    assert result["setting"]["precision"] == "bf16-mixed" and result["train"]["peak_bytes"] % 512 == 0
    assert result["versions"]["torch"] == torch.__version__ and result["cards"]["80 GB"]["train"] == "yes"
    # an existing --json is refused before any work; --overwrite replaces it
    assert run(["plan", "--config", str(path), "--json", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run(["plan", "--config", str(path), "--ckpt", "x.ckpt"]) == 2
    assert "needs no checkpoint" in capsys.readouterr().err
    assert run(["plan", "--config", str(path), "--trainer.precision", "transformer-engine"]) == 2
    assert "trainer.precision" in capsys.readouterr().err
    # the output rules of fsseg compare --json: a folder is refused by name, an option prefix is no option
    assert run(["plan", "--config", str(path), "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err
    assert run(["plan", "--config", str(path), "--js", str(tmp_path / "p.json")]) == 2
    assert "--js" in capsys.readouterr().err and not (tmp_path / "p.json").exists()


def test_memory_benchmark_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: tests/test_plan.py::test_memory_benchmark_on_a_gpu measures it")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks/memory.py"), "--name", "x", "--device", "cuda",
                          "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 2 and "needs a CUDA device" in res.stderr and not (tmp_path / "x.json").exists()


@pytest.mark.gpu
def test_memory_benchmark_on_a_gpu(tmp_path):
    out = tmp_path / "m.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/memory.py"), "--name", "demo", "--config",
                    "demo_diffews", "--device", "cuda", "--out", str(out)], check=True, timeout=1800)  # fmt: skip
    for row in json.loads(out.read_text())["steps"].values():
        assert abs(row["error_pct"]) <= 10, row
