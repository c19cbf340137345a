"""Batched generation for the assistant: KV cache, left padding, greedy by default.

    answers = generate(model, tokenizer, requests, batch_size=16, max_new_tokens=64)

A request is {"input_ids": [...prompt ids, image tokens expanded...], "pixel_values": (3, S, S) or
None}. Prompts are left-padded so every row's next token sits at the same position; the model's
own ``generate`` keeps the KV cache and derives position ids from the attention mask, so a batch
gives the same greedy answers as one request at a time (tested). Sampling (``do_sample``) is
seeded per call.
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def generate(model, tokenizer, requests: list[dict], batch_size: int = 16, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             device: Optional[torch.device] = None) -> list[str]:
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    configured = getattr(model.generation_config, "eos_token_id", None)
    eos = sorted({t for t in [tokenizer.eos_token_id, *_as_list(configured)] if t is not None})
    model.eval()
    out: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):  # left padding
            n = len(r["input_ids"])
            ids[i, width - n:] = torch.tensor(r["input_ids"])
            mask[i, width - n:] = 1
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "max_new_tokens": max_new_tokens,
                  "do_sample": do_sample, "pad_token_id": pad, "eos_token_id": eos or None}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
            torch.manual_seed(seed + start)
        pixels = [r.get("pixel_values") for r in chunk]
        if any(p is not None for p in pixels):
            if any(p is None for p in pixels):
                raise ValueError("a batch mixes requests with and without images; batch them separately")
            kwargs["pixel_values"] = torch.stack(pixels).to(device, dtype=next(model.parameters()).dtype)
        seqs = model.generate(**kwargs)
        for row in seqs[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
