"""CUDA autocast's casting rules applied to CPU tensors, for a memory plan of a GPU run made without a GPU.

The plan runs the step on fake CPU tensors (autograd's backward needs a CUDA device for CUDA tensors, fake or not),
but activations' dtypes, hence their sizes, follow the device's autocast lists, and CUDA's lists differ from the
CPU's (CUDA runs ``group_norm``, ``layer_norm``, upsampling, ``exp``, ``pow`` ... in float32 and ``softmax``/
``sum`` with a float32 output; CPU autocast keeps them in the lower precision). `CudaAutocast` is a
`TorchFunctionMode` that, while CPU autocast is on (``torch.autocast("cpu", dtype)``, which the model's own
``torch.autocast(device, enabled=False)`` regions switch off as they would CUDA's), casts each call's floating
tensors by CUDA's policy for that operation and runs the call with CPU autocast off:

- lower precision: to the autocast dtype; where the region caches casts (``torch.autocast(..., cache_enabled=True)``,
  torch's default; Lightning's precision plugin turns it off), float32 parameters that require grad are cast once
  and the copy is kept until the region ends, as CUDA does;
- float32: to float32; float32 output (``softmax``, ``sum``, ``cumsum``, ``norm``, ...): ``dtype=torch.float32``
  unless the call gives a dtype; promote: to the widest floating dtype among the arguments.

The lists are ATen's for CUDA in torch 2.14 (``ATen/autocast_mode.h``: ``AT_FORALL_LOWER_PRECISION_FP``,
``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_PROMOTE``; tests/test_plan.py compares them
with the installed header). Casting happens where Python calls the operation (``F.conv2d``, ``x.softmax``), the
level at which ATen's autocast kernels see it for every operation fsseg's models call.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

# ATen/autocast_mode.h (torch 2.14), operator names
LOWER_PRECISION = frozenset(
    "_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d convolution "
    "prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul "
    "linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell "
    "_scaled_dot_product_flash_attention scaled_dot_product_attention".split()
)
FP32 = frozenset(
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus layer_norm "
    "native_layer_norm rms_norm group_norm frobenius_norm nuclear_norm cosine_similarity poisson_nll_loss "
    "cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss "
    "mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss "
    "binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp upsample_nearest1d _upsample_nearest_exact1d "
    "upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d "
    "upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa".split()
)
FP32_OUTPUT = frozenset(
    "prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum norm".split()
)
PROMOTE = frozenset(
    "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add".split()
)
# Python-level names of the same operations (functional forms, Tensor methods and operators)
ALIASES = {
    "__matmul__": "matmul",
    "__rmatmul__": "matmul",
    "__pow__": "pow",
    "__rpow__": "pow",
    "__ipow__": "pow",
    "vector_norm": "linalg_vector_norm",
    "matrix_norm": "linalg_matrix_norm",
    "vecdot": "linalg_vecdot",
    "multi_dot": "linalg_multi_dot",
    "grid_sample": "grid_sampler",
    "cross_entropy": "log_softmax",  # cross_entropy_loss has no autocast kernel: its log_softmax is float32
    "interpolate": "upsample_nearest2d",  # every mode but "area" is an upsampling kernel of the float32 list
    "upsample": "upsample_nearest2d",
    "upsample_nearest": "upsample_nearest2d",
    "upsample_bilinear": "upsample_bilinear2d",
}
LOW_DTYPES = (torch.float16, torch.bfloat16)


def policy(func, kwargs: dict) -> str | None:
    """CUDA autocast's policy for a Python-level call: ``lower``, ``fp32``, ``fp32_output``, ``promote`` or None."""
    name = getattr(func, "__name__", "")
    name = ALIASES.get(name, name)
    if name == "upsample_nearest2d" and kwargs.get("mode") == "area":
        return None
    if name in LOWER_PRECISION:
        return "lower"
    if name in FP32:
        return "fp32"
    if name in FP32_OUTPUT:
        return "fp32_output"
    if name in PROMOTE:
        return "promote"
    return None


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts while CPU autocast is on (see the module docstring); the weight-cast cache lives as
    long as the mode."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast(self, t, dtype: torch.dtype, cache: bool):
        if not _eligible(t) or t.dtype == dtype:
            return t
        cacheable = (
            cache
            and torch.is_autocast_cache_enabled()
            and t.dtype == torch.float32
            and t.requires_grad
            and t.is_leaf
            and not t._is_view()
        )
        if cacheable:
            hit = self._cache.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
        out = t.to(dtype)
        if cacheable:
            self._cache[id(t)] = (t, out)  # holds t too, so its id is not reused while cached
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        low = torch.get_autocast_dtype("cpu")
        rule = policy(func, kwargs)
        if rule == "lower":
            args, kwargs = tree_map(lambda t: self._cast(t, low, cache=True), (args, kwargs))
        elif rule == "fp32":
            args, kwargs = tree_map(lambda t: self._cast(t, torch.float32, cache=False), (args, kwargs))
        elif rule == "fp32_output":
            first = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
            if _eligible(first) and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
        elif rule == "promote":
            floats = [t.dtype for t in tree_leaves((args, kwargs)) if _eligible(t)]
            if floats:
                widest = torch.float32 if torch.float32 in floats else floats[0]
                args, kwargs = tree_map(lambda t: self._cast(t, widest, cache=False), (args, kwargs))
        torch.set_autocast_enabled("cpu", False)
        try:
            return func(*args, **kwargs)
        finally:
            torch.set_autocast_enabled("cpu", True)


def recompute_under_cuda_rules(module: torch.nn.Module) -> None:
    """Diffusers models in ``module`` that checkpoint their blocks recompute each block's forward under a
    `CudaAutocast` of its own (``torch.utils.checkpoint``'s ``context_fn``): the recomputation runs inside the
    backward, where no mode of the forward is on (``Tensor.backward`` passes through the mode's handler, which
    runs with the mode off), under the CPU autocast state the checkpoint saved; without CUDA's casts there its
    tensors' dtypes differ from the forward's and the checkpoint refuses them. Changes ``module`` (a plan's own)."""
    from diffusers import ModelMixin

    def checkpoint(block, *args):
        return torch.utils.checkpoint.checkpoint(
            block.__call__,
            *args,
            use_reentrant=False,  # diffusers' default
            context_fn=lambda: (contextlib.nullcontext(), CudaAutocast()),
        )

    for m in module.modules():
        if isinstance(m, ModelMixin) and m.is_gradient_checkpointing:
            m.enable_gradient_checkpointing(checkpoint)
