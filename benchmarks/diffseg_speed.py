"""DiffSeg speed: the tiny model set at 128 px and the real Kandinsky 2.2 architecture (random weights) at 512 px.

    python benchmarks/diffseg_speed.py                      # both, on the best device; JSON to benchmarks/results/
    python benchmarks/diffseg_speed.py --which tiny --iters 10

Measures one 1-shot episode per iteration: ``predict`` (inference: MoVQ + CLIP encodes, the UNet pass with map
capture and SCM, PAM, MoVQ decode) and ``train_step`` (training_loss + backward + SGD step, PAM and SCM only), each
after one warm-up iteration. The real-architecture run builds the Kandinsky 2.2 decoder UNet (1.2B) and MoVQ from
the configs written below with random weights; the CLIP ViT-bigG/14 image encoder (1.8B) is built only with
``--real-clip`` (otherwise a small CLIP vision model with Kandinsky's 1280-d projection stands in and the JSON says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import lightning
import torch
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from fsseg.episode import fake_batch
from fsseg.models.diffseg import DiffSegModule
from fsseg.models.diffseg.loading import FrozenParts
from fsseg.models.diffseg.tiny import save_tiny_components

# kandinsky-community/kandinsky-2-2-decoder: unet/config.json and movq/config.json (architecture fields)
KANDINSKY_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=8,
    layers_per_block=3,
    block_out_channels=(384, 768, 1152, 1536),
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=64,
    cross_attention_dim=768,
    cross_attention_norm="group_norm",
    encoder_hid_dim=1280,
    encoder_hid_dim_type="image_proj",
    addition_embed_type="image",
    addition_embed_type_num_heads=64,
    resnet_time_scale_shift="scale_shift",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
KANDINSKY_MOVQ = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
    norm_num_groups=32,
    norm_type="spatial",
    num_vq_embeddings=16384,
    vq_embed_dim=4,
    sample_size=32,
)
# kandinsky-community/kandinsky-2-2-prior: image_encoder (CLIP ViT-bigG/14 vision tower + 1280-d projection)
KANDINSKY_CLIP = dict(
    hidden_size=1664,
    intermediate_size=8192,
    num_hidden_layers=48,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1280,
    hidden_act="gelu",
)
SMALL_CLIP = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
    projection_dim=1280,
)


class RandomKandinskyDiffSeg(DiffSegModule):
    """DiffSeg on the Kandinsky 2.2 architecture with random weights (nothing downloaded)."""

    real_clip = False

    def load_frozen_parts(self, decoder: str, prior: str) -> FrozenParts:
        torch.manual_seed(0)
        unet, movq = UNet2DConditionModel(**KANDINSKY_UNET), VQModel(**KANDINSKY_MOVQ)
        clip = CLIPVisionModelWithProjection(
            CLIPVisionConfig(**(KANDINSKY_CLIP if self.real_clip else SMALL_CLIP))
        )
        for m in (unet, movq, clip):
            m.requires_grad_(False).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        return FrozenParts(unet, movq, DDPMScheduler(), clip, processor)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters: int, device) -> dict:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"iters": iters, "mean_s": statistics.mean(times), "min_s": min(times)}


def bench(model: DiffSegModule, size: int, iters: int, device, train: bool) -> dict:
    model.to(device)
    batch = fake_batch(1, 1, size, device=device)
    out = {}
    model.eval()
    with torch.no_grad():
        out["predict"] = timed(lambda: model.predict_masks(batch, (size, size)), iters, device)
    if train:
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            model.training_loss(batch)["loss"].backward()
            opt.step()

        out["train_step"] = timed(step, iters, device)
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["trainable_params"] = sum(p.numel() for p in model.trainable_parameters())
    out["frozen_unet_params"] = sum(p.numel() for p in model.pipeline.unet.parameters())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="DiffSeg speed benchmark")
    p.add_argument("--which", choices=("tiny", "real", "both"), default="both")
    p.add_argument(
        "--iters", type=int, default=None, help="timed iterations (default: tiny 5, real 1 on CPU / 5 on GPU)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    p.add_argument(
        "--real-train", action="store_true", help="also time a real-architecture training step on CPU"
    )
    p.add_argument(
        "--real-clip", action="store_true", help="build the real CLIP ViT-bigG/14 (1.8B) for the real run"
    )
    p.add_argument("--tiny-assets", default="fsseg/assets/tiny-diffseg")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },
        "episode": "1-shot, batch 1",
        "runs": {},
    }
    common = dict(edge_source="sobel", noise_query=False)
    if args.which in ("tiny", "both"):
        assets = Path(args.tiny_assets)
        if not (assets / "decoder").is_dir():
            assets = save_tiny_components(Path(tempfile.mkdtemp()) / "tiny", seed=0)
        model = DiffSegModule(
            decoder=str(assets / "decoder"),
            prior=str(assets / "prior"),
            pam_dim=32,
            scm_width=32,
            scm_edge_channels=16,
            **common,
        )
        results["runs"]["tiny_128px"] = {
            "assets": str(assets),
            **bench(model, 128, args.iters or 5, device, not args.no_train),
        }
        print(json.dumps(results["runs"]["tiny_128px"], indent=2))
    if args.which in ("real", "both"):
        RandomKandinskyDiffSeg.real_clip = args.real_clip
        model = RandomKandinskyDiffSeg(decoder="random", prior="random", **common)
        train = not args.no_train and (device.type == "cuda" or args.real_train)
        iters = args.iters or (5 if device.type == "cuda" else 1)
        run = bench(model, 512, iters, device, train)
        run["clip"] = "ViT-bigG/14 (random)" if args.real_clip else "small stand-in with a 1280-d projection"
        run["edge_source"] = "sobel (HED costs one VGG16 pass more)"
        results["runs"]["kandinsky22_random_512px"] = run
        print(json.dumps(run, indent=2))
    out = Path(args.out or f"benchmarks/results/diffseg_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    main()
