"""DiffewS speed and memory: the one-pass KV fusion against the released two-pass "K/V bank" formulation.

    python benchmarks/diffews_speed.py --model tiny                       # the shipped tiny DiffewS, CPU
    python benchmarks/diffews_speed.py --model sd21 --iters 1 --warmup 0  # SD 2.1 architecture, random weights, 512 px
    python benchmarks/diffews_speed.py --model sd21 --device cuda --dtype bfloat16 --iters 20

Both are DiffewsModule itself: ``support_pass: joint`` (queries and supports in one batched UNet call) and
``support_pass: separate`` (a support call records every attn1 K/V, then a query call attends to them; the same
fusion function). Measures, for each, inference episodes/s (VAE encode, UNet, VAE decode, post-processing) and peak
memory, and the training step time (loss forward + backward) and peak memory, on the same weights and episodes, and
the two-pass / one-pass ratios. Peak memory: CUDA max allocated, or on CPU the peak resident set size above the
level before the measurement (sampled every 2 ms). Writes ``benchmarks/results/diffews_<model>_<device>_<dtype>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from fsseg.episode import fake_batch
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.tiny import save_sd_folder, tiny_text_encoder, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1 unet/config.json
    sample_size=96,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    center_input_sample=False,
)
SD21_VAE = dict(  # stabilityai/stable-diffusion-2-1 vae/config.json
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
    act_fn="silu",
)


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or sampled RSS above the starting level on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.peak, self._stop = self._rss(), self._rss(), False

            def sample():
                while not self._stop:
                    self.peak = max(self.peak, self._rss())
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.total_mib = self.peak / 2**20
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self.peak, self._rss())
            self.total_mib = self.peak / 2**20
        self.mib = (self.peak - self.base) / 2**20


def build_sd21(workdir: Path, seed: int) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer(workdir / "vocab")
    text = tiny_text_encoder(
        len(tok), seed, hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16
    )
    return save_sd_folder(
        workdir / "sd21", UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE), text, tok
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        secs = (time.perf_counter() - t0) / iters
    return {"seconds": secs, "peak_mib": round(mem.mib, 1), "peak_total_mib": round(mem.total_mib, 1)}


def build_module(pretrained: str, support_pass: str, checkpointing: bool, device, dtype) -> DiffewsModule:
    module = DiffewsModule(
        pretrained=pretrained, support_pass=support_pass, gradient_checkpointing=checkpointing
    ).to(device)
    pipe = module.pipeline
    pipe.vae.to(dtype)
    if dtype != torch.float32:
        pipe.unet.to(dtype)
        pipe.prompt_train, pipe.prompt_infer = pipe.prompt_train.to(dtype), pipe.prompt_infer.to(dtype)
    return module


def time_module(module: DiffewsModule, batch: dict, device, iters: int, warmup: int, n_episodes: int) -> dict:
    """Inference (predict_masks) and training-step (loss + backward) time and peak memory."""
    size = tuple(batch["query_mask_eval"].shape[-2:])
    module.eval()
    with torch.no_grad():
        inf = measure(lambda: module.predict_masks(batch, size), device, iters, warmup)
    module.train()

    def step():
        module.training_loss(batch)["loss"].backward()
        module.pipeline.unet.zero_grad(set_to_none=True)

    trn = measure(step, device, iters, warmup)
    return {
        "inference_episodes_per_s": round(n_episodes / inf["seconds"], 4),
        "inference_peak_mib": inf["peak_mib"],
        "inference_peak_total_mib": inf["peak_total_mib"],
        "train_step_s": round(trn["seconds"], 4),
        "train_peak_mib": trn["peak_mib"],
        "train_peak_total_mib": trn["peak_total_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument(
        "--pretrained", default="fsseg/assets/tiny-diffews", help="the tiny model folder (--model tiny)"
    )
    p.add_argument("--size", type=int, default=None, help="image side (default 128 tiny, 512 sd21)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="default 20 (tiny) / 2 (sd21)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (tiny) / 1 (sd21)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = args.size or (128 if args.model == "tiny" else 512)
    iters = args.iters or (20 if args.model == "tiny" else 2)
    warmup = args.warmup if args.warmup is not None else (3 if args.model == "tiny" else 1)
    batch = {
        k: v.to(device) if torch.is_tensor(v) else v
        for k, v in fake_batch(args.batch, args.shots, size, seed=0).items()
    }
    results, images = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            pretrained = args.pretrained
        else:
            t0 = time.perf_counter()
            pretrained = str(build_sd21(Path(tmp), 0))
            print(f"built SD 2.1-architecture folder in {time.perf_counter() - t0:.0f}s", flush=True)
        for name, support_pass in (("one_pass", "joint"), ("two_pass", "separate")):
            module = build_module(pretrained, support_pass, args.gradient_checkpointing, device, dtype)
            module.eval()
            with torch.no_grad():
                images[name] = (
                    module.pipeline.decode_episodes(
                        batch["query_img"], batch["support_imgs"], batch["support_masks"]
                    )
                    .float()
                    .cpu()
                )
            results[name] = time_module(module, batch, device, iters, warmup, args.batch)
            print(name, results[name], flush=True)
            del module
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # both formulations agree on these weights (the parity the tests check in float32)
    diff = (images["one_pass"] - images["two_pass"]).abs().max().item()
    one, two_r = results["one_pass"], results["two_pass"]
    report = {
        "model": args.model,
        "pretrained": args.pretrained if args.model == "tiny" else "SD 2.1 architecture, random weights",
        "image_size": size,
        "batch": args.batch,
        "shots": args.shots,
        "iters": iters,
        "warmup": warmup,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "results": results,
        "ratio_two_over_one": {
            "inference_time": round(one["inference_episodes_per_s"] / two_r["inference_episodes_per_s"], 3),
            "train_step_time": round(two_r["train_step_s"] / one["train_step_s"], 3),
        },
        "max_abs_diff_decoded_image": diff,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **_versions()},
        "command": "python benchmarks/diffews_speed.py "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
    }
    out = Path(args.out or ROOT / f"benchmarks/results/diffews_{args.model}_{device.type}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(json.dumps(report["ratio_two_over_one"]), "->", out)
    return 0


def _versions() -> dict:
    import diffusers
    import lightning
    import transformers

    return {
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


if __name__ == "__main__":
    raise SystemExit(main())
