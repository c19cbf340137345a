"""Conversations -> training rows for a stock VLM, through its own processor.

The processor does what only it knows (how many tokens an image becomes, which pixel tensors go with
them: Qwen2-VL's flattened patches + ``image_grid_thw``, LLaVA-NeXT's tiles + ``image_sizes``, Idefics3's
tiles + ``pixel_attention_mask``, Gemma 3's ``token_type_ids``); labels come from the processor's chat
template, found by character position exactly as for the LLaVA assembly (vlm/data/chat.py
``assistant_spans`` / ``label_tokens``: the answer tokens and the template's end-of-turn token). The
rendered text is tokenised twice, once plain (labels by offsets) and once by the processor (image
placeholders expanded); the two token lists are aligned (they differ only where images were expanded)
and the labels carried over. A label that cannot be carried over is a ``masking_failed`` skip, never a
silently shifted mask.

Shapes: an example holds ``input_ids`` / ``labels`` (T,), per-token fields (``token_type_ids``,
``mm_token_type_ids``: (T,)) and image tensors as the processor returns them for one conversation.
Batches (``StockCollate``): padded rows with an attention mask, or packed rows (several conversations per
row, no mask, ``seq_lens`` per row so the step can compute each conversation's positions: restarting
1-D positions, or the model's own 3-D mRoPE positions per conversation, vlm/models/stock.py).
"""
from __future__ import annotations

from difflib import SequenceMatcher
import torch

from vlm.data.chat import IGNORE, ChatConfig, SkipExample, assistant_spans, label_tokens

TOKEN_FIELDS = ("token_type_ids", "mm_token_type_ids")  # per-token processor outputs


def to_items(messages: list[dict], image_token: str) -> list[dict]:
    """Our messages (content strings with ``image_token`` placeholders) -> content lists of
    {"type": "image"} / {"type": "text"} items, as processors' chat templates take them. The newline
    LLaVA data puts after ``<image>`` is dropped: each template places its own separators."""
    out = []
    for m in messages:
        parts = m["content"].split(image_token)
        items = [{"type": "text", "text": parts[0]}] if parts[0].strip() else []
        for text in parts[1:]:
            items.append({"type": "image"})
            text = text[1:] if text.startswith("\n") else text
            if text.strip():
                items.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": items or [{"type": "text", "text": ""}]})
    return out


def renderer(processor):
    def render(msgs, generation_prompt):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    return render


def carry_labels(plain: list[int], labels: list[int], full: list[int], special=()) -> tuple[list[int], list[bool]]:
    """Labels of ``plain`` tokens -> labels of ``full`` (the processor's tokens), and which ``full``
    tokens came from image expansion. Raises masking_failed if a label token has no counterpart."""
    out, expanded = [IGNORE] * len(full), [True] * len(full)
    carried = 0
    for a, b, n in SequenceMatcher(None, plain, full, autojunk=False).get_matching_blocks():
        for k in range(n):
            out[b + k] = labels[a + k]
            expanded[b + k] = False
            carried += labels[a + k] != IGNORE
    if carried != sum(x != IGNORE for x in labels):
        raise SkipExample("masking_failed", "answer tokens changed when the processor expanded the images")
    # the placeholder itself may have been matched to one of its copies: every special token the
    # expansion wrote (image pads, begin/end of image, tile markers) belongs to an image
    marks = {t for t, e in zip(full, expanded) if e} & set(special)
    return out, [e or t in marks for t, e in zip(full, expanded)]


def encode_stock(messages: list[dict], images: list, processor, cfg: ChatConfig) -> dict:
    """Messages (ours, with ``cfg.image_token`` placeholders) + PIL images -> one training example."""
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}] + messages
    items = to_items(messages, cfg.image_token)
    text, spans = assistant_spans(items, renderer(processor))
    plain, labels = label_tokens(text, spans, processor.tokenizer)
    # the template writes BOS where the family wants it: the tokenizer must not add another
    try:
        enc = processor(text=[text], images=[images] if images else None, add_special_tokens=False,
                        return_tensors="pt")
    except (ValueError, RuntimeError, TypeError) as e:  # e.g. Qwen2-VL refuses aspect ratios beyond 200
        raise SkipExample("image_rejected", f"the processor rejected an image: {e}") from None
    full = enc["input_ids"][0].tolist()
    labels, expanded = carry_labels(plain, labels, full, processor.tokenizer.all_special_ids)
    ex = {"input_ids": full, "labels": labels, "expanded": expanded,
          "tokens": {k: enc[k][0].tolist() for k in TOKEN_FIELDS if k in enc},
          "images": {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", *TOKEN_FIELDS)}}
    return fit_stock(ex, cfg)


def fit_stock(ex: dict, cfg: ChatConfig) -> dict:
    """Truncate or drop an over-long example; a cut may never remove a token of an image."""
    n = len(ex["input_ids"])
    if n <= cfg.max_length:
        return ex
    if cfg.overlong == "drop":
        raise SkipExample("too_long", f"{n} > {cfg.max_length} tokens")
    cut = cfg.max_length
    if any(ex["expanded"][cut:]):
        raise SkipExample("truncation_cuts_image", f"{n} tokens cut at {cut} would drop image tokens")
    if all(x == IGNORE for x in ex["labels"][:cut]):
        raise SkipExample("too_long", "no answer token left after truncation")
    return {**ex, "input_ids": ex["input_ids"][:cut], "labels": ex["labels"][:cut], "expanded": ex["expanded"][:cut],
            "tokens": {k: v[:cut] for k, v in ex["tokens"].items()}}


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding every other dim to the largest (LLaVA-NeXT's tile counts,
    Idefics3's image counts per conversation differ; both models drop all-zero padding images)."""
    if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), *shape))
    at = 0
    for t in tensors:
        out[(slice(at, at + t.shape[0]), *[slice(0, s) for s in t.shape[1:]])] = t
        at += t.shape[0]
    return out


def merge_images(examples: list[dict]) -> dict:
    keys = [k for k in examples[0]["images"]] if examples else []
    with_images = [ex for ex in examples if ex["images"]]
    if with_images and len(with_images) != len(examples):
        raise ValueError("a batch mixes conversations with and without images")
    return {k: cat_padded([ex["images"][k] for ex in examples]) for k in keys}


class StockCollate:
    """Examples -> a batch for a stock VLM: padded rows (attention mask; with ``group_size``, length-sorted
    groups of that many, each its own forward), or packed rows of at most ``max_len`` tokens (first-fit
    decreasing, ``seq_lens`` per row, no mask)."""

    def __init__(self, packing: bool, max_len: int, pad_id: int, group_size: int = 0):
        self.packing, self.max_len, self.pad_id, self.group_size = packing, max_len, pad_id, group_size

    def __call__(self, examples: list[dict]) -> dict:
        if not self.packing and 0 < self.group_size < len(examples):  # length-grouped padded forwards
            order = sorted(examples, key=lambda ex: len(ex["input_ids"]))
            groups = [self._padded(order[i:i + self.group_size]) for i in range(0, len(order), self.group_size)]
            return {"keys": [ex.get("key") for ex in examples], "groups": groups}
        return self._packed(examples) if self.packing else self._padded(examples)

    def _rows(self, groups: list[list[dict]], packed: bool) -> dict:
        width = max(sum(len(ex["input_ids"]) for ex in g) for g in groups)
        ids = torch.full((len(groups), width), self.pad_id)
        labels = torch.full((len(groups), width), IGNORE)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        fields = sorted({k for g in groups for ex in g for k in ex["tokens"]})
        tokens = {k: torch.zeros((len(groups), width), dtype=torch.long) for k in fields}
        for i, g in enumerate(groups):
            at = 0
            for ex in g:
                n = len(ex["input_ids"])
                ids[i, at:at + n], labels[i, at:at + n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"])
                mask[i, at:at + n] = 1
                for k in fields:
                    tokens[k][i, at:at + n] = torch.tensor(ex["tokens"][k])
                at += n
        order = [ex for g in groups for ex in g]  # images in the order of their placeholders
        batch = {"keys": [ex.get("key") for ex in order], "input_ids": ids, "labels": labels, **tokens,
                 **merge_images(order)}
        if packed:
            batch["seq_lens"] = [[len(ex["input_ids"]) for ex in g] for g in groups]
        else:
            batch["attention_mask"] = mask
        return batch

    def _padded(self, examples: list[dict]) -> dict:
        return self._rows([[ex] for ex in examples], packed=False)

    def _packed(self, examples: list[dict]) -> dict:
        from vlm.data.chat import pack

        rows = pack([(ex["input_ids"], ex["labels"]) for ex in examples], self.max_len)
        return self._rows([[examples[i] for i in r["index"]] for r in rows], packed=True)


def packed_positions(model, batch: dict) -> torch.Tensor:
    """Position ids of packed rows: each conversation's own positions, concatenated.

    1-D models: 0..n-1 per conversation (B, T). Models with 3-D mRoPE (a ``get_rope_index``: Qwen2-VL,
    Qwen2.5-VL): the model's own function on each conversation alone (its images' grids), concatenated,
    with the restarting 1-D text positions on top as transformers expects for packed rows: (4, B, T)."""
    ids = batch["input_ids"]
    B, T = ids.shape
    text = torch.zeros((B, T), dtype=torch.long)
    for i, lens in enumerate(batch["seq_lens"]):
        at = 0
        for n in lens:
            text[i, at:at + n] = torch.arange(n)
            at += n
        text[i, at:] = torch.arange(T - at)  # the padding tail is one more segment of its own
    rope = getattr(getattr(model, "model", None), "get_rope_index", None)
    if rope is None:
        return text
    grid = batch.get("image_grid_thw")
    pos = torch.zeros((3, B, T), dtype=torch.long)
    g = 0  # next image grid row
    for i, lens in enumerate(batch["seq_lens"]):
        at = 0
        for n in [*lens, T - sum(lens)]:
            if n == 0:
                continue
            seg = ids[i:i + 1, at:at + n]
            tt = batch.get("mm_token_type_ids")
            tt = tt[i:i + 1, at:at + n] if tt is not None else torch.zeros_like(seg)
            n_img = _images_in(seg, model, grid, g) if grid is not None else 0
            p, _ = rope(seg.to(grid.device if grid is not None else seg.device), mm_token_type_ids=tt,
                        image_grid_thw=grid[g:g + n_img] if n_img else None)
            pos[:, i, at:at + n] = p[:, 0].to(pos)
            g += n_img
            at += n
    return torch.cat([text[None], pos])


def _images_in(seg: torch.Tensor, model, grid: torch.Tensor, g: int) -> int:
    """How many images (rows of image_grid_thw from ``g`` on) a conversation's image tokens hold."""
    merge = model.config.vision_config.spatial_merge_size ** 2
    tokens = int((seg == model.config.image_token_id).sum())
    n = 0
    while tokens > 0:
        tokens -= int(grid[g + n].prod()) // merge
        n += 1
    if tokens != 0:
        raise ValueError("image tokens of a packed conversation do not match its image grids")
    return n


def packed_block_masks(model, batch: dict):
    """Attention masks for packed rows of a model whose image tokens attend to each other both ways
    (``token_type_ids``: Gemma 3): transformers' packed-sequence mask indexes the image blocks by position
    inside each conversation instead of by place in the row (a later conversation's text then sees
    ahead wherever an earlier image block sat), so the masks are built here: (B, 1, T, T) bool, True =
    attend, per layer type: same conversation, causal or the same image block, and inside the sliding
    window for sliding layers. Boolean for sdpa, additive float (0 / the float minimum) for eager; varlen
    kernels (flash attention) cannot express image blocks: an error. -> {"full_attention": ...,
    "sliding_attention": ...}, or None for models without image blocks (their masks come from the positions)."""
    tt = batch.get("token_type_ids")
    if tt is None:
        return None
    impl = getattr(model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "sdpa_varlen", "eager"):  # (sdpa_varlen: stock SDPA whenever a mask is given)
        raise ValueError(f"packing a model whose image tokens attend both ways (token_type_ids) needs "
                         f"model.attn_impl sdpa or eager, not {impl}: its varlen kernels are causal only; set "
                         "model.attn_impl=sdpa or packing=false")
    B, T = tt.shape
    seg = torch.zeros((B, T), dtype=torch.long)
    for i, lens in enumerate(batch["seq_lens"]):
        at = 0
        for k, n in enumerate(lens):
            seg[i, at:at + n] = k
            at += n
        seg[i, at:] = len(lens)  # the padding tail: a segment of its own
    is_img = tt == 1
    start = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
    block = torch.where(is_img, torch.cumsum(start.long(), 1), -1)  # (B, T): image block id or -1
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same = seg[:, :, None] == seg[:, None, :]
    both = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    full = same & ((kv <= q) | both)
    out = {"full_attention": full[:, None]}
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if window:
        out["sliding_attention"] = (full & (q - kv < window))[:, None]
    if impl == "eager":  # eager attention adds its mask to the scores: 0 where attended, the float minimum elsewhere
        lowest = torch.finfo(torch.float32).min
        out = {k: torch.zeros(m.shape).masked_fill_(~m, lowest) for k, m in out.items()}
    return out
