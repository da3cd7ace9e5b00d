"""DeepSeek's multi-head latent attention for a few positions at a time.

mlx-lm's DeepseekV3Attention attends in the compressed latent space only for
one position (L == 1: the query is absorbed into the latent, keys and values
stay the cached latents); for L > 1 it expands every cached latent into
per-head keys and values, which costs O(context x heads) per call. For a
prompt chunk that is the right trade; for a trip of a token plus a few
drafts it makes verification cost far more than a decode step (measured on
the bench preset: 1 token 170 ms, 2 tokens 1.6 s at 256 positions of context).

AbsorbedAttention runs the L == 1 computation for any L up to
`absorb_up_to`: the rope scores already carry the causal mask, so the same
operations are exact for several positions (the logits differ from mlx-lm's
expanded path only in the last bits: a different order of sums). Above it,
and for L == 1, it is mlx-lm's own code."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.deepseek_v3 import DeepseekV3Attention


class AbsorbedAttention(DeepseekV3Attention):
    absorb_up_to = 1  # set per forward by the stage (StageModel.forward)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None,
                 cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        if L == 1 or L > self.absorb_up_to:
            return super().__call__(x, mask, cache)
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)
        compressed_kv = self.kv_a_proj_with_mqa(x)
        compressed_kv, k_pe = mx.split(compressed_kv, [self.kv_lora_rank], axis=-1)
        k_pe = k_pe.reshape(B, L, 1, self.qk_rope_head_dim).transpose(0, 2, 1, 3)
        kv_latent = mx.expand_dims(self.kv_a_layernorm(compressed_kv), axis=1)
        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe, offset)
        if cache is not None:
            kv_latent, k_pe = cache.update_and_fetch(kv_latent, k_pe)
        pe_scores = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
        if mask is not None:
            pe_scores = mx.where(mask, pe_scores,
                                 mx.array(mx.finfo(pe_scores.dtype).min, pe_scores.dtype))
        out = scaled_dot_product_attention(self.embed_q(q_nope), kv_latent, kv_latent,
                                           cache=cache, scale=self.scale, mask=pe_scores)
        out = self.unembed_out(out)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def absorbing(layers) -> list[AbsorbedAttention]:
    """Switch the attention of these DeepSeek layers to AbsorbedAttention
    (same weights, same module); returns them to set `absorb_up_to` on."""
    out = []
    for layer in layers:
        attn = layer.self_attn
        if isinstance(attn, DeepseekV3Attention):
            attn.__class__ = AbsorbedAttention
            out.append(attn)
    return out
