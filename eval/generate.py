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
    from vlm.data.chat import end_of_turn_ids

    configured = getattr(model.generation_config, "eos_token_id", None)
    eos = sorted({t for t in [*end_of_turn_ids(tokenizer), *_as_list(configured)] if t is not None})
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


@torch.no_grad()
def generate_stock(model, processor, prompts: list[str], images: list[list], batch_size: int = 16,
                   max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int = 0, device: Optional[torch.device] = None) -> list[str]:
    """Batched generation for a stock VLM: ``prompts`` rendered by its processor's chat template (image
    placeholders not expanded), ``images`` a list of PIL images per prompt. The processor expands the
    placeholders and builds the image tensors of the whole batch; prompts are left-padded, and the model's
    own ``generate`` derives positions from the attention mask (3-D mRoPE included), so a batch gives the
    answers of one prompt at a time (tested per family)."""
    from vlm.models.stock import stop_token_ids

    device = device or next(model.parameters()).device
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = stop_token_ids(model, processor)
    dtype = next(model.parameters()).dtype
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts, imgs = prompts[start:start + batch_size], images[start:start + batch_size]
        if any(imgs) and not all(imgs):
            raise ValueError("a batch mixes requests with and without images; batch them separately")
        inputs = processor(text=texts, images=imgs if any(imgs) else None, padding=True, padding_side="left",
                           add_special_tokens=False, return_tensors="pt")
        inputs = {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad,
                  "eos_token_id": eos or None}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
            torch.manual_seed(seed + start)
        seqs = model.generate(**inputs, **kwargs)
        width = inputs["input_ids"].shape[1]
        out += [tok.decode(row, skip_special_tokens=True).strip() for row in seqs[:, width:]]
    return out


def init_distributed():
    """Generation under torchrun: each rank answers its share (answer_file); gloo on CPUs, NCCL on GPUs."""
    import datetime

    import torch.distributed as dist

    from vlm.utils import torchrun_env

    d = torchrun_env()
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return d


def processor_settings(pairs: Optional[list[str]]) -> dict:
    """``--processor KEY=VALUE`` arguments -> image processor settings (numbers parsed, e.g.
    ``--processor max_pixels=1003520`` for Qwen2-VL's dynamic resolution)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--processor takes KEY=VALUE, got {pair!r}")
        try:
            import json

            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def answer_with(checkpoint, assistant, items: list[tuple], out, id_key: str, batch_size: int,
                max_new_tokens: int, desc: str, processor: Optional[dict] = None) -> tuple[int, int]:
    """The generate commands' shared path: join torchrun's ranks (if any), load the assistant unless one
    is given (eval.suite loads it once), and answer ``items`` with ``answer_file``. ``processor``: image
    processor settings for a stock VLM. -> (generated now, rank)."""
    from vlm.models.vlm import load_assistant

    d = init_distributed()
    model, tokenizer, image = assistant or load_assistant(checkpoint, processor)
    if d.device.type == "cpu" and next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        model.float()  # bf16 checkpoints (stock VLMs are stored so) generate in fp32 on CPUs
    model.to(d.device)
    return answer_file(model, tokenizer, image, items, out, id_key, batch_size, max_new_tokens, desc), d.rank


def run_and_cleanup(fn, *args) -> None:
    """Run a generate command, then tear down the process group it may have started."""
    try:
        fn(*args)
    finally:
        cleanup()


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _image_bytes(image) -> bytes:
    """An item's image, given as a path or as bytes -> its bytes."""
    if image is None:
        raise ValueError("this item has no image")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    with open(image, "rb") as f:
        return f.read()


def _pixels(image, transform) -> torch.Tensor:
    return transform.from_bytes(_image_bytes(image))


def _pil(image):
    """An image path or bytes -> 8-bit RGB PIL image (16-bit scans scaled, not clipped)."""
    from vlm.data.transforms import pil_rgb

    return pil_rgb(_image_bytes(image))


def stock_prompt(processor, text: str) -> str:
    """One image and the question, rendered by the processor's chat template with the generation prompt."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _read_jsonl(path, id_key: str) -> dict[str, dict]:
    import json

    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[str(rec[id_key])] = rec
    return done


def answer_file(model, tokenizer, image: dict, items: list[tuple], out, id_key: str, batch_size: int = 16,
                max_new_tokens: int = 64, desc: str = "generate") -> int:
    """Answer ``items`` = [(id, prompt text without the image token, image path or bytes)] into the JSONL
    ``out`` ({id_key: id, "text": answer}), batched. Resumable: ids already in ``out`` are skipped.

    Under torchrun each rank answers items rank, rank + W, ... into ``out``.part<rank> (appended batch by
    batch, so a killed run resumes per rank); rank 0 then merges everything into ``out`` in item order
    (atomically) and removes the parts. Returns how many this rank generated now."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from tqdm import tqdm

    from vlm.data.transforms import ImageConfig, MedicalImageTransform
    from vlm.utils import atomic_write_text

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(out)
    part = out.with_name(f"{out.name}.part{rank}") if world > 1 else out
    parts = sorted(out.parent.glob(f"{out.name}.part*"))  # left by an interrupted run, any world size
    done = _read_jsonl(out, id_key)
    for p in parts:
        done |= _read_jsonl(p, id_key)
    todo = [it for i, it in enumerate(items) if i % world == rank and str(it[0]) not in done]
    processor = image.get("processor")  # a stock VLM: its processor renders, expands and preprocesses
    if processor is None:
        transform = MedicalImageTransform(ImageConfig(size=image["size"], mean=image["mean"], std=image["std"]))
        image_id = tokenizer.convert_tokens_to_ids(image["image_token"])
        n_img = int(model.config.image_seq_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "a") as f:
        for s in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=rank != 0):
            chunk = todo[s:s + batch_size]
            if processor is not None:
                prompts = [stock_prompt(processor, text) for _, text, _ in chunk]
                images = [[_pil(img)] for _, _, img in chunk]
                try:
                    answers = generate_stock(model, processor, prompts, images, batch_size=len(chunk),
                                             max_new_tokens=max_new_tokens)
                except (ValueError, RuntimeError, TypeError):
                    for (qid, _, _), imgs in zip(chunk, images):  # a refused image names its question
                        try:
                            processor.image_processor(images=imgs, return_tensors="pt")
                        except (ValueError, RuntimeError, TypeError) as e:
                            raise ValueError(f"{id_key} {qid}: the model's image processor refused its image: "
                                             f"{e}") from None
                    raise
            else:
                requests = []
                for qid, text, img in chunk:
                    msgs = [{"role": "user", "content": image["image_token"] + "\n" + text}]
                    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                    ids = [t for t0 in ids for t in ([t0] * n_img if t0 == image_id else [t0])]
                    requests.append({"input_ids": ids, "pixel_values": _pixels(img, transform)})
                answers = generate(model, tokenizer, requests, batch_size=len(requests),
                                   max_new_tokens=max_new_tokens)
            for (qid, _, _), ans in zip(chunk, answers):
                f.write(json.dumps({id_key: qid, "text": ans}) + "\n")
            f.flush()
    if distributed:
        dist.barrier()
    if rank == 0:
        merged = _read_jsonl(out, id_key)
        parts = sorted(out.parent.glob(f"{out.name}.part*"))
        for p in parts:
            merged |= _read_jsonl(p, id_key)
        atomic_write_text(out, "".join(json.dumps(merged[str(it[0])]) + "\n" for it in items if str(it[0]) in merged))
        for p in parts:
            p.unlink()
    if distributed:
        dist.barrier()
    return len(todo)
