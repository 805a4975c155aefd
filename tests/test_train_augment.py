"""``data.train_augment: channel_permutation``: one RGB channel permutation per training episode, the same for its
query and supports, reproducible from the seed; evaluation episodes are never augmented; bad values refused."""

from __future__ import annotations

import pytest
import torch
from test_data import make_dm

from fsseg.data import augment
from fsseg.data.datamodule import FewShotDataModule


def datamodule(root, train_augment: str = "none", **kw) -> FewShotDataModule:
    dm = make_dm(root, img_size=32, train_episodes=24, train_augment=train_augment, **kw)
    dm.setup("fit")
    return dm


def test_episode_is_permuted_alike(small_embedded):
    plain = datamodule(small_embedded).datasets["trn"]
    aug = datamodule(small_embedded, "channel_permutation").datasets["trn"]
    seen = set()
    for i in range(24):
        a, p = aug[i], plain[i]
        assert a["query_name"] == p["query_name"] and a["support_names"] == p["support_names"]
        v = int(a["colour_variant"])
        seen.add(v)
        perm = list(augment.CHANNEL_PERMUTATIONS[v])
        assert torch.equal(a["query_img"], p["query_img"][perm])  # query and supports: the same permutation
        assert torch.equal(a["support_imgs"], p["support_imgs"][:, perm])
        assert torch.equal(a["query_mask"], p["query_mask"]) and torch.equal(
            a["support_masks"], p["support_masks"]
        )
        assert int(aug[i]["colour_variant"]) == v  # reproducible
    assert len(seen) >= 4  # 24 episodes draw most of the 6 permutations
    assert "colour_variant" not in plain[0]


def test_seed_changes_the_draws(small_embedded):
    a = datamodule(small_embedded, "channel_permutation").datasets["trn"]
    b = datamodule(small_embedded, "channel_permutation", seed=1).datasets["trn"]
    assert [augment.draw("channel_permutation", 0, i) for i in range(24)] != [
        augment.draw("channel_permutation", 1, i) for i in range(24)
    ]
    assert [int(a[i]["colour_variant"]) for i in range(6)] == [
        augment.draw("channel_permutation", 0, i) for i in range(6)
    ]
    assert [int(b[i]["colour_variant"]) for i in range(6)] == [
        augment.draw("channel_permutation", 1, i) for i in range(6)
    ]


def test_evaluation_is_never_augmented(small_embedded):
    dm = datamodule(small_embedded, "channel_permutation", test_episodes=4)
    dm.setup("test")
    assert dm.datasets["test"].train_augment == "none" and dm.datasets["val"].train_augment == "none"
    assert "colour_variant" not in dm.datasets["test"][0]
    with pytest.raises(ValueError, match="applies to training episodes, not to 'test'"):
        dm.build("test").__class__(
            root=small_embedded,
            split="test",
            fold=0,
            shot=1,
            img_size=32,
            train_augment="channel_permutation",
        )


def test_unknown_augment_refused_by_name(small_embedded):
    with pytest.raises(ValueError, match=r"data.train_augment: expected one of .*'hflip'"):
        FewShotDataModule(root=str(small_embedded), benchmark="embedded", train_augment="hflip")


def test_variant_names():
    assert [augment.variant_name(v) for v in range(6)][0] == "RGB"
    assert len({augment.variant_name(v) for v in range(6)}) == 6
    x = torch.arange(3.0)[:, None, None].expand(3, 2, 2)
    assert augment.apply(x, 0) is x
    assert augment.apply(x, 5)[:, 0, 0].tolist() == [float(c) for c in augment.CHANNEL_PERMUTATIONS[5]]
