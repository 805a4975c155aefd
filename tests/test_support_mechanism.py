"""The support must reach the prediction: DiffewS and DiffSeg, trained briefly on a task that only the support can
solve, segment the object their support shows; with the support pathway cut, the same training shows no gap.

Task: every query holds two discs of two different colours (a colour is a class); the ground truth is the disc
whose colour the support's mask marks. Without the support the two discs are indistinguishable, so a model that
ignores its support can at best mark both. The "other class" evaluation hands each query a support of its second
disc's colour: a model that follows its support then marks the wrong disc and scores near zero.

The models start from the shipped tiny assets (their VAE/MoVQ keep colours readable); each run trains 100 steps
at 32 px on one thread, under half a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsseg.episode import fake_batch
from fsseg.metrics import FewShotIoU

ASSETS = Path(__file__).resolve().parents[1] / "fsseg" / "assets"

PALETTE = torch.tensor(
    [[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.9, 0.9, 0.1], [0.8, 0.1, 0.8], [0.1, 0.8, 0.8]]
)  # class c (1-based) is colour c - 1
SIZE, STEPS, BATCH = 32, 100, 8


def _disc(gen: torch.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r = int(torch.randint(SIZE // 8, SIZE // 4, (1,), generator=gen))
    cy, cx = torch.randint(r, SIZE - r, (2,), generator=gen).tolist()
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # [S, S]


def _scene(classes: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    img = 0.35 + 0.1 * torch.rand(3, SIZE, SIZE, generator=gen)  # [3, S, S] grey noise
    label = torch.zeros(SIZE, SIZE, dtype=torch.long)
    for c in classes:  # a later disc may cover an earlier one: the label says what is visible
        disc = _disc(gen)
        img[:, disc] = PALETTE[c - 1][:, None]
        label[disc] = c
    return img, label


def two_disc_episodes(n: int, seed: int, control: str = "none") -> dict[str, torch.Tensor]:
    """``n`` 1-shot episodes in the datamodule's batch layout; ``control='other_class'`` gives each query a
    support of its distractor's class (query, ground truth and class id unchanged)."""
    gen = torch.Generator().manual_seed(seed)
    q, qm, s, sm, cls = [], [], [], [], []
    for _ in range(n):
        target, distractor = (torch.randperm(len(PALETTE), generator=gen)[:2] + 1).tolist()
        img, label = _scene([target, distractor], gen)
        shown = distractor if control == "other_class" else target
        s_img, s_label = _scene([shown], gen)
        q.append(img)
        qm.append((label == target).long())
        s.append(s_img[None])
        sm.append((s_label == shown).long()[None])
        cls.append(target)
    return fake_batch(  # the contract's other keys from the one episode factory
        n,
        1,
        SIZE,
        query_img=torch.stack(q),  # [n, 3, S, S]
        query_mask=torch.stack(qm),  # [n, S, S]
        query_mask_eval=torch.stack(qm),
        support_imgs=torch.stack(s),  # [n, 1, 3, S, S]
        support_masks=torch.stack(sm),  # [n, 1, S, S]
        class_id=torch.tensor(cls),
        support_control=[control] * n,
    )


@torch.no_grad()
def _miou(module, control: str) -> float:
    module.eval()
    metric = FewShotIoU(list(range(1, len(PALETTE) + 1)))
    batch = two_disc_episodes(48, seed=123, control=control)
    for i in range(0, 48, 16):
        part = {k: v[i : i + 16] for k, v in batch.items()}
        metric.update(module.predict_masks(part, (SIZE, SIZE)), part["query_mask"], part["class_id"])
    return float(metric.compute()["miou"])


def _train_and_score(module, params, lr: float) -> tuple[float, float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(params, lr=lr)
    module.train()
    for step in range(STEPS):
        loss = module.training_loss(two_disc_episodes(BATCH, seed=1000 + step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _miou(module, "none"), _miou(module, "other_class")


def _diffews(cut: bool):
    from fsseg.models.diffews import DiffewsModule

    torch.manual_seed(0)
    module = DiffewsModule(pretrained=str(ASSETS / "tiny-diffews"))
    if cut:  # every support becomes a black image with an empty mask before it is encoded
        encode = module.pipeline.encode  # the VAE encodes the queries and the support side
        module.pipeline.encode = lambda queries, img, mask, *args, **kw: encode(
            queries, torch.zeros_like(img), torch.zeros_like(mask), *args, **kw
        )
    return module, [p for p in module.parameters() if p.requires_grad], 1e-3


def _diffseg(cut: bool):
    from fsseg.models.diffseg import DiffSegModule

    torch.manual_seed(0)
    module = DiffSegModule(
        decoder=str(ASSETS / "tiny-diffseg" / "decoder"),
        prior=str(ASSETS / "tiny-diffseg" / "prior"),
        edge_source="sobel",
        pam_dim=32,
        pam_heads=4,
        scm_width=32,
        scm_edge_channels=16,
        latent_fg_weight=3.0,
        threshold=0.3,
    )
    if cut:  # the masked support image (source of L_s and the CLIP prompt) becomes black
        encode = module.pipeline.encode_support
        module.pipeline.encode_support = lambda imgs, masks: encode(torch.zeros_like(imgs), masks)
    return module, module.trainable_parameters(), 3e-3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("build", [_diffews, _diffseg], ids=["diffews", "diffseg"])
def test_support_decides_the_foreground(build):
    own, other = _train_and_score(*build(cut=False))
    assert own > 45.0, f"{build.__name__[1:]}: own-support mIoU {own:.1f} after {STEPS} steps"
    assert own - other > 25.0, (
        f"{build.__name__[1:]}: own {own:.1f} vs other-class {other:.1f}: the support is not used"
    )


@pytest.mark.parametrize("build", [_diffews, _diffseg], ids=["diffews", "diffseg"])
def test_no_gap_without_the_support_pathway(build):
    own, other = _train_and_score(*build(cut=True))
    assert abs(own - other) < 1.0, (
        f"{build.__name__[1:]} with its support cut: own {own:.1f} vs other {other:.1f}"
    )
