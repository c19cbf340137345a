"""Conversations (LLaVA / LLaVA-Med format) -> token ids and labels, with only assistant turns
trained, image placeholders expanded, and sequence packing.

Prompts are rendered with the tokenizer's own chat template (``apply_chat_template``); the
``plain`` template (LLaVA's stage-1 format) is image tokens, then the caption, then EOS. Labels
are found by position, not by re-tokenising pieces: the rendered text is tokenised once with
character offsets, and a token is a label when it overlaps an assistant message's content (a
SentencePiece ``▁word`` token starts at the space before its word), plus the end-of-turn token the
template puts after it and any whitespace-only tokens between (Llama-2's ``answer </s>``).
Tested on every tokenizer kind (byte-level BPE, Metaspace BPE, Unigram) with templates of the
ChatML, Llama-3, Llama-2, Mistral, Gemma and Phi-3 shapes (vlm/models/tiny.py). An example whose assistant content cannot
be located in the rendered text is skipped with the reason ``masking_failed`` and counted, never
trained with an all-masked label row (LLaVA's silent "tokenization mismatch").

Shapes: an example is (T,) input ids and (T,) labels, -100 where no loss is taken. A packed row
holds several examples back to back: position ids restart at 0 for each, and ``seq_lens`` tells
the attention to stay inside each one (a block-diagonal causal mask on CPU, varlen kernels on GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

IGNORE = -100
IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SkipExample(ValueError):
    """A conversation that cannot be trained on; ``reason`` is counted by the data pipeline."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class ChatConfig:
    """How conversations become training rows."""

    template: str = "auto"  # auto: the tokenizer's chat template | plain: stage 1 (image + caption + EOS)
    max_length: int = 2048  # tokens per example, image tokens included
    overlong: str = "truncate"  # truncate | drop
    system_prompt: Optional[str] = None  # prepended as a system message when the data has none
    image_token: str = IMAGE_TOKEN

    def __post_init__(self):
        if self.template not in ("auto", "plain"):
            raise ValueError(f"chat.template must be auto or plain, got {self.template!r}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"chat.overlong must be truncate or drop, got {self.overlong!r}")
        if self.max_length < 8:
            raise ValueError("chat.max_length must be >= 8")


def normalize_conversation(conv: list[dict], num_images: int, image_token: str = IMAGE_TOKEN) -> list[dict]:
    """LLaVA turns ({"from", "value"}) -> chat messages ({"role", "content"}), validated.

    Raises SkipExample: unknown_role, empty_assistant_turn, no_assistant_turn, image_token_mismatch.
    """
    if not isinstance(conv, list) or not conv:
        raise SkipExample("bad_conversation", "not a non-empty list")
    messages, placeholders = [], 0
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value", turn.get("content")), str):
            raise SkipExample("bad_conversation", f"turn {i}")
        role = ROLES.get(str(turn.get("from", turn.get("role"))).lower())
        if role is None:
            raise SkipExample("unknown_role", f"turn {i}: {turn.get('from', turn.get('role'))!r}")
        content = turn.get("value", turn.get("content"))
        if role == "assistant" and not content.strip():
            raise SkipExample("empty_assistant_turn", f"turn {i}")
        if role == "assistant" and image_token in content:
            raise SkipExample("image_token_mismatch", f"turn {i}: an image token in an assistant turn")
        placeholders += content.count(image_token)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipExample("no_assistant_turn")
    if placeholders != num_images:
        raise SkipExample("image_token_mismatch", f"{placeholders} image tokens for {num_images} image(s)")
    return messages


def check_template(tokenizer, cfg: ChatConfig) -> None:
    """Fail before training when the tokenizer cannot render conversations."""
    if cfg.template == "auto" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template and none was given: set chat.template=plain for "
                         "stage 1, or give the tokenizer a chat_template (tokenizer_config.json)")
    if tokenizer.convert_tokens_to_ids(cfg.image_token) in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {cfg.image_token!r} token: add it as a special token "
                         "(tokenizer.add_special_tokens({'additional_special_tokens': ['<image>']}))")


def encode(messages: list[dict], tokenizer, cfg: ChatConfig, image_seq_len: int) -> tuple[list[int], list[int]]:
    """Messages -> (input_ids, labels) with each image token repeated ``image_seq_len`` times."""
    image_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
    eos = tokenizer.eos_token_id
    if cfg.template == "plain":  # LLaVA stage 1: <image> tokens, the first answer, EOS
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        text_ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        images = sum(m["content"].count(cfg.image_token) for m in messages)
        ids = [image_id] * images + text_ids
        labels = [IGNORE] * images + list(text_ids)
    else:
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}] + messages

        def render(msgs, generation_prompt):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

        text, spans = assistant_spans(messages, render)
        ids, labels = label_tokens(text, spans, tokenizer)
    return expand_images(ids, labels, image_id, image_seq_len)


def assistant_spans(messages: list[dict], render) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant answer in it.

    ``render(messages, add_generation_prompt) -> text`` is the template (a tokenizer's or a processor's)."""
    text = render(messages, False)
    spans, cursor = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # where the template starts this answer: the rendered prefix with a generation prompt
        # (searching the whole text could match inside a header, e.g. the 'a' of 'assistant')
        prefix = render(messages[:k], True)
        start = len(prefix) if text.startswith(prefix) else cursor
        content = message_text(m).strip()
        at = text.find(content, max(start, cursor))
        if at < 0 or (text.startswith(prefix) and text[start:at].strip()):
            raise SkipExample("masking_failed", "assistant content not found where the template puts it")
        spans.append((at, at + len(content)))
        cursor = at + len(content)
    return text, spans


def message_text(m: dict) -> str:
    """A message's text: its content string, or the text items of a content list."""
    c = m["content"]
    return c if isinstance(c, str) else "".join(i.get("text", "") for i in c if i.get("type") == "text")


def label_tokens(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenise ``text`` once with character offsets; the tokens of each answer span and the end-of-turn
    token after it are labels, everything else IGNORE."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # an unknown character ends no turn
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        # every token carrying a character of the answer: SentencePiece-style tokens ('▁Yes') start at
        # the space before the word, so a token need only overlap the answer, not lie inside it
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s]
        if not inside:
            raise SkipExample("masking_failed", "an assistant turn has no token of its own")
        for i in inside:
            labels[i] = ids[i]
        # the template's end-of-turn token teaches the model to stop; whitespace the template puts
        # before it (Llama-2's 'answer </s>') is part of what the model must produce to get there
        j, gap = inside[-1] + 1, []
        while j < len(ids) and ids[j] not in special and not text[offsets[j][0]:offsets[j][1]].strip():
            gap.append(j)
            j += 1
        if j < len(ids) and ids[j] in special:
            for i in (*gap, j):
                labels[i] = ids[i]
    return ids, labels


def expand_images(ids: list[int], labels: list[int], image_id: int, n: int) -> tuple[list[int], list[int]]:
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels):
        if t == image_id:
            out_ids += [image_id] * n
            out_labels += [IGNORE] * n
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


def fit_length(ids: list[int], labels: list[int], cfg: ChatConfig, image_id: int) -> tuple[list[int], list[int]]:
    """Truncate or drop an over-long example. Truncation never leaves an image without all of its tokens
    (its pixels would have no placeholders, or too few): an example whose cut would remove any image token
    is skipped as ``truncation_cuts_image``."""
    if len(ids) <= cfg.max_length:
        return ids, labels
    if cfg.overlong == "drop":
        raise SkipExample("too_long", f"{len(ids)} > {cfg.max_length} tokens")
    cut = cfg.max_length
    if image_id in ids[cut:]:
        raise SkipExample("truncation_cuts_image", f"{len(ids)} tokens cut at {cut} would drop image tokens")
    labels = labels[:cut]
    if all(x == IGNORE for x in labels):
        raise SkipExample("too_long", "no answer token left after truncation")
    return ids[:cut], labels


# ------------------------------------------------------------------------------------------
# Packing


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[dict]:
    """First-fit-decreasing packing into as few rows of at most ``max_len`` tokens as it finds.

    Each row: input_ids (T,), labels (T,), position_ids (T,) restarting per example (which is how the
    attention functions find the examples: vlm/models/varlen.py, flash-attention's varlen path, or
    transformers' packed mask for eager), seq_lens, and index (which examples, in row order).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i][0])
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {max_len}")
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([])
            room.append(max_len)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
    out = []
    for row in rows:
        row.sort()  # the stream's order inside a row
        out.append({
            "input_ids": torch.tensor([t for i in row for t in examples[i][0]]),
            "labels": torch.tensor([t for i in row for t in examples[i][1]]),
            "position_ids": torch.tensor([p for i in row for p in range(len(examples[i][0]))]),
            "seq_lens": [len(examples[i][0]) for i in row],
            "index": row,
        })
    return out


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) that end an assistant turn in the tokenizer's chat template (plus EOS): what
    generation must stop on. Found by rendering a one-turn conversation."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        marker = "zqxjv"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that rejects this shape: EOS only
            return ids
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        end = text.find(marker) + len(marker)
        special = set(tokenizer.all_special_ids)
        for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            if a >= end:
                if t in special and t not in ids:
                    ids.append(t)
                break
    return ids
