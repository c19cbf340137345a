"""Packed-sequence ("varlen") attention for Hugging Face decoder LLMs on any device.

Packed rows hold several conversations one after the other; their ``position_ids`` restart at each
conversation. ``flash_attention_2`` reads those restarts itself (cu_seqlens). For ``sdpa`` the stock
transformers path builds a dense (T, T) block-diagonal mask and pays attention over the whole row;
this module registers ``sdpa_varlen``, an attention function that instead regroups the row's tokens
into one (segments, longest segment) batch and runs causal SDPA on it: cost sum-of-squares of the
segment lengths, not the row length squared, and the fused causal kernels stay usable.

Everything that is not a packed/unpadded training forward (a padding mask, a KV cache, one query
token) goes to transformers' own SDPA function unchanged, so ``sdpa_varlen`` is ``sdpa`` plus
packing. The name is registered with transformers' AttentionInterface / AttentionMaskInterface and
never written to a saved config (transformers drops the implementation from config.json).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def segment_index(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """position_ids (B, T) -> (segment of each flat token, offset inside it, segment count, longest).

    A segment starts at every row start and wherever a position is not the previous one + 1."""
    B, T = position_ids.shape
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    start = start.reshape(-1)
    seg = start.cumsum(0) - 1
    idx = torch.arange(B * T, device=position_ids.device)
    off = idx - idx[start][seg]
    return seg, off, int(seg[-1]) + 1, int(off.max()) + 1


def segment_attention(query, key, value, position_ids, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """q (B, H, T, d), k/v (B, Hkv, T, d) -> (B, T, H, d), causal attention inside each segment only."""
    B, H, T, D = query.shape
    seg, off, S, L = segment_index(position_ids.expand(B, -1))

    def regroup(x):
        h = x.shape[1]
        flat = x.transpose(1, 2).reshape(B * T, h, x.shape[-1])
        return flat.new_zeros(S, L, h, x.shape[-1]).index_put((seg, off), flat).transpose(1, 2)

    # padded tail positions of a short segment only see real keys before them (causal), so no mask
    out = F.scaled_dot_product_attention(regroup(query), regroup(key), regroup(value), dropout_p=dropout,
                                         is_causal=True, scale=scaling, enable_gqa=key.shape[1] != H)
    return out.transpose(1, 2)[seg, off].reshape(B, T, H, -1)


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    if attention_mask is None and pos is not None and query.shape[2] == key.shape[2] > 1 \
            and getattr(module, "is_causal", True):
        return segment_attention(query, key, value, pos, dropout, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def sdpa_varlen_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None, **kwargs):
    """No mask for an unpadded forward without cache (the attention function derives the segments from
    position_ids); otherwise transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register ``sdpa_varlen`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
    return NAME
