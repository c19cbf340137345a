"""The batched generation engine (KV cache, left padding), shared by evaluation and by training that samples
(GRPO): the assistant assembly's ``generate`` and a stock VLM's ``generate_stock``, and how a question is
rendered into a generation prompt for each (``prompt_ids``, ``stock_prompt``), so that a model is trained on
the prompts it is evaluated on.

    answers = generate(model, tokenizer, requests, batch_size=16, max_new_tokens=64)

A request is {"input_ids": [...prompt ids, image tokens expanded...], "pixel_values": (3, S, S), (k, 3, S, S)
for k images, or None}. Prompts are left-padded so every row's next token sits at the same position; the model's
own ``generate`` keeps the KV cache and derives position ids from the attention mask, so a batch
gives the same greedy answers as one request at a time (tested). Greedy by default; sampling
(``do_sample``, temperature, top-p; the checkpoint's top_k and repetition penalty off) seeds the global RNG
with ``seed`` + the chunk's first index before each chunk (a caller that must not disturb its own RNG
stream wraps the call in ``torch.random.fork_rng``). The model's image placeholder token is never generated
(``placeholder_ids``).
``return_ids``: each answer as its generated token ids, up to and including the first stop token (what a
policy-gradient loss scores), instead of the decoded text. ``synced_gpus``: under FSDP2 every rank must run
the same number of forwards (each all-gathers the sharded weights), so a rank whose rows all stopped keeps
stepping until every rank's have; each rank must also make the same number of calls with the same number
of chunks (the caller's job: one chunk per call, ``batch_size`` >= the number of requests), and transformers
runs the image encoder before the first forward, outside the FSDP2 root's hooks, so the caller gathers the root
unit's parameters around the call (train/grpo.py ``root_unsharded``).
"""
from __future__ import annotations

from typing import Optional

import torch

# sampling draws from the model's own distribution at the given temperature and top-p only: a checkpoint's
# generation_config may carry top_k (Qwen2-VL's: 1, which makes "sampling" greedy) or a repetition penalty, and a
# policy-gradient loss assumes the answers were drawn from the policy it scores
PURE_SAMPLING = {"top_k": 0, "repetition_penalty": 1.0}


def placeholder_ids(model) -> list[int]:
    """The model's image/video placeholder tokens: never an answer token (a sampled one would also break a
    training forward on the answer, which expects one image feature per placeholder), so generation
    suppresses them."""
    cfg = model.config
    return sorted({t for k in ("image_token_id", "image_token_index", "video_token_id")
                   if isinstance(t := getattr(cfg, k, None), int) and t >= 0})


def prompt_ids(tokenizer, text: str, image_token: str, image_seq_len: int, n_images: int = 1) -> list[int]:
    """The assembly's generation prompt for ``n_images`` images and ``text``: one user turn (the image token and
    a newline per image, then the text; ``n_images`` 0: the text alone, for text-only questions and a bare LLM)
    rendered by the tokenizer's chat template with the generation prompt, each image token expanded to
    ``image_seq_len`` copies (the vision tower's patch count). A tokenizer without a chat template (a base LLM)
    gets the text and a newline."""
    content = "".join(image_token + "\n" for _ in range(n_images)) + text
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": content}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(content + "\n")["input_ids"]
    if not n_images:
        return list(ids)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    return [t for t0 in ids for t in ([t0] * image_seq_len if t0 == image_id else [t0])]


def stock_prompt(processor, text: str, n_images: int = 1) -> str:
    """``n_images`` images (0: none) and the question, rendered by the processor's chat template with the
    generation prompt."""
    msgs = [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def decode_answer(tokenizer, ids) -> str:
    """Generated token ids -> the answer text (special tokens dropped, stripped): what eval writes and scores."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _completions(rows: torch.Tensor, eos: list[int]) -> list[list[int]]:
    """Generated rows (N, T) -> each row's tokens up to and including its first stop token (all T if none:
    the answer ran out of max_new_tokens); the padding after a finished row is dropped."""
    out = []
    for row in rows.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        out.append(row[:end + 1])
    return out


@torch.no_grad()
def generate(model, tokenizer, requests: list[dict], batch_size: int = 16, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             device: Optional[torch.device] = None, synced_gpus: bool = False,
             return_ids: bool = False) -> list[str] | list[list[int]]:
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from vlm.data.chat import end_of_turn_ids

    configured = getattr(model.generation_config, "eos_token_id", None)
    eos = sorted({t for t in [*end_of_turn_ids(tokenizer), *_as_list(configured)] if t is not None})
    was_training = model.training
    model.eval()
    out: list = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):  # left padding
            n = len(r["input_ids"])
            ids[i, width - n:] = torch.as_tensor(r["input_ids"])
            mask[i, width - n:] = 1
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                  **_options(model, max_new_tokens, pad, eos, synced_gpus, do_sample, temperature, top_p, seed + start)}
        pixels = [r.get("pixel_values") for r in chunk]
        if any(p is not None for p in pixels):
            if any(p is None for p in pixels):
                raise ValueError("a batch mixes requests with and without images; batch them separately")
            # one image (3, S, S) or several (k, 3, S, S) per request, concatenated in request order: the model
            # fills the prompts' image-token blocks in that order
            kwargs["pixel_values"] = torch.cat([p if p.dim() == 4 else p.unsqueeze(0) for p in pixels]).to(
                device, dtype=next(model.parameters()).dtype)
        seqs = model.generate(**kwargs)
        if return_ids:
            out += _completions(seqs[:, width:], eos)
        else:
            out += [decode_answer(tokenizer, row) for row in seqs[:, width:]]
    model.train(was_training)
    return out


@torch.no_grad()
def generate_stock(model, processor, prompts: list[str], images: list[list], batch_size: int = 16,
                   max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int = 0, device: Optional[torch.device] = None, synced_gpus: bool = False,
                   return_ids: bool = False) -> list[str] | list[list[int]]:
    """Batched generation for a stock VLM: ``prompts`` rendered by its processor's chat template (image
    placeholders not expanded; ``stock_prompt``), ``images`` a list of PIL images per prompt. The processor
    expands the placeholders and builds the image tensors of the whole batch; prompts are left-padded, and the
    model's own ``generate`` derives positions from the attention mask (3-D mRoPE included), so a batch gives
    the answers of one prompt at a time (tested per family). Sampling, ``synced_gpus`` and ``return_ids`` as
    for ``generate``."""
    from vlm.models.stock import stop_token_ids

    device = device or next(model.parameters()).device
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = stop_token_ids(model, processor)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    out: list = []
    for start in range(0, len(prompts), batch_size):
        texts, imgs = prompts[start:start + batch_size], images[start:start + batch_size]
        if any(imgs) and not all(imgs):
            raise ValueError("a batch mixes requests with and without images; batch them separately")
        inputs = processor(text=texts, images=imgs if any(imgs) else None, padding=True, padding_side="left",
                           add_special_tokens=False, return_tensors="pt")
        inputs = {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        kwargs = _options(model, max_new_tokens, pad, eos, synced_gpus, do_sample, temperature, top_p, seed + start)
        seqs = model.generate(**inputs, **kwargs)
        width = inputs["input_ids"].shape[1]
        if return_ids:
            out += _completions(seqs[:, width:], eos)
        else:
            out += [decode_answer(tok, row) for row in seqs[:, width:]]
    model.train(was_training)
    return out


def _options(model, max_new_tokens: int, pad: int, eos: list[int], synced_gpus: bool, do_sample: bool,
             temperature: float, top_p: float, seed: int) -> dict:
    """``model.generate``'s keyword arguments (both engines); sampling seeds the global RNG with ``seed``."""
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad, "eos_token_id": eos or None}
    if placeholder_ids(model):
        kwargs["suppress_tokens"] = placeholder_ids(model)
    if synced_gpus:
        kwargs["synced_gpus"] = True
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, **PURE_SAMPLING)
        torch.manual_seed(seed)
    return kwargs


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
