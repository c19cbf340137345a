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
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or " " in text:
        return False
    return not Path(text.split("/")[0]).exists()  # runs/missing_run is a mistyped folder, not a hub repo


def load_stock_vlm(source, dtype: str = "auto", attn_impl: str = "sdpa", processor_kwargs: Optional[dict] = None,
                   quantize: str = "none"):
    """(model, processor) from a hub id or folder. ``processor_kwargs`` go to the image processor
    (Qwen2-VL's ``min_pixels`` / ``max_pixels``, Idefics3's ``size``...). ``dtype``: auto (as stored),
    float32, bfloat16, float16. ``attn_impl`` sdpa runs as ``sdpa_varlen`` (the same SDPA; packed rows
    attend per conversation at the conversations' cost) unless the model has image blocks
    (``image_blocks``). ``quantize``: 4bit | 8bit loads the LLM's linears quantized (bitsandbytes,
    CUDA; QLoRA), the vision tower, projector and head unquantized."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm.remote_code import refuse_remote_code

    if not Path(str(source)).exists() and not is_stock_source(source):
        raise ValueError(f"{source}: no such folder (and not a hub id of the form org/name)")
    refuse_remote_code(str(source), "model")
    try:
        processor = load_processor(source, processor_kwargs)
    except OSError as e:  # not cached and the hub unreachable, a gated or missing repo, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{source}: not a local folder, and the hub repo could not be read ({first})") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    extra = quantized_llm(source, quantize) if quantize != "none" else {}
    varlen_ok = attn_impl == "sdpa" and not image_blocks(source)
    if varlen_ok:  # SDPA plus packing at the cost of the conversations, not the row (vlm/models/varlen.py)
        from vlm.models import varlen

        attn_impl = varlen.register()
    model = AutoModelForImageTextToText.from_pretrained(str(source), trust_remote_code=False, dtype=torch_dtype,
                                                        attn_implementation=attn_impl, **extra)
    return model, processor


def image_blocks(source) -> bool:
    """Whether the model's image tokens attend to each other both ways (its forward takes ``token_type_ids``:
    Gemma 3, PaliGemma). Its masks carry those blocks, which sdpa_varlen's mask-free path would drop: such
    models run transformers' own SDPA (packed rows get their masks from vlm.data.stock_chat)."""
    import inspect

    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    cls = AutoModelForImageTextToText._model_mapping.get(type(cfg), None)
    return cls is not None and "token_type_ids" in inspect.signature(cls.forward).parameters


def quantized_llm(source, mode: str) -> dict:
    """from_pretrained kwargs quantizing only the LLM: the parts found on a weightless skeleton of the model
    (meta device) name what bitsandbytes must skip."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlm.models.vlm import quantization

    kwargs = quantization(mode)  # a clear error without bitsandbytes or CUDA
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(source),
                                                                                      trust_remote_code=False))
    parts = vlm_parts(skeleton)
    kwargs["quantization_config"].llm_int8_skip_modules = [p.rstrip(".") for k in ("vision", "projector")
                                                           for p in parts[k]] + ["lm_head"]
    return kwargs


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
                                      processor_kwargs=model_cfg.get("processor") or {},
                                      quantize=model_cfg.get("llm_quantize", "none"))
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
    from vlm.models.lora import merge_lora
    from vlm.utils import atomic_folder

    merge_lora(model)
    model.eval()
    model.generation_config.eos_token_id = stop_token_ids(model, processor)
    if processor.tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    out = Path(out)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if card:
            (tmp / "README.md").write_text(card)
    return out


def export_adapter(model, source: str, out) -> Path:
    """The LoRA-family adapters of a tuned stock VLM as a peft adapter folder (adapter_config.json +
    adapter_model.safetensors, written to OUT.tmp and renamed) that ``PeftModel.from_pretrained(base, OUT)``
    loads onto the stock ``source`` checkpoint. Parts that trained fully (the projector, a vision tower)
    go in as peft's ``modules_to_save``. Call before merging. A part that is a bare parameter (LLaVA-NeXT's
    image_newline) cannot be expressed as a peft module: a clear error (use the merged export)."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from vlm.models.lora import ADAPTER_PARAM
    from vlm.utils import atomic_folder

    if not getattr(model, "peft_config", None):
        raise ValueError("no adapters to export: the run did not train with model.lora.r > 0")
    parts = vlm_parts(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not ADAPTER_PARAM.search(n)}
    prefixes = sorted({max((p for k in ("vision", "projector") for p in parts[k] if n.startswith(p)), key=len,
                           default=n) for n in trained})
    bare = [p for p in prefixes if not p.endswith(".")]
    if bare:
        raise ValueError(f"the fully trained parameter(s) {bare} are not inside a module, so a peft adapter folder "
                         "cannot carry them: use the merged export")
    cfg = copy.deepcopy(model.peft_config["default"])
    cfg.base_model_name_or_path = str(source)
    cfg.modules_to_save = [p.rstrip(".") for p in prefixes] or None
    cfg.inference_mode = True
    state = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    state.update({f"base_model.model.{n}": p for n, p in model.named_parameters()
                  if any(n.startswith(q) for q in prefixes)})
    out = Path(out)
    with atomic_folder(out) as tmp:
        cfg.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / "adapter_model.safetensors")
    return out
