"""DiffewS's UNet calls with a support: joint (queries and supports in one batched call), or the released code's two
passes (`support_bank`: the supports alone, every ``attn1`` K/V recorded; then `query_call`: the queries against the
bank). Both compute the same function; ``tca`` passes only the queries (the support is in ``attn2``).

Each call is a `fsseg.models.latent.UNetCall`: its ``conv_in`` routes the 8-channel rows through ``conv_in_ref`` /
``conv_in_query``, its ``attention`` is the fusion processors' `FusionInputs`.
"""

from __future__ import annotations

import torch

from fsseg.models.diffews.generation import Denoiser
from fsseg.models.diffews.processors import FusionInputs
from fsseg.models.diffews.settings import DiffewsSettings
from fsseg.models.diffews.support import LatentSupport, Support, TokenSupport
from fsseg.models.latent.unet_context import UNetCall, UNetContext


class SupportedUNet:
    """The UNet calls of one DiffewS UNet (its `UNetContext` installed) under ``settings``."""

    def __init__(self, context: UNetContext, settings: DiffewsSettings) -> None:
        self.context, self.settings = context, settings
        self.unet = context.unet

    def _conv(self, name: str, x: torch.Tensor):
        """The extra input conv for rows ``x`` when they carry more channels than conv_in takes, else None."""
        return getattr(self.unet, name, None) if x.shape[1] != self.unet.config.in_channels else None

    def _fusion(self, n_query: int, support: LatentSupport, training: bool, generator=None, **layout):
        mask = support.mask  # [B_s, K, S, S]
        if mask is not None and n_query and mask.shape[0] != n_query:
            mask = mask.expand(n_query, -1, -1, -1)  # one support set shared by every query
        return FusionInputs(
            n_query=n_query,
            n_shot=support.shots,
            support_mask=mask,
            mask_resize=self.settings.mask_resize,
            sample_one_shot=self.settings.nshot == "sample" and not training,
            generator=generator,
            **layout,
        )

    def __call__(self, query_in, support: Support, t, prompt, training: bool, generator=None) -> torch.Tensor:
        """UNet output for the query rows ``[B, 4, h, w]``: query inputs ``[B, 4 or 8, h, w]``, timesteps ``[B]``."""
        q_route = ((self._conv("conv_in_query", query_in), query_in),)
        if isinstance(support, TokenSupport):  # tca: only the queries pass through the UNet
            call = UNetCall(conv_in=q_route)
            hidden = support.tokens.to(query_in.dtype)
            kw = dict(encoder_hidden_states=hidden, encoder_attention_mask=support.keep)
            return self.context(call, query_in[:, :4], t, **kw)[0].sample
        if self.settings.support_pass == "separate":
            bank = self.support_bank(support, t, prompt)
            return self.query_call(query_in, support, t, prompt, bank, training, generator)
        b, x_s = query_in.shape[0], support.x
        sample = torch.cat(
            [query_in[:, :4], x_s[:, :4]]
        )  # [B(1+K), 4, h, w]; conv_in_ref/_query replace rows
        timesteps = torch.cat([t, t.repeat_interleave(support.shots)])
        call = UNetCall(
            conv_in=(*q_route, (self._conv("conv_in_ref", x_s), x_s)),
            attention=self._fusion(b, support, training, generator),
        )
        hidden = prompt.expand(sample.shape[0], -1, -1)
        return self.context(call, sample, timesteps, encoder_hidden_states=hidden)[0].sample[:b]

    def denoiser(self, support: Support, n_queries: int, prompt, training: bool) -> Denoiser:
        """The UNet call for ``n_queries`` queries against ``support``: against its K/V banks when it has them (one
        support set encoded once), else the call above (one support set repeated for every query)."""
        banks = getattr(support, "banks", None)
        if banks is None:
            if support.episodes != n_queries:
                support = support.repeat(n_queries)
            return lambda x, t, g: self(x, support, t, prompt, training, g)

        def denoise(x, t, g):
            bank = banks[int(t.reshape(-1)[0])]  # every query of a call shares the timestep
            return self.query_call(x, support, t, prompt, bank, training, g)

        return denoise

    def support_bank(self, support: LatentSupport, t, prompt) -> dict:
        """The support-only call (rows ``[B_s*K]``, timesteps ``t [B_s]`` per episode): every ``attn1`` layer's K/V,
        ``{layer name: (K, V)}``."""
        x_s, k = support.x, support.shots
        call = UNetCall(
            conv_in=((self._conv("conv_in_ref", x_s), x_s),),
            attention=FusionInputs(n_query=0, n_shot=k, record=True),
        )
        hidden = prompt.expand(x_s.shape[0], -1, -1)
        _, record = self.context(call, x_s[:, :4], t.repeat_interleave(k), encoder_hidden_states=hidden)
        return dict(record.attention)  # a copy: a checkpoint recomputation may write the record again

    def query_call(
        self, query_in, support: LatentSupport, t, prompt, bank: dict, training: bool, generator=None
    ) -> torch.Tensor:
        """The query-only call ``[B, 4, h, w]``: each query attends to its own and the banked support K/V."""
        b = query_in.shape[0]
        call = UNetCall(
            conv_in=((self._conv("conv_in_query", query_in), query_in),),
            attention=self._fusion(b, support, training, generator, bank=bank),
        )
        hidden = prompt.expand(b, -1, -1)
        return self.context(call, query_in[:, :4], t, encoder_hidden_states=hidden)[0].sample
