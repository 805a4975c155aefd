"""Where the SD 2.1 VAE's time goes in the speed benchmark's C path, and what the candidate changes give, in one run.

The VAE is most of C's time on a CPU (``make bench-quick``: encode 43%, decode 34% at 256 px), so this script
takes it alone (random weights, SD 2.1's architecture; C's shapes: one batch of 2 episodes = 6 images encoded, 2
mask latents decoded) and times, interleaved, each variant's encode and decode:

- ``fp32``: contiguous fp32 at the same batch (the released evaluation, A, calls the VAE per image);
- ``bf16_autocast``: bf16 autocast with channels-last weights, what C runs today (fp32 weights re-cast per call);
- ``bf16_autocast_per_image``: C's variant with one image per VAE call (`LatentCodec`'s ``batch=1``);
- ``bf16_weights``: the weights cast to bf16 once (no autocast, inputs in bf16), channels-last;
- ``bf16_autocast_compiled`` (``--compile``): C's variant with the encoder and decoder under ``torch.compile``
  (inductor), with the first call's seconds (the compile) reported apart.

Then it profiles C's variant (``torch.profiler``, self CPU time by operator class: convolution, group norm,
activation, other elementwise, attention) and gives the convolutions' achieved GFLOP/s (FLOPs counted by
``FlopCounterMode``) against a bf16 and an fp32 matmul measured in the same run. Each variant's outputs are compared
with fp32's: the largest latent and image differences, and the share of decoded pixels whose channel mean changes
side of 0.5 (a mask decision).

    python benchmarks/vae_paths.py                 # about 3 minutes on a 2-core CPU, one thread
    python benchmarks/vae_paths.py --compile       # adds about 2-3 minutes of compiling

Writes ``benchmarks/results/vae_paths_<device>.json`` (device, versions, settings, every time).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from diffews_speed import SD21_VAE
from diffusers import AutoencoderKL
from speed import environment, load, matmul_gflops
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from fsseg.files import atomic_write_text
from fsseg.hardware import native_bf16
from fsseg.models.latent import LatentCodec

ROOT = Path(__file__).resolve().parents[1]
OP_CLASSES = {  # aten operator -> class, for the profile
    "aten::mkldnn_convolution": "convolution",
    "aten::convolution": "convolution",
    "aten::native_group_norm": "group_norm",
    "aten::silu": "activation",
    "aten::silu_": "activation",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::bmm": "attention",
    "aten::baddbmm": "attention",
}


def variants(vae, compile_: bool) -> dict:
    """name -> (model, input dtype, autocast on, images per call: 0 = all)."""
    fast = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    out = {
        "fp32": (vae, torch.float32, False, 0),
        "bf16_autocast": (fast, torch.float32, True, 0),
        "bf16_autocast_per_image": (fast, torch.float32, True, 1),
        "bf16_weights": (copy.deepcopy(fast).to(torch.bfloat16), torch.bfloat16, False, 0),
    }
    if compile_:
        compiled = copy.deepcopy(fast)
        compiled.encoder.compile()
        compiled.decoder.compile()
        out["bf16_autocast_compiled"] = (compiled, torch.float32, True, 0)
    return out


def calls(model, dtype, amp, batch, images, latents):
    """encode / decode through `LatentCodec` (fsseg's path), ``batch`` images per call."""
    codec = LatentCodec(model, batch)

    def run(fn):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return fn()

    return {
        "encode": lambda: run(lambda: codec.posterior(images).mean),  # [N, 4, h, w], unscaled
        "decode": lambda: run(lambda: codec.decode(latents.to(dtype))),  # [N, 3, S, S] in [0, 1]
    }


def profile_classes(fn) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total, by_class = 0.0, {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::") or ev.self_cpu_time_total <= 0:
            continue
        cls = OP_CLASSES.get(ev.key, "other elementwise and copies")
        by_class[cls] = by_class.get(cls, 0.0) + ev.self_cpu_time_total / 1e6
        total += ev.self_cpu_time_total / 1e6
    return {
        "seconds": round(total, 3),
        "share": {k: round(v / total, 3) for k, v in sorted(by_class.items())},
    } | {"class_seconds": {k: round(v, 3) for k, v in sorted(by_class.items())}}


def conv_gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    conv = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))
    return conv / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument(
        "--encode-batch", type=int, default=6, help="images per encode (default 6: C's batch of 2)"
    )
    p.add_argument("--decode-batch", type=int, default=2, help="latents per decode (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up (default 2)")
    p.add_argument("--compile", action="store_true", help="also C's variant under torch.compile")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/vae_paths_cpu.json)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: expected at least 1, got {args.repeats}")
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD21_VAE).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.encode_batch, 3, args.size, args.size, generator=g)  # [B, 3, H, W] in [0, 1]
    latents = torch.randn(args.decode_batch, 4, args.size // 8, args.size // 8, generator=g)  # [B, 4, h, w]
    report = {
        "benchmark": "benchmarks/vae_paths.py",
        **environment(torch.device("cpu")),
        "settings": vars(args),
        "command": "python benchmarks/vae_paths.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_start": load(),
        "matmul_gflops": {
            # emulated bf16 (a CPU without bf16 instructions) measured at 1024: a 2048 matmul would take a minute
            "bf16": round(
                matmul_gflops(torch.device("cpu"), torch.bfloat16, 2048 if native_bf16("cpu")[0] else 1024), 1
            ),
            "fp32": round(matmul_gflops(torch.device("cpu"), torch.float32, 2048), 1),
        },
    }
    print("matmul GFLOP/s:", report["matmul_gflops"], flush=True)
    runs = {name: calls(*spec, images, latents) for name, spec in variants(vae, args.compile).items()}
    outputs, first = {}, {}
    for name, fns in runs.items():  # warm-up (the compile, for the compiled variant)
        for part, fn in fns.items():
            t0 = time.perf_counter()
            outputs[(name, part)] = fn().float()
            first[f"{name}/{part}"] = round(time.perf_counter() - t0, 2)
    seconds = {f"{n}/{part}": [] for n, fns in runs.items() for part in fns}
    for _ in range(args.repeats):  # interleaved rounds: a change of load hits every variant
        for name, fns in runs.items():
            for part, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                seconds[f"{name}/{part}"].append(round(time.perf_counter() - t0, 3))
    best = {k: min(v) for k, v in seconds.items()}
    ref_enc, ref_dec = outputs[("fp32", "encode")], outputs[("fp32", "decode")]
    report["variants"] = {
        name: {
            "encode_s": best[f"{name}/encode"],
            "decode_s": best[f"{name}/decode"],
            "speedup_vs_fp32": round(
                (best["fp32/encode"] + best["fp32/decode"])
                / (best[f"{name}/encode"] + best[f"{name}/decode"]),
                3,
            ),
            "speedup_vs_bf16_autocast": round(
                (best["bf16_autocast/encode"] + best["bf16_autocast/decode"])
                / (best[f"{name}/encode"] + best[f"{name}/decode"]),
                3,
            ),
            "latent_max_diff_vs_fp32": float((outputs[(name, "encode")] - ref_enc).abs().max()),
            "image_max_diff_vs_fp32": float((outputs[(name, "decode")] - ref_dec).abs().max()),
            "mask_pixels_differ_vs_fp32": float(
                ((outputs[(name, "decode")].mean(1) > 0.5) != (ref_dec.mean(1) > 0.5)).float().mean()
            ),
        }
        for name in runs
    }
    report["seconds_all"], report["first_call_s"] = seconds, first
    report["latent_abs_max"], report["image_abs_max"] = float(ref_enc.abs().max()), float(ref_dec.abs().max())
    for name, v in report["variants"].items():
        print(
            f"{name}: encode {v['encode_s']} s, decode {v['decode_s']} s, x{v['speedup_vs_fp32']} fp32",
            flush=True,
        )
    profiled = {}
    for part, fn in runs["bf16_autocast"].items():
        prof = profile_classes(fn)
        gflop = conv_gflop(fn)
        conv_s = prof["class_seconds"].get("convolution", float("nan"))
        prof["convolution_gflop"] = round(gflop, 1)
        prof["convolution_gflops"] = round(gflop / conv_s, 1)
        prof["convolution_fraction_of_bf16_matmul"] = round(
            gflop / conv_s / report["matmul_gflops"]["bf16"], 3
        )
        profiled[part] = prof
        print(f"bf16_autocast {part} profile:", json.dumps(prof), flush=True)
    report["bf16_autocast_profile"] = profiled
    report["load_end"] = load()
    out = Path(args.out or ROOT / "benchmarks/results/vae_paths_cpu.json")
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
