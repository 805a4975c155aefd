"""Helpers shared by the tests: the per-config check of every method (one optimiser step changes the trainable
weights and the model then predicts binary masks of the asked size), and DiffewS's decoded prediction of a batch."""

import torch


def assert_one_step_then_predict(model, optimizer, batch: dict, out_size: tuple[int, int]) -> None:
    before = [p.detach().clone() for p in model.trainable_parameters()]
    model.train()
    loss = model.training_loss(batch)["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters()))
    model.eval()
    with torch.no_grad():
        pred = model.predict_masks(batch, out_size)
    assert pred.shape == (batch["query_img"].shape[0], *out_size) and set(pred.unique().tolist()) <= {0, 1}


def decode_batch(m, batch):
    """The decoded prediction of a batch of episodes, before thresholding."""
    return m.pipeline.decode_episodes(batch["query_img"], batch["support_imgs"], batch["support_masks"])
