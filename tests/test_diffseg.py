"""DiffSegModule on the tiny Kandinsky-shaped components: SCM gradients through the frozen UNet, parameter sharing,
checkpoint round trip, loss masking, K-shot averaging and loading errors."""

import shutil

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fsseg.models.diffseg import DiffSegModule
from fsseg.models.diffseg.scm import SpatialControl
from fsseg.models.diffseg.tiny import save_tiny_components

S = 64  # tiny MoVQ downsamples by 4: latent 16, attention maps at 8 / 4 / 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_components(tmp_path_factory.mktemp("tiny-diffseg"), seed=0)


def make_module(tiny_dir, *, dtype: torch.dtype = torch.float32, **kw):
    """The module on the tiny components; ``dtype=torch.float64`` where two computations that are equal in exact
    arithmetic are compared: M_a's min-max normalisation amplifies float32 rounding (which differs between CPUs'
    kernels) to ~1e-2, float64's stays below 1e-10."""
    kw.setdefault("edge_source", "sobel")
    return DiffSegModule(decoder=str(tiny_dir / "decoder"), prior=str(tiny_dir / "prior"), **kw).to(dtype)


def episode(i: int, k: int = 1) -> dict:
    g = torch.Generator().manual_seed(i)
    mask = torch.zeros(S, S, dtype=torch.long)
    mask[8:40, 16:48] = 1
    mask[0, :] = 255
    return {
        "query_img": torch.rand(3, S, S, generator=g),
        "query_mask": mask,
        "query_mask_eval": mask[::2, ::2].clone(),
        "support_imgs": torch.rand(k, 3, S, S, generator=g),
        "support_masks": mask.expand(k, S, S).clone(),
        "class_id": torch.tensor(i % 3),
        "episode_idx": torch.tensor(i),
        "query_name": f"q{i}",
        "support_names": [f"s{i}_{j}" for j in range(k)],
    }


def batch_of(n: int, k: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    batch = next(iter(DataLoader([episode(i, k) for i in range(n)], batch_size=n)))
    return {
        key: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for key, v in batch.items()
    }


def test_scm_gets_gradients_through_frozen_unet_which_stays_unchanged(tiny_dir):
    torch.manual_seed(0)
    m = make_module(tiny_dir, scm_zero_init=False)
    unet_before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    scm_before = {k: v.clone() for k, v in m.scm.state_dict().items()}
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    assert {id(p) for p in m.trainable_parameters()} == {
        id(p) for p in [*m.scm.parameters(), *m.head.parameters()]
    }
    out = m.training_loss(batch_of(2))
    out["map_loss"].backward()  # M_a depends on SCM only through the UNet's up path
    for name, p in m.scm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.unet.parameters())
    opt.step()
    for k, v in m.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    assert any(not torch.equal(v, scm_before[k]) for k, v in m.scm.state_dict().items())


def test_zero_initialised_scm_starts_as_the_plain_unet_but_learns(tiny_dir):
    torch.manual_seed(0)
    with_scm = make_module(tiny_dir)
    without = make_module(tiny_dir, use_scm=False)
    b = batch_of(2)
    with torch.no_grad():
        torch.testing.assert_close(with_scm(b)[1], without(b)[1])
    with_scm.training_loss(b)["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in with_scm.scm.out_proj.parameters())


def test_shared_versus_per_level_parameter_counts(tiny_dir):
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    shared = make_module(tiny_dir).scm
    per_level = make_module(tiny_dir, scm_shared=False).scm
    assert len(shared.cores) == 1 and len(per_level.cores) == 3
    core = count(shared.cores[0])
    assert count(per_level) - count(shared) == 2 * core
    two_levels = make_module(tiny_dir, scm_levels=[2, 3]).scm
    assert two_levels.levels == [2, 3] and count(two_levels) < count(shared)
    # the levels' channels differ, so the per-level projections differ in size
    assert shared.in_proj["1"].in_channels != shared.in_proj["3"].in_channels


def test_checkpoint_round_trip_holds_only_trainable_weights(tiny_dir, tmp_path):
    torch.manual_seed(0)
    m = make_module(tiny_dir)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, train_dataloaders=DataLoader([episode(i) for i in range(4)], batch_size=2))
    assert all(not p.requires_grad for p in m.unet.parameters())
    assert not m.unet.training and not m.movq.training  # frozen parts stay in eval mode
    path = tmp_path / "diffseg.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith(("scm.", "head.")) for k in keys)
    assert keys == {k for k, p in m.named_parameters() if p.requires_grad} | {
        k for k, _ in m.named_buffers() if k.startswith(("scm.", "head."))
    }
    assert ckpt["hyper_parameters"]["decoder"] == str(tiny_dir / "decoder")
    loaded = DiffSegModule.load_from_checkpoint(path, map_location="cpu")
    b = batch_of(2)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(b)[0], m(b)[0])
        assert torch.equal(loaded.predict_masks(b, (32, 32)), m.predict_masks(b, (32, 32)))


def test_ignore_pixels_do_not_enter_the_losses_and_count_as_support_background(tiny_dir):
    torch.manual_seed(0)
    m = make_module(tiny_dir)
    b = batch_of(2)
    base = m.training_loss(b)
    b2 = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}
    b2["query_mask"][:, 0, :] = 1  # only the ignore row changes
    assert b["query_mask"][0, 0, 0] == 255
    b_ign = {**b2, "query_mask": b["query_mask"]}
    torch.testing.assert_close(m.training_loss(b_ign)["map_loss"], base["map_loss"])
    changed = m.training_loss(b2)
    assert not torch.allclose(changed["map_loss"], base["map_loss"])
    # support: 255 behaves exactly like 0
    b3 = {**b, "support_masks": torch.where(b["support_masks"] == 255, 0, b["support_masks"])}
    with torch.no_grad():
        torch.testing.assert_close(m(b3)[0], m(b)[0])


def test_k_shot_averages_embeddings_and_latents(tiny_dir):
    # one batched encode against three separate ones: in float64 (see make_module)
    m = make_module(tiny_dir, dtype=torch.float64)
    b = batch_of(2, k=3, dtype=torch.float64)
    with torch.no_grad():
        ls, emb = m.support_inputs(b)
        singles = [
            m.support_inputs(
                {
                    **b,
                    "support_imgs": b["support_imgs"][:, j : j + 1],
                    "support_masks": b["support_masks"][:, j : j + 1],
                }
            )
            for j in range(3)
        ]
    torch.testing.assert_close(ls, torch.stack([s[0] for s in singles]).mean(0), rtol=0, atol=1e-10)
    torch.testing.assert_close(emb, torch.stack([s[1] for s in singles]).mean(0), rtol=0, atol=1e-10)


def test_shot_fusion_tokens_keeps_every_shot_and_equals_mean_for_one_shot(tiny_dir):
    torch.manual_seed(0)
    f64 = torch.float64  # the shot order changes float32 sums, which M_a's min-max normalisation amplifies
    mean = make_module(tiny_dir, dtype=f64).eval()
    tokens = make_module(tiny_dir, dtype=f64, shot_fusion="tokens").eval()
    tokens.load_state_dict(mean.state_dict())
    with torch.no_grad():  # away from the (near-zero) init, so the support matters
        for p, q in zip(mean.trainable_parameters(), tokens.trainable_parameters()):
            p.add_(0.2 * torch.randn_like(p))
            q.copy_(p)
        one, three = batch_of(2, k=1, dtype=f64), batch_of(2, k=3, dtype=f64)
        torch.testing.assert_close(tokens(one)[0], mean(one)[0], rtol=0, atol=1e-10)  # K=1: the same model
        ls, _ = tokens.support_inputs(three)
        assert ls.shape[:2] == (2, 3)  # [B, K, C, h, w]: no shot averaged away
        swapped = {
            **three,
            "support_imgs": three["support_imgs"].flip(1),
            "support_masks": three["support_masks"],
        }
        # a set of shots, not a sequence: equal up to float64 rounding (E_m's mean sums in another order, and
        # M_a's min-max normalisation amplifies it: ~1e-13 here, ~1e-2 in float32)
        torch.testing.assert_close(tokens(swapped)[0], tokens(three)[0], rtol=0, atol=1e-10)
        assert (tokens(three)[0] - mean(three)[0]).abs().max() > 0.05
    with pytest.raises(ValueError, match="shot_fusion"):
        make_module(tiny_dir, shot_fusion="sum")
    with pytest.raises(ValueError, match="pam_att1='attn'"):
        make_module(tiny_dir, shot_fusion="tokens", pam_att1="conv")


def test_prediction_shape_and_threshold(tiny_dir):
    m = make_module(tiny_dir, threshold=2.0)
    with torch.no_grad():
        pred = m.predict_masks(batch_of(2), (40, 30))
    assert (
        pred.shape == (2, 40, 30) and pred.dtype == torch.long and pred.sum() == 0
    )  # scores are within [0, 1]


def test_missing_weights_and_bad_switches_are_clear_errors(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir / "decoder" / "unet", tmp_path / "dec" / "unet")  # a local folder lacking movq/
    with pytest.raises(FileNotFoundError, match="subfolder 'movq'"):
        DiffSegModule(decoder=str(tmp_path / "dec"), prior=str(tiny_dir / "prior"), edge_source="sobel")
    with pytest.raises(FileNotFoundError, match="HED weights"):
        make_module(tiny_dir, edge_source="hed", hed_weights=str(tmp_path / "hed.safetensors"))
    with pytest.raises(ValueError, match="use_unet=False"):
        make_module(tiny_dir, use_unet=False)
    with pytest.raises(ValueError, match="scm_levels"):
        make_module(tiny_dir, scm_levels=[4])
    with pytest.raises(ValueError, match="att1"):
        make_module(tiny_dir, pam_att1="mlp")


def test_scm_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="levels"):
        SpatialControl({1: 8}, {2: 8})


def test_latent_fg_weight_only_reweights_foreground_cells(tiny_dir):
    torch.manual_seed(0)
    plain = make_module(tiny_dir)
    torch.manual_seed(0)
    weighted = make_module(tiny_dir, latent_fg_weight=3.0)
    b = batch_of(2)
    with torch.no_grad():
        l_plain, l_weighted = plain.training_loss(b)["latent_loss"], weighted.training_loss(b)["latent_loss"]
        assert not torch.allclose(l_plain, l_weighted)
        empty = {**b, "query_mask": torch.where(b["query_mask"] == 1, 0, b["query_mask"])}  # no foreground
        torch.testing.assert_close(
            plain.training_loss(empty)["latent_loss"], weighted.training_loss(empty)["latent_loss"]
        )


@pytest.mark.parametrize(
    "kw",
    [
        {"scm_zero_init": False},
        {"knowledge": "resnet"},
        {"knowledge": "transformer", "attn_maps": "self"},
        {"use_unet": False, "use_scm": False, "pam_att2": "none"},
        {"noise_query": True, "use_pam": False},
    ],
    ids=["default", "frb", "fst", "no_unet", "noised_no_pam"],
)
def test_cached_support_equals_joint_forward(tiny_dir, kw):
    """`encode_support` once + `predict_with_support` = `predict_masks` on episodes sharing that support."""
    torch.manual_seed(0)
    m = make_module(tiny_dir, dtype=torch.float64, **kw).eval()  # float64: see make_module
    with torch.no_grad():  # away from the (near-zero) init, so the support matters
        for p in m.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    b = batch_of(3, k=2, dtype=torch.float64)
    shared = {**b, "support_imgs": b["support_imgs"][:1].expand(3, -1, -1, -1, -1)}
    shared["support_masks"] = b["support_masks"][:1].expand(3, -1, -1, -1)
    with torch.no_grad():
        state = m.encode_support(shared["support_imgs"][0], shared["support_masks"][0])
        l_joint, _ = m(shared)
        l_cached, _ = m.query_forward(shared["query_img"], *state)
        # equal up to float64 rounding: the support set is encoded alone (1 row) instead of once per episode, and
        # the attention maps' min-max normalisation amplifies the difference (~1e-2 in float32)
        torch.testing.assert_close(l_cached, l_joint, rtol=0, atol=1e-10)
        joint = m.predict_masks(shared, (40, 30))
        assert torch.equal(m.predict_with_support(state, shared["query_img"], (40, 30)), joint)
        other = m(b)[
            0
        ]  # each episode's own support: a different prediction, so the check above is not vacuous
        assert (other - l_joint).abs().max() > 0.1
