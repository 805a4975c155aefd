"""One way to give a UNet call more than its inputs, and to read more than its output: `UNetCall` (a frozen per-call
dataclass) and `UNetContext` (installed once on a UNet; its one context manager makes a `UNetCall` the active one).

What a call can carry:

- ``conv_in``: row blocks that bypass ``unet.conv_in`` (e.g. DiffewS's 8-channel supports through ``conv_in_ref``):
  ``((conv or None, x), ...)`` covering the UNet batch in row order; a block with a conv has its rows of conv_in's
  output replaced by ``conv(x)``, one with None keeps conv_in's rows. The UNet's ``sample`` has its 4 channels on
  every row.
- ``attention``: the per-call input of the attention processors the context installed (DiffewS's `FusionInputs`,
  DiffSeg's map request). The processors hold no state: the context passes the whole `UNetCall` to them through
  diffusers' ``cross_attention_kwargs={"call": ...}``, which every attention layer receives (gradient checkpointing
  recomputes a block with the same arguments, so a recomputation sees the same call). A processor writes what it
  captures into ``record.attention[layer name]``.
- ``keep_output``: which outputs of the hooked modules (``outputs`` at installation: UNet blocks, ResNet layers...)
  go into ``record.outputs[name]`` (in call order), e.g. DIFT-style features of an up block or DiffSeg's down-path
  states.
- ``residual``: ``(name, hidden_states, record) -> tensor or None``, added to the input hidden states of the modules
  hooked as ``residuals`` at installation (DiffSeg's SCM into the up blocks).

Module hooks (conv_in, outputs, residuals) act only while a call is active: a plain ``unet(...)`` is the unchanged
UNet, and a block that gradient checkpointing recomputes during backward records nothing the second time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ConvBlock = tuple[nn.Module | None, torch.Tensor]


@dataclass
class Record:
    """What one UNet call recorded, in call order."""

    outputs: dict[str, Any] = field(default_factory=dict)  # hooked module name -> its forward output
    attention: dict[str, Any] = field(
        default_factory=dict
    )  # attention layer name -> what its processor captured


@dataclass(frozen=True)
class UNetCall:
    """One UNet call's extra inputs and requests (see the module docstring); built per call, never changed."""

    conv_in: tuple[ConvBlock, ...] = ()
    attention: Any = None
    keep_output: Callable[[str, Any], bool] | None = None
    residual: Callable[[str, torch.Tensor, Record], torch.Tensor | None] | None = None
    record: Record = field(default_factory=Record)


class IgnoreCall:
    """Wraps an attention processor that takes no part in a call, so it accepts (and ignores) the ``call`` argument:
    diffusers hands ``cross_attention_kwargs`` to every attention layer and warns about arguments a processor lacks."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, call=None
    ):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class UNetContext:
    """The hooks of one UNet and the call they serve.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any module with a ``conv_in``).
        processors: attention processors to install (``{layer name: processor}``, every layer; each takes a
            ``call`` keyword argument): then every call passes itself to them. None: the UNet's own processors.
        outputs: ``{name: module}`` whose forward outputs a call may keep (``UNetCall.keep_output``).
        residuals: ``{name: module}`` whose input ``hidden_states`` a call may add to (``UNetCall.residual``).
    """

    def __init__(
        self,
        unet: nn.Module,
        processors: Mapping[str, Any] | None = None,
        outputs: Mapping[str, nn.Module] | None = None,
        residuals: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.unet = unet
        self.active_call: UNetCall | None = None
        self.passes_call = processors is not None
        if processors is not None:
            unet.set_attn_processor(dict(processors))
        self.handles = [unet.conv_in.register_forward_hook(self._route_conv_in)]
        for name, module in (outputs or {}).items():
            self.handles.append(module.register_forward_hook(self._keeper(name)))
        for name, module in (residuals or {}).items():
            self.handles.append(module.register_forward_pre_hook(self._adder(name), with_kwargs=True))

    @contextlib.contextmanager
    def active(self, call: UNetCall) -> Iterator[Record]:
        """Make ``call`` the one the hooks serve (one at a time) and yield its record."""
        if self.active_call is not None:
            raise RuntimeError("a UNet call is already active on this UNet (UNetContext calls do not nest)")
        self.active_call = call
        try:
            yield call.record
        finally:
            self.active_call = None

    def __call__(self, call: UNetCall, *args, **kwargs) -> tuple[Any, Record]:
        """``unet(*args, **kwargs)`` under ``call``: (the UNet's output, what the call recorded)."""
        if self.passes_call:
            kwargs["cross_attention_kwargs"] = {**(kwargs.get("cross_attention_kwargs") or {}), "call": call}
        with self.active(call) as record:
            out = self.unet(*args, **kwargs)
        return out, record

    def remove(self) -> None:
        """Take the module hooks off (installed processors stay)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ---- the hooks --------------------------------------------------------------------------------------------
    def _route_conv_in(self, module, args, out):
        call = self.active_call
        if call is None or not call.conv_in:
            return out
        pieces, start = [], 0
        for conv, x in call.conv_in:
            n = x.shape[0]
            pieces.append(out[start : start + n] if conv is None else conv(x).to(out.dtype))
            start += n
        if start != out.shape[0]:
            raise ValueError(f"routed blocks cover {start} rows, the UNet batch has {out.shape[0]}")
        return torch.cat(pieces, 0)

    def _keeper(self, name: str):
        def hook(module, args, output) -> None:
            call = self.active_call
            if call is not None and call.keep_output is not None and call.keep_output(name, output):
                call.record.outputs[name] = output

        return hook

    def _adder(self, name: str):
        def hook(module, args, kwargs):
            call = self.active_call
            if call is None or call.residual is None:
                return None
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            residual = call.residual(name, hidden, call.record)
            if residual is None:
                return None
            hidden = hidden + residual.to(hidden.dtype)
            if "hidden_states" in kwargs:
                return args, dict(kwargs, hidden_states=hidden)
            return (hidden, *args[1:]), kwargs

        return hook
