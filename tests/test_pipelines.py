"""Each method's pipeline without Lightning: built from its components, the support encoded once (a typed state), any
number of queries segmented against it, and the same masks as the method's LightningModule."""

from __future__ import annotations

import pytest
import torch

from fsseg.episode import fake_batch
from fsseg.models.baseline import PrototypeModule, PrototypePipeline
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.pipeline import DiffewsPipeline
from fsseg.models.diffews.settings import DiffewsSettings
from fsseg.models.diffews.support import LatentSupport, TokenSupport
from fsseg.models.diffews.tiny import tiny_image_encoder, write_tiny_sd
from fsseg.models.diffseg import DiffSegModule
from fsseg.models.diffseg.loading import load_frozen_parts
from fsseg.models.diffseg.pipeline import DiffSegPipeline, DiffSegSupport
from fsseg.models.diffseg.settings import DiffSegSettings
from fsseg.models.diffseg.tiny import save_tiny_components


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipelines")
    tiny_image_encoder(seed=3).save_pretrained(base / "clip")
    return str(write_tiny_sd(base / "sd", seed=0)), str(base / "clip")


def _same_as_module(pipe, module, size: int):
    """The pipeline with the module's weights segments three queries as the module's support hooks do; returns the
    pipeline's support state."""
    pipe.load_state_dict(module.pipeline.state_dict())
    pipe.eval()
    module.eval()
    ep = fake_batch(1, 2, size, seed=5)
    queries = fake_batch(3, 1, size, seed=6)["query_img"]
    with torch.no_grad():
        support = pipe.encode_support(ep["support_imgs"], ep["support_masks"])  # once, for every query
        masks = pipe.segment(support, queries, (20, 24))
        state = module.encode_support(ep["support_imgs"][0], ep["support_masks"][0])
        assert torch.equal(masks, module.predict_with_support(state, queries, (20, 24)))
    assert masks.shape == (3, 20, 24) and masks.dtype == torch.long and set(masks.unique().tolist()) <= {0, 1}
    return support


@pytest.mark.parametrize("interaction", ["fsa", "tca"])
def test_diffews_pipeline(sd_dirs, interaction):
    torch.manual_seed(0)
    settings = DiffewsSettings(interaction=interaction)
    pipe = DiffewsPipeline.from_pretrained(sd_dirs[0], settings, image_encoder=sd_dirs[1])
    module = DiffewsModule(pretrained=sd_dirs[0], interaction=interaction, image_encoder=sd_dirs[1])
    support = _same_as_module(pipe, module, 32)
    if interaction == "fsa":  # the support's K/V at t = 1 (oi2m), every attn1 layer, kept with it
        assert isinstance(support, LatentSupport) and list(support.banks) == [1]
        assert len(support.banks[1]) == pipe.n_fusion_layers == 6
    else:
        assert isinstance(support, TokenSupport) and support.tokens.shape[0] == 1
    with pytest.raises(ValueError, match="interaction='nope'"):
        DiffewsPipeline.from_pretrained(sd_dirs[0], DiffewsSettings(interaction="nope"))
    assert pipe.codec.batch == 0  # one VAE call per step's images unless vae_batch says otherwise
    assert DiffewsModule(pretrained=sd_dirs[0], vae_batch=1).pipeline.codec.batch == 1
    with pytest.raises(ValueError, match="vae_batch must be >= 0"):
        DiffewsSettings(vae_batch=-1).check()


def test_diffseg_pipeline(tmp_path):
    kandinsky = save_tiny_components(tmp_path, seed=0)
    parts = load_frozen_parts(str(kandinsky / "decoder"), str(kandinsky / "prior"))
    torch.manual_seed(0)
    pipe = DiffSegPipeline(parts, DiffSegSettings(edge_source="sobel", scm_zero_init=False))
    module = DiffSegModule(
        decoder=str(kandinsky / "decoder"), prior=str(kandinsky / "prior"), edge_source="sobel"
    )
    support = _same_as_module(pipe, module, 64)
    assert isinstance(support, DiffSegSupport) and support.latent.shape[0] == support.embedding.shape[0] == 1


def test_prototype_pipeline():
    torch.manual_seed(0)
    pipe = PrototypePipeline(out_indices=(1,), embed_dim=8)
    support = _same_as_module(pipe, PrototypeModule(out_indices=(1,), embed_dim=8), 32)
    assert support.shape == (1, 2, 8)  # background and foreground prototypes
