"""Preference pairs packed for the LLaVA assembly: a pair's chosen and rejected conversations in one row,
attention kept inside each, and the pair's images encoded once.

A row is ``chosen tokens | rejected tokens | padding``; position ids restart at each part (the padding tail
is a segment of its own), so ``sdpa_varlen`` (vlm/models/varlen.py, or flash-attention's varlen kernels)
keeps each conversation's attention to itself: row logits equal those of two separate padded rows. The
vision tower and projector see each pair's images once; ``encode_once`` hands the features to the
placeholders of both parts (the gradient of both uses adds up on the one encoding). Saves the padding of
two rows of different lengths and one of the two vision passes per pair.

Stock VLMs keep padded rows (train.preference): their processors and position schemes (Qwen2-VL's 3-D
mRoPE, Gemma 3's bidirectional image blocks) would each need their own packing of pairs.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from vlm.data.chat import IGNORE

_STATE = threading.local()


def install_encode_once(model) -> bool:
    """Let a LLaVA model (``model.model.get_image_features`` returning one feature tensor per image in
    ``pooler_output``) encode each image once while ``encode_once(index)`` is active: the features of image
    ``index[j]`` go to the j-th image placeholder. Returns False for a model without that method."""
    inner = getattr(model, "model", None)
    original = getattr(inner, "get_image_features", None)
    if original is None or getattr(original, "_encode_once", False):
        return original is not None

    def get_image_features(*args, **kwargs):
        out = original(*args, **kwargs)
        index = getattr(_STATE, "index", None)
        if index is not None:
            feats = out.pooler_output  # [(image_seq_len, hidden)] per image encoded
            out.pooler_output = [feats[i] for i in index]
        return out

    get_image_features._encode_once = True
    inner.get_image_features = get_image_features
    return True


@contextlib.contextmanager
def encode_once(index: list[int] | None):
    _STATE.index = index
    try:
        yield
    finally:
        _STATE.index = None


class PackedPairCollate:
    """Pairs (train.preference.PairSample) -> one row per pair: input_ids / position_ids (P, T), the labels of
    each side (``chosen_labels``, ``rejected_labels``: IGNORE outside it), pixel_values of each pair's
    images once, and ``image_index``: the image of every placeholder block in row order."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, pairs: list[dict]) -> dict:
        width = max(len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs)
        P = len(pairs)
        ids = torch.full((P, width), self.pad_id)
        pos = torch.zeros((P, width), dtype=torch.long)
        side = {k: torch.full((P, width), IGNORE) for k in ("chosen", "rejected")}
        images, index = [], []
        for i, p in enumerate(pairs):
            c, r = p["chosen"], p["rejected"]
            nc, nr = len(c["input_ids"]), len(r["input_ids"])
            ids[i, :nc], ids[i, nc:nc + nr] = torch.as_tensor(c["input_ids"]), torch.as_tensor(r["input_ids"])
            pos[i, :nc], pos[i, nc:nc + nr] = torch.arange(nc), torch.arange(nr)
            pos[i, nc + nr:] = torch.arange(width - nc - nr)  # the padding tail: one more segment
            side["chosen"][i, :nc] = torch.as_tensor(c["labels"])
            side["rejected"][i, nc:nc + nr] = torch.as_tensor(r["labels"])
            if len(c["pixel_values"]) != len(r["pixel_values"]):
                raise ValueError(f"pair {p['key']}: chosen and rejected have different images")
            base = len(images)
            images += list(c["pixel_values"])
            k = len(c["pixel_values"])
            index += [base + j for j in range(k)] * 2  # the chosen part's placeholders, then the rejected part's
        return {"input_ids": ids, "position_ids": pos, "chosen_labels": side["chosen"],
                "rejected_labels": side["rejected"], "pixel_values": torch.stack(images), "image_index": index,
                "pairs": P, "keys": [p["key"] for p in pairs], "packed_pairs": True}


def packed_pair_logps(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (summed log-probabilities, label counts), each (2P,) ordered [chosen..., rejected...] as the padded
    layout gives them."""
    from vlm.preference import token_logps

    inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "pixel_values")}
    with encode_once(batch["image_index"]):
        logits = model(**inputs, use_cache=False).logits
    lps, ns = [], []
    for key in ("chosen_labels", "rejected_labels"):
        labels = batch[key].to(device)
        lps.append(token_logps(logits, labels).sum(1))
        ns.append((labels[:, 1:] != IGNORE).sum(1))
    return torch.cat(lps), torch.cat(ns)
