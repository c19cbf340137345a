"""Generation for the eval entry points: a benchmark's items answered into a JSONL file (batched, sharded over
torchrun ranks, resumable), with the engine of vlm/generate.py (``generate``, ``generate_stock`` and the prompt
rendering ``prompt_ids`` / ``stock_prompt``, re-exported here for existing callers).
"""
from __future__ import annotations

from typing import Optional

import torch

from vlm.generate import generate, generate_stock, prompt_ids, stock_prompt  # noqa: F401 (re-exported)


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
                max_new_tokens: int, desc: str, processor: Optional[dict] = None,
                sampling: Optional[dict] = None) -> tuple[int, int]:
    """The generate commands' shared path: join torchrun's ranks (if any), load the assistant unless one
    is given (eval.suite loads it once), and answer ``items`` with ``answer_file``. ``processor``: image
    processor settings for a stock VLM; ``sampling``: answer_file's. -> (generated now, rank)."""
    from vlm.models.vlm import load_assistant

    d = init_distributed()
    model, tokenizer, image = assistant or load_assistant(checkpoint, processor)
    if d.device.type == "cpu" and next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        model.float()  # bf16 checkpoints (stock VLMs are stored so) generate in fp32 on CPUs
    model.to(d.device)
    return answer_file(model, tokenizer, image, items, out, id_key, batch_size, max_new_tokens, desc,
                       sampling), d.rank


def answer_benchmark(args, assistant, todo: list[tuple]) -> int:
    """eval.vqa generate's common end: ``todo`` = [(question id, prompt, images)] answered into ``args.out`` by
    ``answer_with`` with the command's settings; logs and returns how many this rank generated now."""
    import logging

    n, rank = answer_with(args.checkpoint, assistant, todo, args.out, "question_id", args.batch_size,
                          args.max_new_tokens, f"{args.benchmark} answers",
                          processor_settings(getattr(args, "processor", None)))
    logging.getLogger("eval.vqa").info("rank %d: %d answers generated now (%d questions in all) -> %s", rank, n,
                                       len(todo), args.out)
    return n


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


def _images(img) -> list:
    """An item's images: one path or bytes, a list of them, or none."""
    if img is None:
        return []
    return list(img) if isinstance(img, (list, tuple)) else [img]


def _answer_rows(model, tokenizer, image: dict, processor, rows: list[tuple], max_new_tokens: int, how: dict,
                 id_key: str) -> list[str]:
    """Answers of ``rows`` (all with images, or all without) in one batched call of the right engine."""
    if processor is not None:
        prompts = [stock_prompt(processor, text, len(_images(img))) for _, text, img in rows]
        images = [[_pil(x) for x in _images(img)] for _, _, img in rows]
        try:
            return generate_stock(model, processor, prompts, images, batch_size=len(rows),
                                  max_new_tokens=max_new_tokens, **how)
        except (ValueError, RuntimeError, TypeError):
            for (qid, _, _), imgs in zip(rows, images):  # a refused image names its question
                if not imgs:
                    continue
                try:
                    processor.image_processor(images=imgs, return_tensors="pt")
                except (ValueError, RuntimeError, TypeError) as e:
                    raise ValueError(f"{id_key} {qid}: the model's image processor refused its image: {e}") from None
            raise
    requests, transform = [], None
    for _, text, img in rows:
        imgs = _images(img)
        if not imgs:
            requests.append({"input_ids": prompt_ids(tokenizer, text, image.get("image_token", "<image>"), 0, 0)})
            continue
        if transform is None:
            from vlm.data.transforms import ImageConfig, MedicalImageTransform

            transform = MedicalImageTransform(ImageConfig(size=image["size"], mean=image["mean"], std=image["std"]))
        requests.append({"input_ids": prompt_ids(tokenizer, text, image["image_token"],
                                                 int(model.config.image_seq_length), len(imgs)),
                         "pixel_values": torch.stack([_pixels(x, transform) for x in imgs])})
    return generate(model, tokenizer, requests, batch_size=len(requests), max_new_tokens=max_new_tokens, **how)


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
                max_new_tokens: int = 64, desc: str = "generate", sampling: Optional[dict] = None) -> int:
    """Answer ``items`` = [(id, prompt text without the image token, image path or bytes, a list of them, or
    None)] into the JSONL ``out`` ({id_key: id, "text": answer}), batched. Resumable: ids already in ``out``
    are skipped.
    Greedy, or with ``sampling`` = {"temperature", "top_p", "seed"} sampled: each rank's items form fixed
    batches, each seeded with seed + its position, so a run with the same world size and batch size samples
    the same answers, resumed or not.

    Under torchrun each rank answers items rank, rank + W, ... into ``out``.part<rank> (appended batch by
    batch, so a killed run resumes per rank); rank 0 then merges everything into ``out`` in item order
    (atomically) and removes the parts. Returns how many this rank generated now."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from tqdm import tqdm

    from vlm.utils import atomic_write_text

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = Path(out)
    part = out.with_name(f"{out.name}.part{rank}") if world > 1 else out
    parts = sorted(out.parent.glob(f"{out.name}.part*"))  # left by an interrupted run, any world size
    done = _read_jsonl(out, id_key)
    for p in parts:
        done |= _read_jsonl(p, id_key)
    # this rank's items in fixed batches (the same in a resumed run, so a batch's sampling seed and companions stay
    # the same); a batch already answered is skipped, a partly answered one regenerated and only its gaps written
    mine = [it for i, it in enumerate(items) if i % world == rank]
    batches = [(s, mine[s:s + batch_size]) for s in range(0, len(mine), batch_size)]
    batches = [(s, chunk) for s, chunk in batches if any(str(it[0]) not in done for it in chunk)]
    todo = [it for _, chunk in batches for it in chunk if str(it[0]) not in done]
    processor = image.get("processor")  # a stock VLM: its processor renders, expands and preprocesses
    if image.get("text_only") and any(_images(it[2]) for it in items):
        raise ValueError(f"{desc}: a language model alone (--llm-only) cannot answer questions with images")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "a") as f:
        for s, chunk in tqdm(batches, desc=desc, unit="batch", disable=rank != 0):
            how = {} if not sampling else {"do_sample": True, "temperature": sampling["temperature"],
                                           "top_p": sampling["top_p"], "seed": sampling["seed"] + s * world + rank}
            answers = [""] * len(chunk)
            # an item has one image, several (a list), or none (text questions); a model call takes images for
            # all its rows or for none, so a chunk mixing both is answered in two calls
            for rows in ([i for i, it in enumerate(chunk) if _images(it[2])],
                         [i for i, it in enumerate(chunk) if not _images(it[2])]):
                if rows:
                    for i, a in zip(rows, _answer_rows(model, tokenizer, image, processor, [chunk[i] for i in rows],
                                                       max_new_tokens, how, id_key)):
                        answers[i] = a
            for (qid, _, _), ans in zip(chunk, answers):
                if str(qid) not in done:
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
