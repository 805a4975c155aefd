"""FewShotIoU against hand-computed cases (docs/PROTOCOL.md §2)."""

import pytest
import torch

from fsseg.metrics import FewShotIoU, episode_inter_union


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_episode_counts_exclude_ignored_pixels():
    pred = t([[[1, 1, 0, 0]]])
    gt = t([[[1, 255, 1, 0]]])  # the ignored pixel is predicted fg but counts nowhere
    inter, union = episode_inter_union(pred, gt)
    assert inter.tolist() == [[1, 1]]  # bg: pixel 3; fg: pixel 0
    assert union.tolist() == [[2, 2]]  # bg: pixels 2,3; fg: pixels 0,2


def test_miou_is_per_class_pooled_not_per_episode_mean():
    m = FewShotIoU(class_ids=[3, 7])
    # class 3: two episodes, fg I/U = 1/2 and 3/3 -> pooled 4/5 (an episode mean would give 0.75)
    m.update(t([[[1, 0, 0, 0]]]), t([[[1, 1, 0, 0]]]), torch.tensor([3]))
    m.update(t([[[1, 1, 1, 0]]]), t([[[1, 1, 1, 0]]]), torch.tensor([3]))
    # class 7: empty prediction, fg I/U = 0/2
    m.update(t([[[0, 0, 0, 0]]]), t([[[1, 1, 0, 0]]]), torch.tensor([7]))
    out = m.compute()
    assert out["per_class_iou"].tolist() == pytest.approx([80.0, 0.0])
    assert out["miou"].item() == pytest.approx(40.0)
    # FB-IoU pools classes first: bg I/U = (2+1+2)/(3+1+4) = 5/8 (bg unions: 3, 1, 4); fg = 4/7
    assert out["fbiou"].item() == pytest.approx(100 * (5 / 8 + 4 / 7) / 2)


def test_class_without_episodes_counts_as_zero_and_unknown_class_is_an_error():
    m = FewShotIoU(class_ids=[0, 1])
    m.update(t([[[1, 1]]]), t([[[1, 1]]]), torch.tensor([0]))
    assert m.compute()["miou"].item() == pytest.approx(50.0)
    with pytest.raises(ValueError, match=r"class ids \[5\]"):
        m.update(t([[[1, 1]]]), t([[[1, 1]]]), torch.tensor([5]))


def test_batched_update_equals_single_updates_and_reset():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 2, (6, 8, 8), generator=g)
    gt = torch.randint(0, 2, (6, 8, 8), generator=g)
    gt[:, 0] = 255
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    a, b = FewShotIoU([0, 1, 2]), FewShotIoU([0, 1, 2])
    a.update(pred, gt, cls)
    for i in range(6):
        b.update(pred[i : i + 1], gt[i : i + 1], cls[i : i + 1])
    assert torch.equal(a.compute()["per_class_iou"], b.compute()["per_class_iou"])
    a.reset()
    assert a.inter.sum() == 0 and a.union.sum() == 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        episode_inter_union(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))
