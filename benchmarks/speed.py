"""Speed where users run it: DiffewS's released evaluation formulation against fsseg's fp32 path and fsseg's fastest
faithful path, the training latent cache, ``predict-images --precision bf16`` and DiffSeg's frozen pass, all in one
run on the SD 2.1 / Kandinsky 2.2 architectures with random weights (nothing downloaded).

    python benchmarks/speed.py --quick      # `make bench-quick`: 256 px DiffewS A/B/C + latent cache (minutes, CPU)
    python benchmarks/speed.py              # full: 256 and 512 px, latent cache and predict-images at 512 px,
                                            # DiffSeg at 256 and 512 px, torch.compile (long on a CPU)
    python benchmarks/speed.py --device cuda --quick

DiffewS evaluation, 1-shot episodes, the same random episodes for every path:

- A, the released formulation: fp32, batch 1, contiguous layout; the CLIP text encoder (SD 2.1's architecture) run
  on "" every episode; the query, support and support-mask images encoded in three VAE calls; the two-pass K/V bank
  (`DiffewsModule.support_bank`, then `query_call`: what ``support_pass: separate`` runs, through the same fusion
  function); decode, the uint8 round trip through numpy, the released post-processing (`DiffewsModule.masks`).
- B, fsseg's evaluation path in fp32 (`DiffewsModule.predict_masks`: the joint one-pass call, the prompt embedding
  computed once, one VAE call for queries and supports), batch 1.
- C, fsseg's fastest faithful path: B under bf16 autocast (what ``--trainer.precision bf16-mixed`` does), with
  channels-last weights, ``--c-batch`` episodes per batch, its VAE one image per call on a CPU (``--c-vae-batch``,
  `DiffewsModule`'s ``vae_batch``). The same method: same fusion, OI2M step and post-processing.
  ``--c-precision auto`` (the default) runs C in bf16 only where the device computes it natively
  (`fsseg.hardware.native_bf16`: a GPU with bf16, a CPU with AVX512-BF16 or AMX, the rule of the demo's tests);
  elsewhere bf16 is emulated (about 100x slower than fp32 on an AVX2 CPU) and C runs in fp32 (``C_fsseg_fp32_b2``).

Per component (VAE encode, UNet, VAE decode, post-processing ``DiffewsModule.masks``, and the rest of the time),
each call timed alone inside the variants (``C_components``; seconds only for A and B): C's FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention: none in post-processing), and each
component's achieved GFLOP/s is reported with its fraction of a matmul in C's precision measured in the same run
(``C_unet``: the UNet's, the last line's figure). Timing: one warm-up call per
variant (quick mode: not for B and the cached training step, which follow a warmed-up variant running the same
model on the same shapes), then ``--repeats`` rounds that call the variants in turn (so a change of machine load hits all of them);
the minimum is reported (and every time, and the load average before and after each section).

Latent cache: a training step (in C's precision: ``training_loss`` + backward + an SGD update; batch 1, 1-shot, SD 2.1
size) with live VAE encoding against one reading the cached posteriors (`fsseg.data.latent_cache`).
predict-images: a 512 px query against a cached support (`encode_support` once, then `predict_with_support`) in
today's fp32 path (contiguous layout) and with ``--precision bf16`` (channels-last). DiffSeg: `predict_masks` of the
Kandinsky 2.2 decoder UNet + MoVQ (random weights; a small CLIP with Kandinsky's 1280-d projection stands in for
ViT-bigG, as in diffseg_speed.py) in fp32 at batch 1 and in bf16, channels-last, batched.

Writes ``benchmarks/results/speed_<quick|full>_<device>.json``; the last line printed is
``speedup_vs_released=<A time / C time> latent_cache=<live / cached step> bf16_fraction_of_peak=<C's UNet>``
(``nan`` where C ran in fp32: the line before it gives the UNet's fraction of the fp32 matmul rate).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# sibling scripts (python puts this script's folder on the path): the SD 2.1 and Kandinsky 2.2 architectures
from diffews_speed import SD21_UNET, SD21_VAE
from diffseg_speed import RandomKandinskyDiffSeg
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from fsseg.data import latent_cache as lc
from fsseg.data.embedded import generate_embedded_benchmark
from fsseg.data.pascal import EmbeddedFewShot
from fsseg.episode import fake_batch, foreground, mask_image
from fsseg.hardware import native_bf16
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.module import cached_moments
from fsseg.models.diffews.support import LatentSupport
from fsseg.models.diffews.tiny import save_sd_folder, tiny_text_encoder, tiny_tokenizer
from fsseg.user_inputs import precision_context

ROOT = Path(__file__).resolve().parents[1]
SD21_TEXT = dict(  # stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower)
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)


# ---- machinery ---------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Best GFLOP/s of an n x n x n matmul over ``repeats`` calls (after one warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class Meter:
    """Wraps components' calls (``name -> (object, method name)``: the UNet's ``forward``, the VAE's ``encode`` and
    ``decode``, the module's post-processing ``masks``): wall time and calls per variant and component
    (synchronised), and FLOPs of the calls made while ``count`` is on (``FlopCounterMode``: matmuls, convolutions,
    attention; resizes, comparisons and other elementwise work count 0)."""

    def __init__(self, components: dict[str, tuple[object, str]], device: torch.device) -> None:
        self.device, self.current, self.count = device, None, False
        self.seconds: dict[str, dict[str, float]] = {c: {} for c in components}
        self.calls: dict[str, dict[str, int]] = {c: {} for c in components}
        self.flops: dict[str, dict[str, int]] = {c: {} for c in components}
        self.wrapped = []
        for comp, (obj, attr) in components.items():
            setattr(obj, attr, self._wrap(comp, getattr(obj, attr)))  # an instance attribute: found first
            self.wrapped.append((obj, attr))

    def _wrap(self, comp: str, inner: Callable):
        def call(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            if self.count:
                with FlopCounterMode(display=False) as counter:
                    out = inner(*args, **kwargs)
                flops = self.flops[comp]
                flops[self.current] = flops.get(self.current, 0) + counter.get_total_flops()
            else:
                out = inner(*args, **kwargs)
            sync(self.device)
            if not self.count and self.current is not None:
                seconds, calls = self.seconds[comp], self.calls[comp]
                seconds[self.current] = seconds.get(self.current, 0.0) + time.perf_counter() - t0
                calls[self.current] = calls.get(self.current, 0) + 1
            return out

        return call

    def clear(self) -> None:
        for comp in self.seconds:
            self.seconds[comp].clear()
            self.calls[comp].clear()

    def remove(self) -> None:
        for obj, attr in self.wrapped:
            delattr(obj, attr)


def interleaved(
    variants: dict[str, tuple[Callable[[], None], Callable[[], object]]],
    repeats: int,
    device: torch.device,
    meter: Meter | None = None,
    count_flops: tuple[str, ...] = (),
    cold: tuple[str, ...] = (),
) -> dict[str, list[float]]:
    """``variants``: name -> (prepare, run). Each runs once untimed (warm-up; FLOPs counted for ``count_flops``),
    except those in ``cold`` (quick mode: a variant that runs the same model on the same shapes as the one before it;
    no warm-up can only make it look slower), then ``repeats`` rounds call them in turn; ``prepare`` (a layout
    change, say) is never timed."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, (prepare, run) in variants.items():
        if name in cold and name not in count_flops:
            continue
        prepare()
        if meter is not None:
            meter.current, meter.count = name, name in count_flops
        run()
        if meter is not None:
            meter.count = False
    if meter is not None:
        meter.clear()
    for _ in range(repeats):
        for name, (prepare, run) in variants.items():
            prepare()
            if meter is not None:
                meter.current = name
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            print(f"  {name}: {times[name][-1]:.2f} s (load {load()[0]})", flush=True)
    return times


def summary(seconds: list[float], per: int = 1) -> dict:
    return {
        "seconds_min": round(min(seconds) / per, 4),
        "seconds_median": round(statistics.median(seconds) / per, 4),
        "seconds_all": [round(s, 3) for s in seconds],
        "per_call": per,
    }


def set_channels_last(modules: list[torch.nn.Module], on: bool) -> None:
    fmt = torch.channels_last if on else torch.contiguous_format
    for m in modules:
        m.to(memory_format=fmt)


def autocast(device: torch.device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def take(batch: dict, i: int) -> dict:
    """Episode ``i`` of a batch, as a batch of one."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v[i : i + 1]
        elif k == "support_names":
            out[k] = [names[i : i + 1] for names in v]
        else:
            out[k] = v[i : i + 1]
    return out


# ---- models ------------------------------------------------------------------------------------------------------
def build_sd21(workdir: Path, tiny: bool = False) -> tuple[Path, dict]:
    """An SD 2.1-layout folder with random weights (the SD 2.1 architecture, or the tiny test one)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fsseg.models.diffews.tiny import tiny_unet, tiny_vae

    torch.manual_seed(0)
    tok = tiny_tokenizer(workdir / "vocab")
    if tiny:
        parts = (tiny_unet(0), tiny_vae(1), tiny_text_encoder(len(tok), 2))
    else:
        parts = (
            UNet2DConditionModel(**SD21_UNET),
            AutoencoderKL(**SD21_VAE),
            tiny_text_encoder(len(tok), 2, **SD21_TEXT),
        )
    folder = save_sd_folder(workdir / "sd", *parts, tok)
    note = {
        "architecture": "tiny test model"
        if tiny
        else "SD 2.1 (UNet, VAE, CLIP text encoder), random weights",
        "text_encoder": "SD 2.1's text tower with a byte-level tokenizer (vocabulary 514 instead of 49408)",
    }
    return folder, note


def released_episode(m: DiffewsModule, text_encoder, tokenizer, ep: dict, out_size) -> torch.Tensor:
    """One 1-shot episode as the released evaluation computes it (see the module docstring, A)."""
    device = ep["query_img"].device
    ids = tokenizer("", return_tensors="pt").input_ids.to(device)  # [BOS, EOS], every episode
    prompt = text_encoder(ids)[0]  # [1, 2, D]
    q, s = ep["query_img"], ep["support_imgs"][:, 0]
    z_q, z_s, z_ms = (
        m.pipeline.codec.encode(x, sample=False)
        for x in (q, s, mask_image(foreground(ep["support_masks"][:, 0])))
    )  # three VAE calls
    support = LatentSupport(torch.cat([z_s, z_ms], 1), 1)
    t = torch.ones(1, dtype=torch.long, device=device)
    calls = m.pipeline.unet_calls
    bank = calls.support_bank(support, t, prompt)  # pass 1: every attn1 K/V of the support
    query = calls.query_call(
        z_q, support, t, prompt, bank, training=False
    )  # pass 2: the query against the bank
    image = m.pipeline.codec.decode(-query)
    u8 = (image.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)  # truncation, as released
    image = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255).to(device)
    return m.pipeline.masks(image, q, out_size)


# ---- sections ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def components(meter: Meter, variant: str, times: list[float], repeats: int, peak: float) -> dict:
    """Per component of ``variant`` (one batch, the mean over the timed rounds): seconds, share of the variant's
    time, the FLOPs counted and the rate achieved (GFLOP/s and its fraction of ``peak``, the matmul rate in the
    variant's precision; None where no
    FLOPs are counted); ``other``: the rest of the variant's time (embedding, noise, scheduler, casts, Python)."""
    total = sum(times) / repeats
    out: dict[str, dict] = {}
    for comp in meter.seconds:
        sec = meter.seconds[comp].get(variant, 0.0) / repeats
        flop = meter.flops[comp].get(variant, 0)
        gflops = flop / sec / 1e9 if flop and sec else None
        out[comp] = {
            "calls_per_batch": meter.calls[comp].get(variant, 0) // repeats,
            "seconds_per_batch": round(sec, 4),
            "share_of_time": round(sec / total, 3),
            "gflop_per_batch": round(flop / 1e9, 2),
            "gflops": None if gflops is None else round(gflops, 1),
            "fraction_of_peak": None if gflops is None else round(gflops / peak, 3),
        }
    rest = total - sum(v["seconds_per_batch"] for v in out.values())
    out["other"] = {"seconds_per_batch": round(rest, 4), "share_of_time": round(rest / total, 3)}
    return out


def print_components(name: str, comps: dict) -> None:
    """One line per component: the next bottleneck at a glance."""
    for comp, v in comps.items():
        rate = (
            f", {v['gflops']} GFLOP/s ({v['fraction_of_peak']:.0%} of the matmul rate)"
            if v.get("gflops")
            else ""
        )
        print(
            f"  {name} {comp}: {v['seconds_per_batch']:.3f} s/batch, {v['share_of_time']:.0%} of the time{rate}"
        )


def diffews_eval(
    m, text_encoder, tokenizer, size, c_batch, c_bf16, repeats, device, peak, lean=False, c_vae_batch=0
) -> dict:
    """A, B and C at ``size`` px (see the module docstring); C's VAE takes ``c_vae_batch`` images per call."""
    m.eval()
    batch = to(fake_batch(b=c_batch, k=1, size=size, seed=0), device)
    one = take(batch, 0)
    out_size = (size, size)
    layers = [m.pipeline.unet, m.pipeline.vae]
    outs: dict[str, torch.Tensor] = {}

    def run_a():
        outs["A"] = released_episode(m, text_encoder, tokenizer, one, out_size)

    def run_b():
        outs["B"] = m.predict_masks(one, out_size)

    def run_c():
        with autocast(device, c_bf16):
            outs["C"] = m.predict_masks(batch, out_size)

    def layout(channels_last: bool, vae_batch: int = 0):
        set_channels_last(layers, channels_last)
        m.pipeline.codec.batch = vae_batch

    variants = {
        "A_released_fp32_b1": (lambda: layout(False), run_a),
        "B_fsseg_fp32_b1": (lambda: layout(True), run_b),
        f"C_fsseg_{'bf16' if c_bf16 else 'fp32'}_b{c_batch}": (lambda: layout(True, c_vae_batch), run_c),
    }
    names = list(variants)
    p = m.pipeline
    meter = Meter(
        {"vae_encode": (p.vae, "encode"), "unet": (p.unet, "forward"), "vae_decode": (p.vae, "decode"),
         "post_processing": (p, "masks")},
        device,
    )  # fmt: skip
    before = load()
    try:
        times = interleaved(
            variants, repeats, device, meter, count_flops=(names[2],), cold=(names[1],) if lean else ()
        )
    finally:
        meter.remove()
        m.pipeline.codec.batch = 0
    res = {
        names[0]: summary(times[names[0]]),
        names[1]: summary(times[names[1]]),
        names[2]: summary(times[names[2]], per=c_batch),
    }
    for name in names:
        res[name]["episodes_per_s"] = round(1 / res[name]["seconds_min"], 4)
    c = names[2]
    res["C_components"] = components(meter, c, times[c], repeats, peak)
    res["A_B_component_seconds_per_episode"] = {
        name: {comp: round(meter.seconds[comp].get(name, 0.0) / repeats, 3) for comp in meter.seconds}
        for name in names[:2]
    }
    res["C_unet"] = dict(res["C_components"]["unet"])
    res["speedup_C_over_A"] = round(res[names[0]]["seconds_min"] / res[c]["seconds_min"], 3)
    res["speedup_B_over_A"] = round(res[names[0]]["seconds_min"] / res[names[1]]["seconds_min"], 3)
    res["agreement_episode0"] = {  # random weights: a sanity check that the three compute the same masks
        "A_vs_B_pixels_differ": float((outs["A"] != outs["B"]).float().mean()),
        "B_vs_C_pixels_differ": float((outs["B"] != outs["C"][:1]).float().mean()),
        "foreground_B": float(outs["B"].float().mean()),
    }
    res["load_before_after"] = [before, load()]
    return res


def latent_cache_step(m, size, repeats, device, workdir: Path, bf16: bool, lean=False) -> dict:
    """A training step (bf16 autocast, or fp32 where ``bf16`` is false) with live VAE encoding and with the latent cache (the cached moments come
    with the batch, as the data module's training loader gives them)."""
    root = generate_embedded_benchmark(
        workdir / f"embedded{size}", seed=0, image_size=128, n_train=40, n_val=40
    )
    ds = EmbeddedFewShot(root, split="trn", fold=0, shot=1, img_size=size, n_episodes=8)
    items = [ds[i] for i in range(2)]
    names = {n for it in items for n in (it["query_name"], *it["support_names"])}
    images, masks = lc.entries([ds])
    images = {k: v for k, v in images.items() if k in names}
    masks = {k: v for k, v in masks.items() if k[0] in names}
    set_channels_last([m.pipeline.unet, m.pipeline.vae], True)
    folder = lc.build(
        workdir / f"cache{size}", m.pipeline.codec.moments, images, masks, {"format": lc.FORMAT}
    )
    with_moments = lc.LatentMoments(ds, lc.LatentCache(folder))
    batches = {
        False: [to(default_collate([it]), device) for it in items],
        True: [to(default_collate([with_moments[i]]), device) for i in range(len(items))],
    }
    opt = torch.optim.SGD(
        m.pipeline.unet.parameters(), lr=1e-7
    )  # no optimizer state: the update costs one pass
    m.train()
    turn = {"i": 0}

    def step(cached: bool):
        batch = batches[cached][turn["i"] % 2]
        turn["i"] += 1
        moments = (lambda idx: cached_moments(batch, idx, "concat")) if cached else None
        episode = (batch["query_img"], batch["query_mask"], batch["support_imgs"], batch["support_masks"])
        with autocast(device, bf16):
            loss = m.pipeline.training_loss(*episode, moments)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = load()
    nothing = lambda: None  # noqa: E731
    times = interleaved(
        {"live": (nothing, lambda: step(False)), "cached": (nothing, lambda: step(True))},
        repeats,
        device,
        cold=("cached",) if lean else (),
    )
    m.eval()
    res = {k: summary(v) for k, v in times.items()}
    res["speedup_cached_over_live"] = round(res["live"]["seconds_min"] / res["cached"]["seconds_min"], 3)
    res["step"] = (
        f"{'bf16 autocast' if bf16 else 'fp32'} DiffewsPipeline.training_loss + backward + SGD update (AdamW adds "
        f"the same to both), batch 1, 1-shot"
    )
    res["cache_entries"] = {"images": len(images), "mask_images": len(masks)}
    res["load_before_after"] = [before, load()]
    return res


@torch.no_grad()
def predict_images_speed(m, size, repeats, device) -> dict:
    """One ``size`` px query against a cached support: today's fp32 path against ``--precision bf16``."""
    m.eval()
    ep = to(fake_batch(b=1, k=1, size=size, seed=1), device)
    s_img, s_mask, query = ep["support_imgs"][0], ep["support_masks"][0], ep["query_img"]
    layers = [m.pipeline.unet, m.pipeline.vae]
    states = {}
    for precision, channels_last in (("fp32", False), ("bf16", True)):
        set_channels_last(layers, channels_last)
        with precision_context(precision, device):
            states[precision] = m.encode_support(s_img, s_mask)

    def run(precision):
        with precision_context(precision, device):
            return m.predict_with_support(states[precision], query, (size, size))

    before = load()
    times = interleaved(
        {
            "fp32_contiguous": (lambda: set_channels_last(layers, False), lambda: run("fp32")),
            "bf16_channels_last": (lambda: set_channels_last(layers, True), lambda: run("bf16")),
        },
        repeats,
        device,
    )
    res = {k: summary(v) for k, v in times.items()}
    res["speedup_bf16"] = round(
        res["fp32_contiguous"]["seconds_min"] / res["bf16_channels_last"]["seconds_min"], 3
    )
    res["load_before_after"] = [before, load()]
    return res


@torch.no_grad()
def compile_speed(m, size, c_batch, repeats, device) -> dict:
    """C with the UNet compiled (torch.compile, default mode): compile time and steady speed against eager C."""
    m.eval()
    batch = to(fake_batch(b=c_batch, k=1, size=size, seed=0), device)
    set_channels_last([m.pipeline.unet, m.pipeline.vae], True)

    def run():
        with autocast(device, True):
            m.predict_masks(batch, (size, size))

    t0 = time.perf_counter()
    eager = interleaved({"eager": (lambda: None, run)}, repeats, device)["eager"]
    eager_total = time.perf_counter() - t0
    m.pipeline.unet.compile()
    t0 = time.perf_counter()
    run()  # compiles
    first = time.perf_counter() - t0
    compiled = interleaved({"compiled": (lambda: None, run)}, repeats, device)["compiled"]
    m.pipeline.unet._compiled_call_impl = None  # back to eager for whatever follows
    return {
        "eager": summary(eager, c_batch),
        "compiled": summary(compiled, c_batch),
        "first_compiled_call_s": round(first, 1),
        "eager_section_s": round(eager_total, 1),
        "speedup_steady": round(min(eager) / min(compiled), 3),
        "batches_to_pay_back_compile": round(
            (first - min(compiled)) / max(min(eager) - min(compiled), 1e-9), 1
        ),
    }


@torch.no_grad()
def diffseg_eval(size, batch_size, repeats, device, peak) -> dict:
    """DiffSeg's predict_masks on the Kandinsky 2.2 architecture: fp32 batch 1 against bf16, channels-last, batched."""
    m = RandomKandinskyDiffSeg(decoder="random", prior="random", edge_source="sobel").to(device).eval()
    layers = [m.pipeline.unet, m.pipeline.movq]
    batch = to(fake_batch(b=batch_size, k=1, size=size, seed=2), device)
    one = take(batch, 0)
    variants = {
        "fp32_b1": (lambda: set_channels_last(layers, False), lambda: m.predict_masks(one, (size, size))),
        f"bf16_channels_last_b{batch_size}": (
            lambda: set_channels_last(layers, True),
            lambda: _bf16(device, lambda: m.predict_masks(batch, (size, size))),
        ),
    }
    names = list(variants)
    meter = Meter({"unet": (m.pipeline.unet, "forward")}, device)
    before = load()
    try:
        times = interleaved(variants, repeats, device, meter, count_flops=tuple(names))
    finally:
        meter.remove()
        m.pipeline.codec.batch = 0
    res = {names[0]: summary(times[names[0]]), names[1]: summary(times[names[1]], per=batch_size)}
    for name in names:
        res[name]["episodes_per_s"] = round(1 / res[name]["seconds_min"], 4)
        unet_s = meter.seconds["unet"][name] / meter.calls["unet"][name]
        gflops = meter.flops["unet"][name] / unet_s / 1e9
        res[name]["unet"] = {
            "gflop_per_call": round(meter.flops["unet"][name] / 1e9, 1),
            "seconds_per_call": round(unet_s, 3),
            "gflops": round(gflops, 1),
            "fraction_of_bf16_matmul": round(gflops / peak, 3),
        }
    res["speedup"] = round(res[names[0]]["seconds_min"] / res[names[1]]["seconds_min"], 3)
    res["clip"] = "small stand-in with Kandinsky's 1280-d projection (ViT-bigG/14 not built)"
    res["load_before_after"] = [before, load()]
    return res


def _bf16(device, fn):
    with autocast(device, True):
        return fn()


# ---- main --------------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import diffusers
    import lightning
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
        },
    }


def cpu_model() -> str:
    """The CPU's model name, core count and bf16 instruction sets (Linux: /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"}) or ["no bf16 instructions"]
    return f"{model}, {os.cpu_count()} cores, {'+'.join(bf16)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 px DiffewS A/B/C and the latent cache only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="DiffewS sizes (default 256; full: 256 512)"
    )
    p.add_argument(
        "--c-batch",
        type=int,
        default=None,
        help="C's episodes per batch (default: 16 on a GPU; 2 on a CPU, which "
        "is compute-bound at batch 1 already: more episodes per batch only lengthen the run)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per variant after one warm-up (quick 1, full 2)",
    )
    p.add_argument(
        "--only", nargs="+", choices=("diffews", "cache", "predict", "compile", "diffseg"), default=None
    )
    p.add_argument(
        "--tiny", action="store_true", help="the tiny test architecture (checks the machinery only)"
    )
    p.add_argument(
        "--c-precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="C's precision (auto: bf16 where the device computes it natively, else fp32)",
    )
    p.add_argument(
        "--c-vae-batch",
        type=int,
        default=None,
        help="C's images per VAE call (DiffewsModule vae_batch; default: 1 on a CPU, where one image per call is "
        "faster, 0 = all in one call on a GPU)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = args.sizes or ([256] if args.quick else [256, 512])
    c_batch = args.c_batch or (16 if gpu else 2)
    c_vae_batch = args.c_vae_batch if args.c_vae_batch is not None else (0 if gpu else 1)
    if c_vae_batch < 0:
        p.error(f"--c-vae-batch: expected 0 (all in one call) or more, got {c_vae_batch}")
    args.repeats = args.repeats or (1 if args.quick else 2)
    sections = set(
        args.only
        or (("diffews", "cache") if args.quick else ("diffews", "cache", "predict", "compile", "diffseg"))
    )
    mode = "quick" if args.quick else "full"
    native, why = native_bf16(device.type)
    c_bf16 = args.c_precision == "bf16" or (args.c_precision == "auto" and native)
    c_precision = "bf16" if c_bf16 else "fp32"
    c_reason = f"--c-precision {args.c_precision}" + (f" ({why})" if args.c_precision == "auto" else "")
    print(f"C in {c_precision}: {c_reason}", flush=True)
    report = {
        "benchmark": "benchmarks/speed.py",
        "mode": mode,
        **environment(device),
        "settings": {
            "sizes": sizes,
            "c_batch": c_batch,
            "c_vae_batch": c_vae_batch,
            "repeats": args.repeats,
            "sections": sorted(sections),
            "warm_up": "every variant but B and the cached step" if args.quick else "every variant",
            "torch_threads": torch.get_num_threads(),
            "c_precision": c_precision,
            "c_precision_reason": c_reason,
        },
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_start": load(),
    }
    started = time.perf_counter()
    n = 8192 if gpu else 4096
    # emulated bf16 measured at 1024 (a 4096 matmul would take minutes): its rate does not depend on the size
    bf16_peak = matmul_gflops(device, torch.bfloat16, n if native else 1024)
    fp32_peak = matmul_gflops(device, torch.float32, n)
    peak = bf16_peak if c_bf16 else fp32_peak  # C's components are given as fractions of this
    report["matmul_gflops"] = {"bf16": round(bf16_peak, 1), "fp32": round(fp32_peak, 1)}
    print(f"matmul: {report['matmul_gflops']} GFLOP/s, load {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if sections & {"diffews", "cache", "predict", "compile"}:
            t0 = time.perf_counter()
            folder, report["diffews_model"] = build_sd21(work, tiny=args.tiny)
            m = DiffewsModule(pretrained=str(folder), channels_last=True).to(device)
            from transformers import CLIPTextModel, CLIPTokenizer

            text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
            report["diffews_model"]["build_s"] = round(time.perf_counter() - t0, 1)
            if "diffews" in sections:
                for size in sizes:
                    print(f"DiffewS evaluation at {size} px", flush=True)
                    report[f"diffews_eval_{size}"] = ev = diffews_eval(
                        m,
                        text_encoder,
                        tokenizer,
                        size,
                        c_batch,
                        c_bf16,
                        args.repeats,
                        device,
                        peak,
                        args.quick,
                        c_vae_batch,
                    )
                    print_components(next(k for k in ev if k.startswith("C_fsseg")), ev["C_components"])
            if "cache" in sections:
                size = sizes[0] if args.quick else max(sizes)
                print(f"training step, live encoding vs latent cache, {size} px", flush=True)
                report[f"latent_cache_{size}"] = latent_cache_step(
                    m, size, args.repeats, device, work, c_bf16, args.quick
                )
            if "predict" in sections:
                size = max(sizes) if args.tiny else 512
                print(f"predict-images, a {size} px query against a cached support", flush=True)
                report[f"predict_images_{size}"] = predict_images_speed(m, size, args.repeats, device)
            if "compile" in sections:
                print(f"torch.compile of C's UNet at {min(sizes)} px", flush=True)
                report[f"compile_{min(sizes)}"] = compile_speed(m, min(sizes), c_batch, args.repeats, device)
            del m, text_encoder
            gc.collect()
        if "diffseg" in sections and not args.tiny:
            for size in sizes:
                print(f"DiffSeg frozen pass at {size} px", flush=True)
                report[f"diffseg_eval_{size}"] = diffseg_eval(size, c_batch, args.repeats, device, bf16_peak)
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_end"] = load()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"speed_{mode}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    first = f"diffews_eval_{sizes[0]}"
    cache_key = next((k for k in report if k.startswith("latent_cache_")), None)
    speedup = report[first]["speedup_C_over_A"] if first in report else float("nan")
    cache = report[cache_key]["speedup_cached_over_live"] if cache_key else float("nan")
    frac = report[first]["C_unet"]["fraction_of_peak"] if first in report else float("nan")
    if not c_bf16:
        print(f"C ran in fp32 ({c_reason}): its UNet reached {frac} of the fp32 matmul rate; no bf16 figure")
        frac = float("nan")
    print(f"speedup_vs_released={speedup} latent_cache={cache} bf16_fraction_of_peak={frac}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
