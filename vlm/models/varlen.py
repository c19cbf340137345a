"""Packed-sequence ("varlen") attention for Hugging Face decoder LLMs on any device.

Packed rows hold several conversations one after the other; their ``position_ids`` restart at each
conversation. ``flash_attention_2`` reads those restarts itself (cu_seqlens). For ``sdpa`` the stock
transformers path builds a dense (T, T) block-diagonal mask and pays attention over the whole row;
this module registers ``sdpa_varlen``, an attention function that instead regroups the row's tokens
into batches of segments of similar length and runs causal SDPA on each: cost close to the sum of
squares of the segment lengths, not the row length squared, and the fused causal kernels stay usable.

Everything that is not a packed/unpadded training forward (a padding mask, a KV cache, one query
token) goes to transformers' own SDPA function unchanged, so ``sdpa_varlen`` is ``sdpa`` plus
packing. The name is registered with transformers' AttentionInterface / AttentionMaskInterface and
never written to a saved config (transformers drops the implementation from config.json).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def segment_starts(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> (flat index of each segment's first token, each segment's length).

    A segment starts at every row start and wherever a position is not the previous one + 1."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts = torch.nonzero(start.reshape(-1)).flatten()
    return starts, torch.diff(starts, append=torch.tensor([start.numel()], device=starts.device))


def length_groups(lengths: list[int], ratio: float = 1.5) -> list[list[int]]:
    """Segment ids grouped by similar length (each group's longest <= ratio x its shortest), so that
    padding each group to its own longest keeps the attention cost near sum(L^2)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or lengths[order[i]] > ratio * lengths[order[start]]:
            groups.append(order[start:i])
            start = i
    return groups


def segment_attention(query, key, value, position_ids, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """q (B, H, T, d), k/v (B, Hkv, T, d) -> (B, T, H, d), causal attention inside each segment only.

    Segments of similar length are batched together (``length_groups``), each group padded at the
    end to its longest: a padded tail only sees real keys before it (causal), so no mask is needed."""
    B, H, T, D = query.shape
    N = B * T
    starts, lengths = segment_starts(position_ids.expand(B, -1))
    flat = [torch.cat([x.transpose(1, 2).reshape(N, x.shape[1], x.shape[-1]),
                       x.new_zeros(1, x.shape[1], x.shape[-1])]) for x in (query, key, value)]  # row N: zeros
    outs, where = [], []
    for g in length_groups(lengths.tolist()):
        g = torch.tensor(g, device=starts.device)
        n, L = lengths[g], int(lengths[g].max())
        steps = torch.arange(L, device=starts.device)
        idx = torch.where(steps < n[:, None], starts[g][:, None] + steps, N)  # (segments, L); N = padding
        q, k, v = (x[idx].transpose(1, 2) for x in flat)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=k.shape[1] != H).transpose(1, 2)  # (segments, L, H, d)
        valid = idx < N
        outs.append(o[valid])
        where.append(idx[valid])
    where = torch.cat(where)
    inverse = torch.empty_like(where)
    inverse[where] = torch.arange(N, device=where.device)
    return torch.cat(outs)[inverse].reshape(B, T, H, -1)


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
