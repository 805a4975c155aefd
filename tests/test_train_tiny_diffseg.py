"""tools/train_tiny_diffseg.py's pieces on a small corpus of fold 0's training classes: the contrastive loss of the
CLIP stage, the prompted-object targets of the UNet stage, and the image-to-time embedding switch."""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest
import torch

from fsseg.data.corpus import corpus_tensors, training_classes
from fsseg.data.embedded import fold_classes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool() -> dict:
    return runpy.run_path(str(ROOT / "tools" / "train_tiny_diffseg.py"))


@pytest.fixture(scope="module")
def corpus(tool):
    images, labels = corpus_tensors(training_classes(0), 24, 64, seed=0)
    pairs, by_class = tool["index_objects"](labels, 16)
    return images, labels, pairs, by_class


def test_supcon_loss_is_lower_when_embeddings_cluster_by_label(tool):
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    centres = torch.eye(3)[y]  # [6, 3]: each label its own direction
    clustered = tool["supcon_loss"](centres + 0.01 * torch.randn(6, 3), y, 0.1)
    mixed = tool["supcon_loss"](centres[torch.tensor([0, 2, 4, 1, 3, 5])], y, 0.1)
    assert float(clustered) < 0.01 < 1.0 < float(mixed)
    # all embeddings alike: every other sample is equally likely, -log(1/5)
    flat = tool["supcon_loss"](torch.ones(6, 3), y, 0.1)
    assert abs(float(flat) - torch.log(torch.tensor(5.0)).item()) < 1e-5


def test_pseudo_classes_split_colours_but_not_white(tool):
    names = ("white-checkered-square", "red-plain-triangle")  # classes 8 and 9
    assert [tool["EMBEDDED_CLASS_NAMES"][c - 1] for c in (8, 9)] == list(names)
    assert len({tool["pseudo_class"](8, p) for p in range(6)}) == 1
    assert len({tool["pseudo_class"](9, p) for p in range(6)}) == 6
    assert tool["pseudo_class"](9, 0) != tool["pseudo_class"](8, 0)


@pytest.mark.parametrize("kind", ["full", "drop", "absent", "same", "other_instance"])
def test_prompted_targets_keep_only_the_prompted_class(tool, corpus, kind):
    images, labels, pairs, by_class = corpus
    only = {k: 0.0 for k in ("full", "drop", "absent", "same")}
    if kind != "other_instance":
        only[kind] = 1.0
    gen = torch.Generator().manual_seed(0)
    for i in range(len(images)):
        got, prompt, target = tool["prompted_target"](i, images, labels, pairs, by_class, only, gen)
        present = set(labels[i].unique().tolist()) - {0, 255}
        assert got == kind or (got == "drop" and not present & set(by_class))
        if got in ("drop", "absent"):
            assert not target.any()
        if got == "drop":
            assert not prompt.any()
        if got == "full":
            assert torch.equal(prompt, images[i]) and torch.equal(target, images[i])
        if got in ("same", "other_instance", "absent"):
            # the prompt is one class's object: its pixels are those of one class of some corpus image
            shown = [c for c in by_class if any(torch.equal(prompt, images[j] * (labels[j] == c)) for j in
                     range(len(images)))]  # fmt: skip
            assert shown and not set(shown) & set(fold_classes(0))
            if got == "absent":
                assert not set(shown) & present
            else:
                (c,) = [c for c in shown if c in present][:1] or [None]
                assert c is not None and torch.equal(target, images[i] * (labels[i] == c))
                assert (target.sum(0) > 0).any() and not target[:, labels[i] != c].any()
        if got == "same":
            assert torch.equal(prompt, target)


def test_unet_switches_keep_the_image_time_embedding_and_prompt_values_zero(tool, corpus):
    images, labels, pairs, by_class = corpus
    movq = tool["tiny_movq"](0).eval().requires_grad_(False)
    clip = tool["demo_clip"](64, 64, 0).eval()
    processor = tool["CLIPImageProcessor"](size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    preprocess = tool["ClipPreprocess"].from_processor(processor)
    args = argparse.Namespace(seed=0, width=32, embed_dim=64, p_full=0.2, p_drop=0.1, p_absent=0.15, p_same=0.25,
                              augment="channel_permutation", lr=1e-3, unet_steps=2, unet_minutes=5.0, batch=4,
                              object_max_t=600, no_image_time_embedding=True,
                              zero_prompt_values=True)  # fmt: skip
    unet, steps, losses = tool["train_unet"](images, labels, pairs, by_class, movq, clip, preprocess, args)
    assert steps == 2 and set(losses) == {"full", "prompted"}
    proj = unet.add_embedding.image_proj
    assert not proj.weight.any() and not proj.bias.any()
    values = [m for n, m in unet.named_modules() if n.endswith("add_v_proj")]
    assert len(values) == 10 and not any(m.weight.any() or m.bias.any() for m in values)
    args.no_image_time_embedding = args.zero_prompt_values = False
    unet, _, _ = tool["train_unet"](images, labels, pairs, by_class, movq, clip, preprocess, args)
    assert unet.add_embedding.image_proj.weight.abs().sum() > 0
    assert all(m.weight.abs().sum() > 0 for n, m in unet.named_modules() if n.endswith("add_v_proj"))
