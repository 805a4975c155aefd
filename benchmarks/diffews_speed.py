"""DiffewS speed and memory: the one-pass KV fusion (fsseg) against the released two-pass "K/V bank" formulation.

    python benchmarks/diffews_speed.py --model tiny                       # the shipped tiny DiffewS, CPU
    python benchmarks/diffews_speed.py --model sd21 --iters 1 --warmup 0  # SD 2.1 architecture, random weights, 512 px
    python benchmarks/diffews_speed.py --model sd21 --device cuda --dtype bfloat16 --iters 20

Measures, for each formulation, inference episodes/s (VAE encode, UNet, VAE decode, post-processing) and peak
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
import torch.nn.functional as F

from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.inputs import binary_mask, supervision_image
from fsseg.models.diffews.tiny import random_episodes, save_sd_folder, tiny_text_encoder, tiny_tokenizer

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


class BankProcessor:
    """The two-pass self-attention: the support pass appends K/V to a per-layer bank, the query pass reads it."""

    def __init__(self, state: dict, layer: int):
        self.state, self.layer = state, layer

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        bank_mode="read",
    ):
        b, n, c = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        bank = self.state["bank"][self.layer]
        if bank_mode == "write":  # a forward argument, so checkpoint recomputation sees the same mode
            bank.append((k, v))
        else:  # query rows b attend to [own, its K supports]; bank entries are [B, L, C] per shot
            k = torch.cat([k] + [bk for bk, _ in bank], 1)
            v = torch.cat([v] + [bv for _, bv in bank], 1)
        split = lambda t: t.view(b, -1, attn.heads, c // attn.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)
        return attn.to_out[1](attn.to_out[0](out))


class TwoPass:
    """Run a DiffewsModule's UNet the released way: K support passes (conv_in_ref) then one query pass."""

    def __init__(self, module: DiffewsModule):
        self.m = module
        unet = module.unet
        self.fused = dict(unet.attn_processors)
        names = [n for n in self.fused if n.endswith("attn1.processor")]
        self.state = {"bank": [[] for _ in names]}
        self.bank_procs = {**self.fused, **{n: BankProcessor(self.state, i) for i, n in enumerate(names)}}

    def install(self) -> None:
        """Bank processors on attn1. They stay until restore(), and each bank until the next call, so gradient
        checkpointing can recompute the passes during backward."""
        self.m.unet.set_attn_processor(dict(self.bank_procs))  # (diffusers pops from the dict it is given)

    def restore(self) -> None:
        self.m.unet.set_attn_processor(dict(self.fused))

    def unet_call(self, query_in, support, t, prompt):
        m, unet = self.m, self.m.unet
        k = support["k"]
        x_s = support["x"].view(query_in.shape[0], k, *support["x"].shape[1:])  # [B, K, 8, h, w]
        self.state["bank"] = [[] for _ in self.state["bank"]]
        e = prompt.expand(query_in.shape[0], -1, -1)
        for j in range(k):
            with m.router.route([(unet.conv_in_ref, x_s[:, j])]):
                unet(x_s[:, j, :4], t, encoder_hidden_states=e, cross_attention_kwargs={"bank_mode": "write"})
        return unet(query_in, t, encoder_hidden_states=e).sample

    @torch.no_grad()
    def predict_image(self, batch):
        m = self.m
        q_img, s_img, s_mask = m._episode_tensors(batch)
        z_q = m.encode(q_img, sample=False)
        support = m._support_inputs(s_img, s_mask, sample=False)
        t = torch.ones(z_q.shape[0], dtype=torch.long, device=z_q.device)
        return m.decode(-self.unet_call(z_q, support, t, m.prompt_infer))

    def training_loss(self, batch):
        m = self.m
        q_img, s_img, s_mask = m._episode_tensors(batch)
        q_mask = binary_mask(batch["query_mask"])
        z_q, z_mq = m.encode(
            torch.cat([q_img, supervision_image(q_img, q_mask, "white_fg")]), sample=True
        ).chunk(2)
        support = m._support_inputs(s_img, s_mask, sample=True)
        t = torch.ones(z_q.shape[0], dtype=torch.long, device=z_q.device)
        return F.mse_loss(self.unet_call(z_q, support, t, m.prompt_train).float(), -z_mq.float())


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
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            pretrained = args.pretrained
        else:
            t0 = time.perf_counter()
            pretrained = str(build_sd21(Path(tmp), 0))
            print(f"built SD 2.1-architecture folder in {time.perf_counter() - t0:.0f}s", flush=True)
        module = DiffewsModule(pretrained=pretrained, gradient_checkpointing=args.gradient_checkpointing).to(
            device
        )
    module.vae.to(dtype)
    if dtype != torch.float32:
        module.unet.to(dtype)
        module.prompt_train, module.prompt_infer = (
            module.prompt_train.to(dtype),
            module.prompt_infer.to(dtype),
        )
    batch = {
        k: v.to(device) if torch.is_tensor(v) else v
        for k, v in random_episodes(args.batch, args.shots, size, seed=0).items()
    }
    two = TwoPass(module)
    # both formulations agree on these weights (the parity the tests check in float32)
    module.eval()
    with torch.no_grad():
        one_img = module.predict_image(batch)
        two.install()
        diff = (one_img - two.predict_image(batch)).abs().max().item()
        two.restore()
    results = {}
    for name, predict, loss in (
        ("one_pass", module.predict_image, module.training_loss),
        ("two_pass", two.predict_image, two.training_loss),
    ):
        if name == "two_pass":
            two.install()
        module.eval()
        inf = measure(lambda predict=predict: predict(batch), device, iters, warmup)
        module.train()

        def step(loss=loss):
            out = loss(batch)
            out = out["loss"] if isinstance(out, dict) else out
            out.backward()
            module.unet.zero_grad(set_to_none=True)

        trn = measure(step, device, iters, warmup)
        results[name] = {
            "inference_episodes_per_s": round(args.batch / inf["seconds"], 4),
            "inference_peak_mib": inf["peak_mib"],
            "inference_peak_total_mib": inf["peak_total_mib"],
            "train_step_s": round(trn["seconds"], 4),
            "train_peak_mib": trn["peak_mib"],
            "train_peak_total_mib": trn["peak_total_mib"],
        }
        print(name, results[name], flush=True)
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
