"""What `FewShotModule` owns for every method: the hooks a subclass must implement, frozen pretrained parts,
the threshold convention, and the metric's state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fsseg.metrics import FewShotIoU
from fsseg.models.base import FewShotModule, threshold_scores
from fsseg.models.baseline import PrototypeModule
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffseg import DiffSegModule
from fsseg.runs import threshold_override


class Toy(FewShotModule):
    frozen_modules = ("backbone",)

    def __init__(self, threshold: float | None = None, threshold_mode: str = "absolute") -> None:
        super().__init__(threshold=threshold, threshold_mode=threshold_mode)
        self.backbone = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
        self.head = nn.Linear(3, 1)

    def training_loss(self, batch):
        return {"loss": self.head(self.backbone(batch)).sum()}

    def predict_masks(self, batch, out_size):
        return torch.zeros(1, *out_size, dtype=torch.long)


def test_a_method_without_its_hooks_cannot_be_built():
    class NoPredict(FewShotModule):
        def training_loss(self, batch):
            return {}

    with pytest.raises(TypeError, match="predict_masks"):
        NoPredict()
    assert isinstance(Toy(), FewShotModule)


def test_frozen_modules_are_frozen_kept_in_eval_and_left_out_of_checkpoints():
    m = Toy()
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.head.parameters()}
    m.train()
    assert m.training and m.head.training and not m.backbone.training and not m.backbone[1].training
    m.backbone = nn.Linear(3, 3)  # re-assigning a frozen part freezes the new one too
    assert not m.backbone.weight.requires_grad and not m.backbone.training
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {"head.weight", "head.bias"}
    fresh = Toy()
    fresh.load_state_dict(ckpt["state_dict"])  # strict, frozen keys excused
    assert torch.equal(fresh.head.weight, m.head.weight)
    with pytest.raises(RuntimeError, match="missing"):
        fresh.load_state_dict({"head.weight": m.head.weight})


def test_threshold_convention():
    score = torch.tensor([[[0.1, 0.3], [0.5, 0.9]]])  # [1, 2, 2]
    assert threshold_scores(score, 0.4, "absolute").tolist() == [[[0, 0], [1, 1]]]
    assert threshold_scores(score, 0.5, "relative").tolist() == [[[0, 0], [1, 1]]]  # > 0.45
    assert threshold_scores(score, 0.5, "relative", torch.tensor([0.5])).tolist() == [
        [[0, 1], [1, 1]]
    ]  # > 0.25
    assert Toy(threshold=0.4).binarize(score).tolist() == [[[0, 0], [1, 1]]]
    with pytest.raises(ValueError, match="threshold_mode"):
        Toy(threshold=0.4, threshold_mode="percent")
    with pytest.raises(ValueError, match="threshold must be a number"):
        Toy(threshold="relative")
    # fsseg predict-images --threshold sets the one `threshold` argument of every thresholding method
    assert (
        threshold_override(DiffewsModule, 0.3) == threshold_override(DiffSegModule, 0.3) == {"threshold": 0.3}
    )
    with pytest.raises(ValueError, match="does not apply to PrototypeModule"):
        threshold_override(PrototypeModule, 0.3)


def test_metric_keeps_only_what_it_reads():
    m = FewShotIoU([3, 5])
    assert set(m._defaults) == {"inter", "union"}
    m.update(torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long), torch.tensor([5]))
    assert m.compute()["per_class_iou"].tolist() == [0.0, 100.0]
