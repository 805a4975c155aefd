"""Does a tiny stand-in's *frozen* UNet carry correspondence between objects of the same held-out class?

    python tools/standin_correspondence.py fsseg/assets/tiny-diffews [--episodes 500] [--out sd.json]
    python tools/standin_correspondence.py fsseg/assets/tiny-diffseg [--episodes 500] [--out kandinsky.json]

On the embedded benchmark (fold ``--fold``, 1-shot, test episodes at 128 px; nothing is trained):

SD layout (``unet/``, ``vae/``, ...): for every UNet block output (``down0`` .. ``mid`` .. ``up1``) and
``--timesteps`` (VAE latents noised to t, one UNet pass with the empty prompt, as DIFT):

- ``nn``: for each query foreground cell, whether its nearest support cell (cosine) lies on the support's object,
  with the episode's own support (higher is better; chance = the support's foreground share) and with another
  class's support (the rate of false matches);
- ``auc``: the per-episode ROC AUC of the cosine similarity to the support prototype for the query mask, own /
  other-class support;
- ``miou``: the training-free matcher (`fsseg.models.dift.DiftPipeline`, prototype similarity) at each threshold,
  own / other.
  The setting (timestep, layer, threshold) is *selected* on ``--select-fold``'s test episodes, whose classes the
  stand-in was pretrained on, and then reported on ``--fold`` by running `DiftPipeline` itself; the best fold-0
  setting is printed too, marked as chosen on the test episodes;
- ``probe``: what the up-block features encode, on the objects of the benchmark's val images: nearest-neighbour
  retrieval of each held-out-class object among all other objects (share of neighbours with the same class /
  colour / texture / shape, against chance), linear probes of colour, texture and shape trained on the training
  classes' objects and tested on the held-out ones, and the R^2 of a linear read-out of a cell's position. Raw RGB
  and the VAE latent are the references.

Kandinsky layout (``decoder/``, ``prior/``): DiffSeg's frozen attention prior ``M_a`` (its own code:
`DiffSegPipeline.encode_support` + `unet_prior`, SCM off, at ``--diffseg-size`` px and ``--diffseg-timestep``), the
per-episode ROC AUC of ``M_a`` for the query mask with the own, another class's and an empty support; the same for
the prompt (cross-attention) mass alone per map size, captured by the pipeline's own `UNetContext` with a
`MapRequest` for every attention layer; and the spread of the CLIP prompt embeddings.

``--root``: the benchmark folder (default: the embedded benchmark where `FewShotDataModule` puts it). Prints a table
and, with ``--out``, writes everything as JSON with the device, threads and library versions (refused if it
exists, unless ``--overwrite``; written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fsseg.data.datamodule import FewShotDataModule
from fsseg.data.embedded import EMBEDDED_CLASS_NAMES, fold_classes
from fsseg.files import atomic_write_text, check_output_file
from fsseg.metrics.fss_iou import FewShotIoU
from fsseg.models.dift.pipeline import DiftPipeline, unet_blocks, unet_layer_features
from fsseg.plan.cli import versions

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5 .. 0.95
ATTRIBUTES = ("colour", "texture", "shape")
CONTROLS = ("none", "other_class", "empty_mask")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- shared ---------------------------------------------------------------------------------------------------
def load_episodes(
    fold: int, n: int, control: str, img_size: int, shot: int = 1, root: Path | None = None
) -> dict:
    """``n`` test episodes of ``fold`` under ``control``, stacked: images in [0, 1], masks {0, 1, 255}; ``root``:
    the benchmark folder (None: the data module's default)."""
    dm = FewShotDataModule(
        root=None if root is None else str(root),
        benchmark="embedded",
        fold=fold,
        shot=shot,
        img_size=img_size,
        test_episodes=n,
        support_control=control,
    )
    dm.prepare_data()
    dm.setup("test")
    ds = dm.datasets["test"]
    items = [ds[i] for i in range(n)]
    keys = ("query_img", "query_mask", "support_imgs", "support_masks", "class_id")
    out = {k: torch.stack([it[k] for it in items]) for k in keys}
    out["query_name"] = [it["query_name"] for it in items]
    out["root"] = ds.root
    out["class_ids"] = ds.class_ids()
    return out


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """ROC AUC of ``score`` for the boolean ``positive`` (1-d), ties counted half; None without both labels."""
    score, positive = score.double().flatten(), positive.flatten()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = score.argsort()
    ranks = torch.empty_like(score)
    sorted_scores = score[order]
    # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_auc(scores: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean per-episode AUC of ``scores`` [B, H, W] for ``masks`` [B, H, W] (255 ignored; episodes without
    foreground or background skipped)."""
    aucs = []
    for s, m in zip(scores, masks):
        valid = m != 255
        a = roc_auc(s[valid], m[valid] == 1)
        if a is not None:
            aucs.append(a)
    return float(np.mean(aucs))


def miou(pred: torch.Tensor, eps: dict) -> float:
    """The benchmark's mIoU of predictions ``pred`` [B, H, W] on the episodes ``eps``."""
    metric = FewShotIoU(eps["class_ids"])
    metric.update(pred, eps["query_mask"], eps["class_id"])
    return float(metric.compute()["miou"])


# ---- SD stand-in ------------------------------------------------------------------------------------------------
class FrozenSD:
    """The parts of an SD-layout folder the matcher uses: VAE, UNet, scheduler and the empty prompt (77 tokens)."""

    def __init__(self, folder: Path) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True).eval()
        self.unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", local_files_only=True
        ).eval()
        self.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True).eval()
        ids = tok(
            "", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            self.prompt = text(ids)[0]  # [1, 77, D]
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.layers = list(unet_blocks(self.unet))

    @torch.no_grad()
    def encode(self, images01: torch.Tensor, batch: int = 50) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> scaled posterior-mean latents [N, 4, S/f, S/f]."""
        return torch.cat(
            [
                self.vae.encode(images01[i : i + batch] * 2 - 1).latent_dist.mean * self.scaling_factor
                for i in range(0, len(images01), batch)
            ]
        )

    def features(self, latents: torch.Tensor, t: int, batch: int = 50, seed: int = 0) -> dict:
        """Every block's output, {layer: [N, C, h, w]}; batch ``i`` draws its noise from ``seed + i``."""
        out: dict[str, list[torch.Tensor]] = {}
        for j, i in enumerate(range(0, len(latents), batch)):
            f = unet_layer_features(
                self.unet, self.scheduler, latents[i : i + batch], self.prompt, t, self.layers, seed + j
            )
            for k, v in f.items():
                out.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in out.items()}


def similarity_maps(q: torch.Tensor, s: torch.Tensor, support_masks: torch.Tensor, size: int) -> torch.Tensor:
    """Cosine similarity of query cells to the masked support prototype, resized to ``size``: [B, size, size]
    (the prototype scoring of `DiftPipeline` before normalisation)."""
    w = F.adaptive_avg_pool2d((support_masks == 1).float()[:, None], q.shape[-2:])  # [B, 1, h, w]
    proto = (s * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-6)  # [B, C]
    sim = torch.einsum("bchw,bc->bhw", F.normalize(q, dim=1), F.normalize(proto, dim=1))[:, None]
    return F.interpolate(sim, size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.flatten(1).min(dim=1).values[:, None, None]
    hi = x.flatten(1).max(dim=1).values[:, None, None]
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def nn_on_object(q: torch.Tensor, s: torch.Tensor, query_masks, support_masks) -> tuple[float, float]:
    """Share of query-foreground cells whose nearest support cell (cosine) is support foreground, and the chance
    rate (the support's foreground share), averaged over episodes with a foreground cell."""
    h = q.shape[-2:]
    qfg = F.adaptive_avg_pool2d((query_masks == 1).float()[:, None], h)[:, 0] > 0.5  # [B, h, w]
    sfg = F.adaptive_avg_pool2d((support_masks == 1).float()[:, None], h)[:, 0] > 0.5
    qn, sn = F.normalize(q, dim=1).flatten(2), F.normalize(s, dim=1).flatten(2)  # [B, C, hw]
    hits, chance = [], []
    for i in range(q.shape[0]):
        cells = qfg[i].flatten()
        if not cells.any():
            continue
        nearest = (qn[i][:, cells].T @ sn[i]).argmax(dim=1)  # [n_fg]
        on = sfg[i].flatten()
        hits.append(float(on[nearest].float().mean()))
        chance.append(float(on.float().mean()))
    return float(np.mean(hits)), float(np.mean(chance))


def layer_table(sd: FrozenSD, eps: dict, other: dict, timesteps: list[int], with_nn: bool) -> dict:
    """{t: {layer: {nn, auc, miou}}} for own and other-class supports (one fold's episodes)."""
    zq, zs, zo = (
        sd.encode(x) for x in (eps["query_img"], eps["support_imgs"][:, 0], other["support_imgs"][:, 0])
    )
    size = eps["query_mask"].shape[-1]
    table: dict = {}
    for t in timesteps:
        t0 = time.perf_counter()
        fq, fs, fo = sd.features(zq, t), sd.features(zs, t, seed=1000), sd.features(zo, t, seed=2000)
        for layer in sd.layers:
            row: dict = {"shape": list(fq[layer].shape[1:])}
            for name, feats, ep in (("own", fs, eps), ("other", fo, other)):
                sm = ep["support_masks"][:, 0]
                sim = similarity_maps(fq[layer], feats[layer], sm, size)
                score = minmax(sim)
                row[f"auc_{name}"] = mean_auc(sim, eps["query_mask"])
                row[f"miou_{name}"] = {str(th): miou((score > th).long(), eps) for th in THRESHOLDS}
                if with_nn:
                    row[f"nn_{name}"], row[f"nn_chance_{name}"] = nn_on_object(
                        fq[layer], feats[layer], eps["query_mask"], sm
                    )
            table.setdefault(str(t), {})[layer] = row
        log(f"  t={t}: {time.perf_counter() - t0:.0f}s")
    return table


def best_setting(table: dict) -> tuple[int, str, float, float]:
    """(t, layer, threshold, own mIoU) with the highest own-support mIoU."""
    return max(
        (
            (int(t), layer, float(th), v)
            for t, rows in table.items()
            for layer, row in rows.items()
            for th, v in row["miou_own"].items()
        ),
        key=lambda x: x[3],
    )


@torch.no_grad()
def run_matcher(sd: FrozenSD, eps: dict, t: int, layer: str, threshold: float, batch: int = 25) -> float:
    """mIoU of `DiftPipeline` itself on the episodes (batches of ``batch``; batch ``i`` uses noise seed ``i``)."""
    preds = []
    size = tuple(eps["query_mask"].shape[-2:])
    for j, i in enumerate(range(0, len(eps["class_id"]), batch)):
        pipe = DiftPipeline(sd.vae, sd.unet, sd.scheduler, sd.prompt, t, layer, "prototype", threshold, j)
        sup, masks = eps["support_imgs"][i : i + batch], eps["support_masks"][i : i + batch]
        preds.append(pipe.segment_episodes(eps["query_img"][i : i + batch], sup, masks, size))
    return miou(torch.cat(preds), eps)


# ---- what the features encode -----------------------------------------------------------------------------------
def val_objects(
    root: Path, n_images: int, min_px: int = 60
) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor]:
    """The benchmark's first ``n_images`` val images [N, 3, 128, 128], their (image, class) objects with at least
    ``min_px`` pixels, and the label maps [N, 128, 128]."""
    jpgs = sorted((root / "VOC2012" / "JPEGImages").glob("2001_*.jpg"))[:n_images]
    imgs, labels, objects = [], [], []
    for i, path in enumerate(jpgs):
        imgs.append(
            torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        )
        lab = np.asarray(Image.open(root / "VOC2012" / "SegmentationClassAug" / f"{path.stem}.png"))
        labels.append(torch.from_numpy(lab.copy()))
        objects += [(i, int(c)) for c in np.unique(lab) if c not in (0, 255) and (lab == c).sum() >= min_px]
    return torch.stack(imgs), objects, torch.stack(labels)


def pooled(feats: torch.Tensor, labels: torch.Tensor, objects) -> torch.Tensor:
    """Mean feature over each object's pixels (mask area-resized to the feature grid): [n_objects, C]."""
    out = []
    for i, c in objects:
        w = F.adaptive_avg_pool2d((labels[i] == c).float()[None, None], feats.shape[-2:])[0]  # [1, h, w]
        out.append((feats[i] * w).sum(dim=(1, 2)) / w.sum().clamp_min(1e-6))
    return torch.stack(out)


def linear_probe(x_train, y_train, x_test, n_classes: int, steps: int = 300) -> torch.Tensor:
    """Multinomial logistic regression (standardised inputs, L2 1e-3, L-BFGS); predicted test labels."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xt, xs = (x_train - mu) / sd, (x_test - mu) / sd
    lin = torch.nn.Linear(xt.shape[1], n_classes).double()
    xt, xs = xt.double(), xs.double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), y_train) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin(xs).argmax(1)


def position_r2(feats: torch.Tensor, n_train: int) -> float:
    """R^2 of a ridge read-out of each cell's (x, y) from its feature, fitted on the first ``n_train`` images and
    tested on the rest."""
    n, c, h, w = feats.shape
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    target = torch.stack([xs, ys], -1).reshape(1, h * w, 2).expand(n, -1, -1)
    x = feats.permute(0, 2, 3, 1).reshape(n, h * w, c).double()
    xa = torch.cat([x, torch.ones(n, h * w, 1, dtype=x.dtype)], -1)
    a, b = xa[:n_train].reshape(-1, c + 1), target[:n_train].reshape(-1, 2).double()
    coef = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(c + 1, dtype=a.dtype), a.T @ b)
    pred = xa[n_train:].reshape(-1, c + 1) @ coef
    true = target[n_train:].reshape(-1, 2).double()
    return float(1 - ((pred - true) ** 2).sum() / ((true - true.mean(0)) ** 2).sum())


def attribute_probe(feats: torch.Tensor, labels: torch.Tensor, objects, held_out: list[int]) -> dict:
    """What object-pooled features ``feats`` [N, C, h, w] encode (see the module docstring)."""
    x = pooled(feats, labels, objects)
    cls = torch.tensor([c for _, c in objects])
    img = torch.tensor([i for i, _ in objects])
    attrs = {
        a: [EMBEDDED_CLASS_NAMES[c - 1].split("-")[j] for c in cls.tolist()] for j, a in enumerate(ATTRIBUTES)
    }
    test = torch.tensor([c in held_out for c in cls.tolist()])
    xn = F.normalize(x, dim=1)
    sim = xn @ xn.T
    sim[img[:, None] == img[None, :]] = -2  # neighbours from other images only
    nearest = sim.argmax(1)
    out: dict = {"objects": int(test.sum())}
    same = {"class": cls[nearest] == cls, **{a: _same(attrs[a], nearest) for a in ATTRIBUTES}}
    for k, v in same.items():
        out[f"nn_same_{k}"] = float(v[test].float().mean())
    for a in ATTRIBUTES:
        values = sorted(set(attrs[a]))
        y = torch.tensor([values.index(v) for v in attrs[a]])
        pred = linear_probe(x[~test], y[~test], x[test], len(values))
        out[f"probe_{a}"] = float((pred == y[test]).float().mean())
    out["position_r2"] = position_r2(feats, len(feats) // 2)
    return out


def _same(values: list[str], nearest: torch.Tensor) -> torch.Tensor:
    return torch.tensor([values[j] == v for v, j in zip(values, nearest.tolist())])


def chance_rates(objects, held_out: list[int]) -> dict:
    """How often a random object of another image shares class / each attribute with a held-out object."""
    cls = [c for _, c in objects]
    names = [EMBEDDED_CLASS_NAMES[c - 1].split("-") for c in cls]
    out = {}
    test = [i for i, c in enumerate(cls) if c in held_out]
    out["class"] = float(
        np.mean([np.mean([cls[j] == cls[i] for j in range(len(cls)) if j != i]) for i in test])
    )
    for k, a in enumerate(ATTRIBUTES):
        out[a] = float(
            np.mean([np.mean([names[j][k] == names[i][k] for j in range(len(cls)) if j != i]) for i in test])
        )
    return out


def probe_table(sd: FrozenSD, root: Path, n_images: int, t: int, held_out: list[int]) -> dict:
    imgs, objects, labels = val_objects(root, n_images)
    z = sd.encode(imgs)
    feats = sd.features(z, t)
    feats["latent"] = z
    feats["rgb"] = F.interpolate(imgs, size=z.shape[-2:], mode="area")
    out = {"chance": chance_rates(objects, held_out), "timestep": t}
    for name, f in feats.items():
        out[name] = attribute_probe(f, labels, objects, held_out)
    return out


def sd_report(folder: Path, args) -> dict:
    sd = FrozenSD(folder)
    res: dict = {"stand_in": str(folder), "kind": "sd", "fold": args.fold, "episodes": args.episodes,
                 "select_fold": args.select_fold, "select_episodes": args.select_episodes}  # fmt: skip
    log(f"selection episodes: fold {args.select_fold}, {args.select_episodes}")
    sel = load_episodes(args.select_fold, args.select_episodes, "none", 128, root=args.root)
    sel_other = load_episodes(args.select_fold, args.select_episodes, "other_class", 128, root=args.root)
    res["selection_table"] = layer_table(sd, sel, sel_other, args.timesteps, with_nn=False)
    t, layer, th, sel_miou = best_setting(res["selection_table"])
    res["selected"] = {"timestep": t, "layer": layer, "threshold": th, "selection_miou": sel_miou}
    log(
        f"selected on fold {args.select_fold} (training classes): t={t} {layer} threshold {th} ({sel_miou:.1f})"
    )
    log(f"test episodes: fold {args.fold}, {args.episodes}")
    eps = load_episodes(args.fold, args.episodes, "none", 128, root=args.root)
    other = load_episodes(args.fold, args.episodes, "other_class", 128, root=args.root)
    if eps["query_name"] != other["query_name"]:
        raise RuntimeError("other-class episodes do not keep the protocol's queries")
    res["table"] = layer_table(sd, eps, other, args.timesteps, with_nn=True)
    res["matcher"] = {
        "own": run_matcher(sd, eps, t, layer, th),
        "other_class": run_matcher(sd, other, t, layer, th),
        **res["selected"],
    }
    bt, bl, bth, bv = best_setting(res["table"])
    res["best_on_test"] = {"timestep": bt, "layer": bl, "threshold": bth, "miou_own": bv,
                           "miou_other": res["table"][str(bt)][bl]["miou_other"][str(bth)]}  # fmt: skip
    if args.probe_images:
        res["probe"] = probe_table(sd, eps["root"], args.probe_images, t, fold_classes(args.fold))
    return res


def print_sd(res: dict) -> None:
    log(
        f"\n{res['stand_in']}: fold {res['fold']}, {res['episodes']} test episodes (own / other-class support)"
    )
    log(f"{'t':>4} {'layer':<6} {'shape':<13} {'NN on object':<20} {'proto AUC':<14} best-threshold mIoU")
    for t, rows in res["table"].items():
        for layer, r in rows.items():
            th = max(r["miou_own"], key=r["miou_own"].get)
            log(
                f"{t:>4} {layer:<6} {str(tuple(r['shape'])):<13} {r['nn_own']:.3f}/{r['nn_other']:.3f} "
                f"(ch {r['nn_chance_own']:.3f}) {r['auc_own']:.3f}/{r['auc_other']:.3f} "
                f"{r['miou_own'][th]:5.1f}/{r['miou_other'][th]:5.1f} at {th}"
            )
    m, b = res["matcher"], res["best_on_test"]
    log(
        f"DiftPipeline (`fsseg.models.dift`), setting chosen on fold {res['select_fold']}'s episodes, "
        f"training classes (t={m['timestep']}, {m['layer']}, threshold {m['threshold']}): own {m['own']:.1f}, "
        f"other-class {m['other_class']:.1f}"
    )
    log(
        f"(best on these test episodes: t={b['timestep']}, {b['layer']}, {b['threshold']}: "
        f"{b['miou_own']:.1f} / {b['miou_other']:.1f})"
    )
    if "probe" in res:
        p = res["probe"]
        ch = p["chance"]
        log(
            f"\nwhat the features encode (held-out objects of val images, t={p['timestep']}): nearest neighbour "
            f"shares class/colour/texture/shape (chance {ch['class']:.2f}/{ch['colour']:.2f}/{ch['texture']:.2f}/"
            f"{ch['shape']:.2f}); linear probe accuracy trained on training classes; position R^2"
        )
        for name, r in p.items():
            if name in ("chance", "timestep"):
                continue
            log(
                f"  {name:<7} NN {r['nn_same_class']:.2f}/{r['nn_same_colour']:.2f}/{r['nn_same_texture']:.2f}/"
                f"{r['nn_same_shape']:.2f}  probe colour {r['probe_colour']:.2f} texture {r['probe_texture']:.2f} "
                f"shape {r['probe_shape']:.2f}  position R^2 {r['position_r2']:.2f}"
            )


# ---- Kandinsky stand-in ---------------------------------------------------------------------------------------
def kandinsky_report(folder: Path, args) -> dict:
    from fsseg.models.diffseg.capture import MapRequest, maps_by_size
    from fsseg.models.diffseg.module import DiffSegModule
    from fsseg.models.latent import UNetCall

    module = DiffSegModule(
        decoder=str(folder / "decoder"), prior=str(folder / "prior"), edge_source="sobel", use_scm=False,
        timestep=args.diffseg_timestep,
    ).eval()  # fmt: skip
    pipe = module.pipeline
    res: dict = {"stand_in": str(folder), "kind": "kandinsky", "fold": args.fold, "episodes": args.episodes,
                 "size": args.diffseg_size, "timestep": args.diffseg_timestep, "auc": {}, "cross_auc": {}}  # fmt: skip
    size = args.diffseg_size
    embeds = {}
    for control in CONTROLS:
        eps = load_episodes(args.fold, args.episodes, control, size, root=args.root)
        m_a, cross, emb = [], {}, []
        with torch.no_grad():
            for i in range(0, args.episodes, 50):
                query = eps["query_img"][i : i + 50]  # [B, 3, S, S]
                support = pipe.encode_support(
                    eps["support_imgs"][i : i + 50], eps["support_masks"][i : i + 50]
                )
                lq = pipe.codec.encode(query)  # [B, C, h, w]
                ma, _ = pipe.unet_prior(lq, support.embedding, query)  # [B, 1, s, s]: the model's own M_a
                m_a.append(F.interpolate(ma, size=size, mode="bilinear", align_corners=False)[:, 0])
                emb.append(support.embedding)
                # a second pass on the same input (noise_query off), every layer's maps captured: prompt mass per size
                t = torch.full((lq.shape[0],), pipe.settings.timestep, dtype=torch.long)
                _, record = pipe.context(
                    UNetCall(attention=MapRequest()), lq, t, encoder_hidden_states=None,
                    added_cond_kwargs={"image_embeds": support.embedding},
                )  # fmt: skip
                for s, maps in maps_by_size(record.attention)[1].items():
                    mass = torch.stack(maps).mean(0).view(-1, 1, *s)  # [B, 1, h_s, w_s]
                    up = F.interpolate(mass, size=size, mode="bilinear", align_corners=False)[:, 0]
                    cross.setdefault(f"{s[0]}x{s[1]}", []).append(up)
        res["auc"][control] = mean_auc(torch.cat(m_a), eps["query_mask"])
        res["cross_auc"][control] = {k: mean_auc(torch.cat(v), eps["query_mask"]) for k, v in cross.items()}
        embeds[control] = F.normalize(torch.cat(emb), dim=1)
        log(f"  {control}: M_a AUC {res['auc'][control]:.3f}")
    own = embeds["none"]
    res["prompt_cosine"] = {
        "own_vs_other_class": float((own * embeds["other_class"]).sum(1).mean()),
        "own_vs_empty": float((own * embeds["empty_mask"]).sum(1).mean()),
        "own_vs_another_episode": float((own * own.roll(1, 0)).sum(1).mean()),
    }
    return res


def print_kandinsky(res: dict) -> None:
    log(
        f"\n{res['stand_in']}: DiffSeg's frozen M_a at {res['size']} px, t={res['timestep']}, fold {res['fold']}, "
        f"{res['episodes']} test episodes: per-episode AUC for the query mask"
    )
    a = res["auc"]
    log(
        f"  M_a: own {a['none']:.3f}, other-class {a['other_class']:.3f}, empty {a['empty_mask']:.3f} "
        f"(own - other {a['none'] - a['other_class']:+.3f})"
    )
    for size in res["cross_auc"]["none"]:
        log(
            "  cross-attention mass at "
            + size
            + ": "
            + ", ".join(f"{c} {res['cross_auc'][c][size]:.3f}" for c in CONTROLS)
        )
    c = res["prompt_cosine"]
    log(
        f"  CLIP prompt cosine: own vs other-class {c['own_vs_other_class']:.3f}, own vs empty "
        f"{c['own_vs_empty']:.3f}, two episodes' own {c['own_vs_another_episode']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/standin_correspondence.py", description=__doc__.split("\n\n")[0])
    p.add_argument("stand_in", type=Path, help="an SD-layout or Kandinsky-layout stand-in folder")
    p.add_argument(
        "--root", type=Path, help="benchmark folder (default: the embedded benchmark's usual place)"
    )
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--episodes", type=int, default=500, help="test episodes")
    p.add_argument("--timesteps", default="0,50,150,261", help="SD: comma-separated timesteps")
    p.add_argument(
        "--select-fold", type=int, default=1, help="SD: fold whose test episodes choose the setting"
    )
    p.add_argument("--select-episodes", type=int, default=200)
    p.add_argument("--probe-images", type=int, default=300, help="SD: val images for the probes (0: none)")
    p.add_argument("--diffseg-size", type=int, default=64, help="Kandinsky: model input side (demo: 64)")
    p.add_argument("--diffseg-timestep", type=int, default=100, help="Kandinsky: UNet timestep (demo: 100)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    try:
        args.timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        p.error(f"--timesteps: expected comma-separated integers, got {args.timesteps!r}")
    if args.episodes < 1 or args.select_episodes < 1:
        p.error("--episodes and --select-episodes must be >= 1")
    if args.fold == args.select_fold:
        p.error(
            "--select-fold must differ from --fold (the setting is chosen on classes the stand-in has seen)"
        )
    torch.set_num_threads(args.threads)
    folder = args.stand_in
    try:
        if args.out and not args.overwrite:
            check_output_file(args.out, overwrite=False)
        if (folder / "unet").is_dir() and (folder / "vae").is_dir():
            res = sd_report(folder, args)
            print_sd(res)
        elif (folder / "decoder").is_dir() and (folder / "prior").is_dir():
            res = kandinsky_report(folder, args)
            print_kandinsky(res)
        else:
            raise ValueError(
                f"{folder} is neither an SD-layout (unet/, vae/) nor a Kandinsky-layout (decoder/, prior/) folder"
            )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"standin_correspondence: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        res = {**res, "command": ["tools/standin_correspondence.py", *(sys.argv[1:] if argv is None else argv)],
               "device": f"cpu ({platform.processor() or platform.machine()})", "threads": torch.get_num_threads(),
               "versions": versions()}  # fmt: skip
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
        log(f"standin_correspondence: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
