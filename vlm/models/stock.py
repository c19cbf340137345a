"""Stock Hugging Face VLMs: any checkpoint that ``AutoModelForImageTextToText`` + ``AutoProcessor`` load
(Qwen2-VL / Qwen2.5-VL, Gemma 3 / MedGemma, llava-hf LLaVA and LLaVA-NeXT, Idefics3 / SmolVLM, and our
own transformers exports), as the second kind of assistant beside the LLaVA assembly (vlm/models/vlm.py).

What differs per family is read from the model and its processor, not from its name:

* where the parts live (``vlm_parts``): the LLM is the child of ``model.model`` whose config *is*
  ``config.text_config`` (plus ``lm_head``), the vision tower the one whose config is
  ``config.vision_config``, and everything else multimodal (``multi_modal_projector``, Idefics3's
  ``connector``, LLaVA-NeXT's ``image_newline``) is the projector. One table, ``PROJECTOR_IN_VISION``,
  names the projectors transformers keeps *inside* the vision module (Qwen2-VL's patch ``merger``);
* image token expansion, image tensors and chat template: the processor's (``processor(text=...,
  images=...)`` expands the placeholders exactly as the model expects);
* FSDP units: the classes of ``model._no_split_modules`` that are layers of a stack (``decoder_layers``);
* positions: the model's own (Qwen2-VL's ``get_rope_index`` for 3-D mRoPE; see vlm/data/stock_chat.py).

No remote code: every folder is checked by ``refuse_remote_code`` and every ``from_pretrained`` passes
``trust_remote_code=False``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch.nn as nn

log = logging.getLogger(__name__)

# projectors that transformers keeps inside the vision module: model_type -> attribute of the vision module
PROJECTOR_IN_VISION = {"qwen2_vl": "merger", "qwen2_5_vl": "merger", "qwen3_vl": "merger"}
PARTS = ("vision", "projector", "llm")


def is_stock_source(source) -> bool:
    """A transformers folder (config.json, no train.instruct state) or a hub id that is not a local path."""
    p = Path(str(source))
    if p.exists():
        return (p / "config.json").is_file() and not (p / "state.json").is_file() and not (p / "checkpoints").is_dir()
    text = str(source)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text


def load_stock_vlm(source, dtype: str = "auto", attn_impl: str = "sdpa", processor_kwargs: Optional[dict] = None):
    """(model, processor) from a hub id or folder. ``processor_kwargs`` go to the image processor
    (Qwen2-VL's ``min_pixels`` / ``max_pixels``, Idefics3's ``size``...). ``dtype``: auto (as stored),
    float32, bfloat16, float16."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm.remote_code import refuse_remote_code

    refuse_remote_code(str(source), "model")
    processor = load_processor(source, processor_kwargs)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(str(source), trust_remote_code=False, dtype=torch_dtype,
                                                        attn_implementation=attn_impl)
    return model, processor


def load_processor(source, processor_kwargs: Optional[dict] = None):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(source), trust_remote_code=False)
    if processor_kwargs:  # rebuilt from its saved settings plus these (its __init__ maps min_pixels etc.)
        ip = processor.image_processor
        valid = set(getattr(getattr(ip, "valid_kwargs", None), "__annotations__", {})) | set(vars(ip))
        bad = [k for k in processor_kwargs if k not in valid]
        if bad:
            raise ValueError(f"{source}: the image processor ({type(ip).__name__}) has no setting(s) {bad}")
        settings = {k: v for k, v in ip.to_dict().items() if k not in ("image_processor_type", "processor_class")}
        processor.image_processor = type(ip)(**{**settings, **processor_kwargs})
    if getattr(processor, "chat_template", None) is None and getattr(processor.tokenizer, "chat_template", None):
        processor.chat_template = processor.tokenizer.chat_template
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{source}: the processor has no chat template (chat_template.jinja or "
                         "chat_template.json); give it one to render prompts")
    return processor


def vlm_parts(model) -> dict[str, list[str]]:
    """-> {"vision": [...], "projector": [...], "llm": [...]}: parameter-name prefixes of each part."""
    cfg, base = model.config, getattr(model, "model", None)
    if base is None or not hasattr(cfg, "text_config") or not hasattr(cfg, "vision_config"):
        raise ValueError(f"{type(model).__name__}: not an image-text-to-text model with text and vision configs")
    parts: dict[str, list[str]] = {k: [] for k in PARTS}
    for name, child in base.named_children():
        conf = getattr(child, "config", None)
        kind = "llm" if conf is cfg.text_config else "vision" if conf is cfg.vision_config else "projector"
        parts[kind].append(f"model.{name}.")
    for name, _ in base.named_parameters(recurse=False):  # LLaVA-NeXT's image_newline
        parts["projector"].append(f"model.{name}")
    inner = PROJECTOR_IN_VISION.get(cfg.model_type)
    if inner and parts["vision"]:
        parts["projector"].append(f"{parts['vision'][0]}{inner}.")
    if any(n.startswith("lm_head.") for n, _ in model.named_parameters()):
        parts["llm"].append("lm_head.")
    if not parts["llm"] or not parts["vision"]:
        raise ValueError(f"{type(model).__name__}: could not find the LLM and the vision tower among "
                         f"{[n for n, _ in base.named_children()]}")
    return parts


def part_of(name: str, parts: dict[str, list[str]]) -> str:
    """The part a parameter belongs to (the longest matching prefix wins: Qwen2-VL's merger is the
    projector although it sits inside the vision module)."""
    best, length = None, -1
    for kind, prefixes in parts.items():
        for p in prefixes:
            if (name.startswith(p) or name == p) and len(p) > length:
                best, length = kind, len(p)
    if best is None:
        raise ValueError(f"parameter {name} belongs to no part of the model")
    return best


def freeze_parts(model, freeze: list[str]) -> dict[str, int]:
    """requires_grad off for the parts in ``freeze`` (vision, projector, llm), on for the others
    (floating-point weights only: a quantized LLM's integer weights never train). -> trainable counts."""
    bad = [f for f in freeze if f not in PARTS]
    if bad:
        raise ValueError(f"model.freeze: unknown part(s) {bad}; parts are {', '.join(PARTS)}")
    parts = vlm_parts(model)
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        kind = part_of(name, parts)
        p.requires_grad = kind not in freeze and p.is_floating_point()
        counts[kind] += p.numel() if p.requires_grad else 0
    return counts


def decoder_layers(model) -> tuple[type, ...]:
    """FSDP2 units: the classes named in ``_no_split_modules`` that are layers of a stack (an
    ``nn.ModuleList``): the LLM's decoder layers and the vision tower's blocks, never embeddings."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {}
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for layer in module:
                if type(layer).__name__ in names:
                    found[type(layer).__name__] = type(layer)
    return tuple(found.values())


def llm_module(model):
    """The LLM decoder (``model.model.language_model`` / ``text_model``)."""
    name = vlm_parts(model)["llm"][0]
    return model.get_submodule(name.rstrip("."))


def stock_info(source) -> dict:
    """model_type and architecture of a transformers folder (for logs and run metadata)."""
    p = Path(str(source)) / "config.json"
    if not p.is_file():
        return {"source": str(source)}
    cfg = json.loads(p.read_text())
    return {"source": str(source), "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures")}


def stock_from_config(model_cfg: dict):
    """(model, processor) for a train.instruct ``model`` section (a plain dict) naming ``vlm``: the stock
    checkpoint, with ``freeze`` parts frozen and, with ``lora.r`` > 0, adapters on a frozen LLM."""
    model, processor = load_stock_vlm(model_cfg["vlm"], dtype=model_cfg.get("dtype", "auto"),
                                      attn_impl=model_cfg.get("attn_impl", "sdpa"),
                                      processor_kwargs=model_cfg.get("processor") or {})
    lora = model_cfg.get("lora") or {}
    freeze = list(model_cfg.get("freeze") or [])
    if lora.get("r", 0) > 0 and "llm" not in freeze:
        freeze.append("llm")  # LoRA: adapters train on a frozen LLM
    freeze_parts(model, freeze)
    if "vision" not in freeze:
        unused = unused_vision_params(model, processor)
        for name, p in model.named_parameters():
            if name in unused:
                p.requires_grad = False
        if unused:
            log.info("vision tower: %d parameter tensors do not feed the image features the model reads (layers "
                     "after its feature layer, pooling heads) and stay frozen", len(unused))
    if lora.get("r", 0) > 0:
        from vlm.models.lora import inject_lora

        n = inject_lora(model, vlm_parts(model)["llm"][0], lora["target"], lora["r"], lora["alpha"],
                        lora.get("dropout", 0.0), method=lora.get("method", "lora"))
        log.info("%s r=%d on %d LLM linears", lora.get("method", "lora"), lora["r"], n)
    return model, processor


def trainable_by_part(model) -> dict[str, int]:
    """Trainable parameter counts per part (what the logs and train.rehearse report)."""
    parts = vlm_parts(model)
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[part_of(name.replace(".base_layer.", "."), parts)] += p.numel()
    return counts


def stop_token_ids(model, processor) -> list[int]:
    """What generation stops on: the model's generation_config EOS, the tokenizer's EOS and the token
    that ends an assistant turn in the processor's chat template (found by rendering one turn)."""
    from vlm.data.chat import end_of_turn_ids

    tok = processor.tokenizer
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    template = getattr(tok, "chat_template", None)
    tok.chat_template = processor.chat_template  # end_of_turn_ids renders with the tokenizer
    try:
        ids += end_of_turn_ids(tok)
    finally:
        tok.chat_template = template
    return sorted({t for t in ids if t is not None})


def unused_vision_params(model, processor) -> set[str]:
    """Vision-tower parameters that get no gradient from the image features the model reads (LLaVA reads
    the penultimate layer, Gemma 3 never uses SigLIP's pooling head): found by one forward and backward
    of ``get_image_features`` on a small blank image, so no name or layer index is guessed. DDP requires
    every trainable parameter to get a gradient."""
    import torch
    from PIL import Image

    enc = processor.image_processor(images=[Image.new("RGB", (64, 64), (127, 127, 127))], return_tensors="pt")
    dtype = next(model.parameters()).dtype
    kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in enc.items()}
    prefix = vlm_parts(model)["vision"][0]
    trainable = {n: p for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad}
    out = model.model.get_image_features(**kwargs)
    if getattr(out, "pooler_output", None) is not None:  # transformers 5: the projected features the LLM reads
        out = out.pooler_output
    tensors = [t for t in _tensors(out) if t.requires_grad]
    if not tensors:
        return set()
    grads = torch.autograd.grad(sum(t.float().sum() for t in tensors), list(trainable.values()), allow_unused=True)
    return {n for (n, _), g in zip(trainable.items(), grads) if g is None}


def _tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput
        items = list(out.values())
    elif isinstance(out, (list, tuple)):
        items = list(out)
    else:
        return []
    return [t for x in items for t in _tensors(x)]


def export_stock(model, processor, out, card: Optional[str] = None):
    """Save a tuned stock VLM as its own stock class + processor (adapters merged into the weights; a
    projector trained fully is simply part of the weights), written to OUT.tmp and renamed, so that stock
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` (and vLLM) load it. Generation stops at the end
    of an assistant turn (``generation_config.eos_token_id``). -> the folder."""
    import shutil

    from vlm.models.lora import merge_lora

    merge_lora(model)
    model.eval()
    model.generation_config.eos_token_id = stop_token_ids(model, processor)
    if processor.tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if card:
        (tmp / "README.md").write_text(card)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
