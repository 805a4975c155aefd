"""The prototype baseline: shapes, support caching equal to the plain path, learning on a fixed batch."""

import torch

from fsseg.episode import fake_batch
from fsseg.models.baseline import PrototypeModule


def tiny():
    torch.manual_seed(0)
    return PrototypeModule(backbone="resnet18", out_indices=(1,), embed_dim=8).eval()


def test_predict_shapes_and_cached_support_equals_plain_path():
    m = tiny()
    x = fake_batch(b=1, k=2)
    with torch.no_grad():
        pred = m.predict_masks(x, (40, 24))
        assert pred.shape == (1, 40, 24) and set(pred.unique().tolist()) <= {0, 1}
        state = m.encode_support(x["support_imgs"][0], x["support_masks"][0])
        queries = torch.cat([x["query_img"], torch.rand(2, 3, 32, 32)])
        cached = m.predict_with_support(state, queries, (40, 24))
        shared = fake_batch(  # the same support set in every episode of a batch
            3,
            2,
            query_img=queries,
            support_imgs=x["support_imgs"].expand(3, -1, -1, -1, -1),
            support_masks=x["support_masks"].expand(3, -1, -1, -1),
        )
        plain = m.predict_masks(shared, (40, 24))
    assert torch.equal(cached, plain) and torch.equal(cached[:1], pred)


def test_loss_decreases_on_a_fixed_batch():
    m = tiny().train()
    x = fake_batch(b=2, k=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = m.training_loss(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
