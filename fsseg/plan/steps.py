"""One training step and one evaluation step as Lightning runs them on one device, on whatever tensors the
module holds (fake ones for a plan, real ones for a measurement).

Training (Lightning's automatic optimisation, ``lightning/pytorch/loops/optimization/automatic.py``): per batch,
``training_step`` under the precision's forward context, ``optimizer.zero_grad(set_to_none=True)`` before the
first backward of each accumulation window, ``backward`` of the loss divided by the accumulation, then at the
window's end gradient clipping and ``optimizer.step()``. One window runs (two batches when gradients accumulate:
the second one's forward and backward with the first one's gradients alive), its optimizer step (which creates
the optimizer states), then the next window's first batch: its forward with the previous step's gradients and the
states alive, ``zero_grad``, its backward with the states alive. Later batches and steps repeat these. GradScaler
(``16-mixed``) is left out: it scales and unscales in place and keeps a few scalars. Evaluation: the module in
eval mode, ``predict_masks`` under ``torch.inference_mode()`` and the forward context of the evaluation's precision
(`evaluation_precision`; what ``fsseg test`` runs per batch; the metric's per-class counts are a few bytes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fsseg.plan.tracker import LiveMemory

PRECISIONS = {  # Lightning's unified precision names -> (autocast dtype, parameter dtype)
    "32-true": (None, torch.float32),
    "64-true": (None, torch.float64),
    "16-mixed": (torch.float16, torch.float32),
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-true": (None, torch.float16),
    "bf16-true": (None, torch.bfloat16),
}


@dataclass(frozen=True)
class Precision:
    """A Lightning precision setting: ``autocast`` dtype of the forward (``*-mixed``) or the dtype parameters,
    inputs and new tensors take (``*-true``)."""

    name: str
    autocast: torch.dtype | None
    dtype: torch.dtype

    @classmethod
    def parse(cls, value) -> Precision:
        from lightning.fabric.connector import _convert_precision_to_unified_args

        try:
            name = str(_convert_precision_to_unified_args(value))
        except ValueError as err:
            raise ValueError(f"trainer.precision: {err}") from None
        if name not in PRECISIONS:
            raise ValueError(
                f"trainer.precision {value!r}: fsseg plan knows {', '.join(PRECISIONS)}, not {name!r}"
            )
        return cls(name, *PRECISIONS[name])

    def convert_module(self, module: torch.nn.Module) -> None:
        if self.autocast is None and self.dtype != torch.float32:
            module.to(self.dtype)  # Lightning's HalfPrecision / DoublePrecision convert the whole module

    def convert_input(self, batch: dict) -> dict:
        if self.autocast is not None or self.dtype == torch.float32:
            return batch
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}

    @contextlib.contextmanager
    def forward_context(self, device_type: str = "cpu", emulate_cuda: bool = False):
        """Lightning's forward context: autocast for ``*-mixed`` on ``device_type``, without its weight cache as
        Lightning's ``MixedPrecision`` (with ``emulate_cuda``, CPU tensors cast by CUDA's lists:
        `fsseg.plan.cuda_autocast`), the default dtype for ``*-true``."""
        if self.autocast is not None:
            from fsseg.plan.cuda_autocast import CudaAutocast

            # as Lightning's MixedPrecision plugin: no cache of casted weights
            with torch.autocast(device_type, dtype=self.autocast, cache_enabled=False):
                with CudaAutocast() if emulate_cuda else contextlib.nullcontext():
                    yield
            return
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype if self.dtype != torch.float32 else previous)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def episode_batch(
    batch_size: int, shots: int, size: int, eval_size: int, device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of episodes with the keys and shapes of the data module's (docs/ARCHITECTURE.md): random images, a
    centred square object, an ignore strip. No ``episode_idx``: evaluation seeds its noise from it, a value a fake
    tensor does not have; the seed is 0 without it, and memory does not depend on it."""
    g = torch.Generator().manual_seed(seed)

    def masks(n: int, s: int) -> torch.Tensor:  # [n, s, s] in {0, 1, 255}
        m = torch.zeros(n, s, s, dtype=torch.long)
        m[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1
        m[:, :, : max(1, s // 64)] = 255
        return m

    batch = {
        "query_img": torch.rand(batch_size, 3, size, size, generator=g),
        "query_mask": masks(batch_size, size),
        "query_mask_eval": masks(batch_size, eval_size),
        "support_imgs": torch.rand(batch_size, shots, 3, size, size, generator=g),
        "support_masks": masks(batch_size * shots, size).view(batch_size, shots, size, size),
        "class_id": torch.zeros(batch_size, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()}


def track_static(tracker: LiveMemory, module: torch.nn.Module, batch: dict, optimizer=None) -> None:
    tracker.track(list(module.parameters()), "parameters")
    tracker.track(list(module.buffers()), "buffers")
    tracker.track(list(batch.values()), "inputs")
    if optimizer is not None:
        tracker.track([list(s.values()) for s in optimizer.state.values()], "optimizer")


def train_steps(
    module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    precision: Precision,
    tracker: LiveMemory,
    accumulate: int = 1,
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
    steps: int = 1,
    emulate_cuda: bool = False,
) -> None:
    """``steps`` optimizer steps of Lightning's training loop on one device, then the next window's first batch
    (see the module docstring)."""
    params = [p for p in module.parameters() if p.requires_grad]
    device_type = batch["query_img"].device.type
    if emulate_cuda:
        from fsseg.plan.cuda_autocast import recompute_under_cuda_rules

        recompute_under_cuda_rules(module)
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, "gradients")) for p in params
    ]
    module.train()
    try:
        for window in range(steps + 1):
            last = window == steps  # the next window's first batch: no optimizer step after it
            for i in range(1 if last else min(accumulate, 2)):
                tracker.phase = "forward"
                with precision.forward_context(device_type, emulate_cuda):
                    loss = module.training_loss(batch)["loss"]
                if i == 0:
                    tracker.phase = "zero_grad"
                    optimizer.zero_grad(set_to_none=True)
                tracker.phase = "backward"
                (loss / accumulate if accumulate > 1 else loss).backward()
                del loss
            if last:
                break
            if clip_val:
                tracker.phase = "gradient clipping"
                if clip_algorithm == "value":
                    torch.nn.utils.clip_grad_value_(params, clip_val)
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip_val)
            tracker.phase, tracker.category = "optimizer step", "optimizer"
            try:
                optimizer.step()
            finally:
                tracker.category = "activations"
    finally:
        for h in hooks:
            h.remove()


def evaluation_precision(module, precision: Precision) -> Precision:
    """The precision ``fsseg test`` evaluates ``module`` in under the trainer's ``precision``: the module's
    ``eval_precision`` where set (the DiffewS paper configs' ``32-true``; `FewShotModule.evaluation_autocast`), else
    ``precision``; refused as the run refuses it where the trainer holds the weights in another dtype."""
    from fsseg.models.base import EVAL_PRECISIONS

    wanted = getattr(module, "eval_precision", None)
    if wanted is None or wanted == precision.name:
        return precision
    if precision.name not in EVAL_PRECISIONS:
        raise ValueError(
            f"model.init_args.eval_precision {wanted} needs fp32 weights, but trainer.precision {precision.name} "
            f"holds them otherwise: set eval_precision null, or trainer.precision 32-true"
        )
    return Precision.parse(wanted)


def eval_step(module, batch: dict, precision: Precision, tracker: LiveMemory, emulate_cuda: bool = False):
    """``predict_masks`` of one batch as ``fsseg test`` runs it (see the module docstring)."""
    module.eval()
    tracker.phase = "evaluation"
    out_size = tuple(batch["query_mask_eval"].shape[-2:])
    device_type = batch["query_img"].device.type
    with torch.inference_mode(), precision.forward_context(device_type, emulate_cuda):
        return module.predict_masks(batch, out_size)
