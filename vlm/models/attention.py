"""Attention implementations by config, for the CLIP towers (and any nn.MultiheadAttention).

    sdpa               torch.nn.functional.scaled_dot_product_attention (default; flash/mem-efficient
                       kernels on GPUs)
    eager              explicit softmax(QK^T / sqrt(d)) V, the reference
    xformers           xformers.ops.memory_efficient_attention (GPU extra)
    flash_attention_2  flash_attn.flash_attn_func (GPU extra, fp16/bf16)

``set_attention(model, impl)`` swaps every nn.MultiheadAttention for ``DispatchMHA``, a subclass
with the same parameters (so state dicts, exports and checkpoints are unchanged) whose forward
routes through the chosen kernel. The text towers' causal mask (a float (T, T) mask, -inf above the
diagonal) is recognised and run as each kernel's own causal mode (sdpa ``is_causal``, xformers
``LowerTriangularMask``, flash-attention ``causal=True``); other masks are supported by sdpa and eager.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("sdpa", "eager", "xformers", "flash_attention_2")


def is_causal_mask(mask: Optional[torch.Tensor], t: int) -> bool:
    """Whether ``mask`` is the plain causal mask of length ``t``: float (T, T), -inf strictly above the
    diagonal and 0 elsewhere (what open_clip's text transformers pass), or bool (T, T) keeping the
    lower triangle. O(T^2) elementwise, negligible beside the attention itself."""
    if mask is None or mask.shape != (t, t):
        return False
    upper = torch.ones(t, t, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:  # True = keep
        return bool((mask == ~upper).all())
    return bool((mask[upper] == float("-inf")).all() and (mask[~upper] == 0).all())


def _gpu_extra(impl: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"attn_impl={impl} needs {module.split('.')[0]} (pip install -e .[gpu], CUDA only); "
                         "use attn_impl=sdpa (it runs flash kernels on GPUs)") from None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa",
              mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """q, k, v: (B, H, T, d) -> (B, H, T, d). mask: additive float (T, T) / (B, H, T, T), or bool (True = keep);
    ``causal``: causal attention without a mask (each kernel's own causal mode)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    if impl == "eager":
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if causal and mask is None:
            T = q.shape[-2]
            mask = ~torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(dim=-1) @ v
    if mask is not None:
        raise ValueError(f"attention impl {impl} runs unmasked or causal attention only; use sdpa for other masks")
    if impl == "xformers":
        xops = _gpu_extra(impl, "xformers.ops")
        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    if impl == "flash_attention_2":
        flash_attn = _gpu_extra(impl, "flash_attn")
        out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLS}")


class DispatchMHA(nn.MultiheadAttention):
    """nn.MultiheadAttention (self-attention, batch_first or not) with a selectable kernel.

    ``causal_tower``: this layer belongs to a text transformer whose mask is the causal one (checked once in
    set_attention), so a (T, T) mask it receives is causal without looking at its values (a check per call
    would cost a device-to-host sync in every layer)."""

    impl: str = "sdpa"
    causal_tower: bool = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or key is not query or value is not query or key_padding_mask is not None \
                or not self._qkv_same_embed_dim:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)  # (B, T, C)
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d)
        mask = attn_mask.to(q.dtype) if attn_mask is not None and attn_mask.dtype != torch.bool else attn_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = ~mask  # nn.MultiheadAttention: True = masked out; ours: True = keep
        square = mask is not None and mask.shape == (T, T)
        causal = is_causal or (square and (self.causal_tower or is_causal_mask(mask, T)))
        out = attention(q, k, v, self.impl, None if causal else mask, causal).transpose(1, 2).reshape(B, T, C)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def set_attention(model: nn.Module, impl: str) -> int:
    """Route every nn.MultiheadAttention of ``model`` through ``impl``; returns how many were set."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLS}")
    n = 0
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.__class__ = DispatchMHA
            m.impl = impl
            n += 1
    for owner in model.modules():  # open_clip text transformers: a causal attn_mask buffer beside .transformer
        mask, blocks = getattr(owner, "attn_mask", None), getattr(owner, "transformer", None)
        if isinstance(mask, torch.Tensor) and isinstance(blocks, nn.Module) and is_causal_mask(mask, mask.shape[-1]):
            for m in blocks.modules():
                if isinstance(m, DispatchMHA):
                    m.causal_tower = True
    return n
