"""The assistant: vision tower + projector + any Hugging Face causal LM, as transformers'
``LlavaForConditionalGeneration`` (a well-kept implementation of exactly this idea: image
placeholder tokens replaced by projected patch features with ``masked_scatter``, no per-sample
Python loop, any ``text_config`` (Llama, Qwen2, Mistral, Phi, ...), feature layer and CLS
selection by config). Our model *is* that class, so the transformers export is ``save_pretrained``
and stock ``AutoModelForImageTextToText`` loads it.

Vision towers: a transformers vision model (CLIP or SigLIP, by hub id or folder), or our own
open_clip ViT from a train.clip run, converted weight for weight to ``CLIPVisionModel``
(``openclip_vit_to_hf``). timm towers have no transformers counterpart: see the README.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import torch.nn as nn

log = logging.getLogger(__name__)


def openclip_vit_to_hf(visual: nn.Module):
    """open_clip ``VisionTransformer`` -> transformers ``CLIPVisionModel`` with identical outputs.

    Mapping: conv1 -> patch_embedding, class/positional embeddings, ln_pre -> pre_layrnorm,
    resblocks[i] -> encoder.layers[i] (in_proj split into q/k/v, out_proj, ln_1/ln_2 ->
    layer_norm1/2, c_fc/c_proj -> fc1/fc2), ln_post -> post_layernorm. The projection to the CLIP
    embedding space is not part of a LLaVA vision tower (LLaVA reads hidden states).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
        raise ValueError("only open_clip VisionTransformer towers (no attentional pooling) convert to CLIPVisionModel")
    width = visual.conv1.out_channels
    blocks = visual.transformer.resblocks
    heads = blocks[0].attn.num_heads
    act = blocks[0].mlp.gelu
    if not isinstance(act, nn.GELU) or getattr(act, "approximate", "none") != "none":
        act_name = "quick_gelu"
    else:
        act_name = "gelu"
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
                           num_hidden_layers=len(blocks), num_attention_heads=heads,
                           image_size=visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
                           patch_size=visual.conv1.kernel_size[0], hidden_act=act_name,
                           layer_norm_eps=blocks[0].ln_1.eps, projection_dim=width)
    hf = CLIPVisionModel(cfg)
    sd = {"vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
          "vision_model.embeddings.class_embedding": visual.class_embedding,
          "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
          "vision_model.pre_layrnorm.weight": visual.ln_pre.weight, "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
          "vision_model.post_layernorm.weight": visual.ln_post.weight,
          "vision_model.post_layernorm.bias": visual.ln_post.bias}
    for i, b in enumerate(blocks):
        p = f"vision_model.encoder.layers.{i}."
        q, k, v = b.attn.in_proj_weight.chunk(3)
        qb, kb, vb = b.attn.in_proj_bias.chunk(3)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
                   p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
                   p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
                   p + "layer_norm1.weight": b.ln_1.weight, p + "layer_norm1.bias": b.ln_1.bias,
                   p + "layer_norm2.weight": b.ln_2.weight, p + "layer_norm2.bias": b.ln_2.bias,
                   p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
                   p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias})
    # transformers 5 keeps the vision transformer's names flat; 4.x nested them under vision_model.
    nested = any(k.startswith("vision_model.") for k in hf.state_dict())
    sd = {(k if nested else k.removeprefix("vision_model.")): v.detach().clone() for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "position_ids" not in m]
    if missing or unexpected:
        raise RuntimeError(f"open_clip -> CLIPVisionModel conversion left {missing} missing, {unexpected} unexpected")
    return hf.eval()


def projector_depth(name: str) -> int:
    """``linear`` -> 1, ``mlp<N>x_gelu`` -> N (LLaVA's names)."""
    m = re.fullmatch(r"mlp(\d+)x_gelu", name)
    if name == "linear" or (m and int(m.group(1)) >= 1):
        return 1 if name == "linear" else int(m.group(1))
    raise ValueError(f"model.projector must be linear or mlp<N>x_gelu (e.g. mlp2x_gelu), got {name!r}")


class MLPProjector(nn.Module):
    """linear_1 -> (GELU -> linear_k) ..., LLaVA's mlp<N>x_gelu for N != 2 (linear: N = 1)."""

    def __init__(self, d_in: int, d_out: int, depth: int, bias: bool = True):
        super().__init__()
        self.depth = depth
        for k in range(1, depth + 1):
            setattr(self, f"linear_{k}", nn.Linear(d_in if k == 1 else d_out, d_out, bias=bias))
        self.act = nn.GELU()

    def forward(self, x):
        x = self.linear_1(x)
        for k in range(2, self.depth + 1):
            x = getattr(self, f"linear_{k}")(self.act(x))
        return x


def build_llava(vision, llm, image_token_id: int, vision_feature_layer: int = -2,
                select_strategy: str = "default", projector: str = "mlp2x_gelu"):
    """A LlavaForConditionalGeneration around a transformers vision model and a causal LM (the modules
    themselves: nothing is copied, so a 7B or a quantized LLM is held once), with a fresh projector
    (``mlp2x_gelu``, LLaVA-1.5's, is the stock one; others: ``MLPProjector``)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    depth = projector_depth(projector)
    vcfg = vision.config
    grid = vcfg.image_size // vcfg.patch_size
    cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config=llm.config.to_dict(), image_token_index=image_token_id,
                      image_seq_length=grid * grid + (1 if select_strategy == "full" else 0),
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
                      projector_hidden_act="gelu")
    cfg.vision_config.model_type = vcfg.model_type
    with torch.device("meta"):  # only the skeleton: the towers are the modules passed in
        model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower = vision
    model.model.language_model = llm.get_decoder()
    model.lm_head = llm.lm_head
    model.config.vision_config, model.config.text_config = vcfg, llm.config  # one config object per tower
    if depth == 2:
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        model.model.multi_modal_projector = LlavaMultiModalProjector(cfg)
    else:
        model.model.multi_modal_projector = MLPProjector(vcfg.hidden_size, llm.config.hidden_size, depth)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"LLaVA assembly left tensors unset: {left[:5]}")
    return model


def stock_projector(model) -> None:
    """Make the projector the stock 2-layer one before a transformers export: ``linear`` becomes
    linear_1 + identity activation + an identity linear_2 (the same function); deeper MLPs have no
    stock counterpart (a clear error)."""
    import torch

    proj = model.model.multi_modal_projector
    if not isinstance(proj, MLPProjector):
        return
    if proj.depth != 1:
        raise ValueError(f"projector mlp{proj.depth}x_gelu has no stock transformers counterpart "
                         "(LlavaForConditionalGeneration's projector has 2 layers); evaluate the train.instruct "
                         "checkpoint directly, or train with model.projector=linear or mlp2x_gelu to export")
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model.config.projector_hidden_act = "linear"
    stock = LlavaMultiModalProjector(model.config).to(proj.linear_1.weight)
    with torch.no_grad():
        stock.linear_1.load_state_dict(proj.linear_1.state_dict())
        stock.linear_2.weight.copy_(torch.eye(stock.linear_2.weight.shape[0]))
        stock.linear_2.bias.zero_()
    model.model.multi_modal_projector = stock


def image_seq_length(model) -> int:
    return int(model.config.image_seq_length)


def vision_param_used(name: str, config) -> bool:
    """Whether a vision-tower parameter feeds the features LLaVA reads (``vision_feature_layer``)."""
    n_layers = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [config.vision_feature_layer]
    upto = max(f if f >= 0 else n_layers + 1 + f for f in layers)  # hidden_states[k] = after k layers
    m = re.search(r"encoder\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) < upto
    return not any(k in name for k in ("post_layernorm", "head."))


def freeze_for_stage(model, stage: int, train_vision: bool = False, train_llm: bool = True) -> None:
    """Stage 1: only the projector trains. Stage 2: projector + LLM (+ the vision tower if asked);
    ``train_llm=False`` keeps the whole LLM (decoder, embeddings, head) frozen for adapters to train on."""
    for p in model.parameters():
        p.requires_grad = False
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad = True
    if stage >= 2 and train_llm:  # (a quantized LLM's integer weights stay frozen: its adapters train)
        for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]:
            p.requires_grad = p.is_floating_point()
    if stage >= 2 and train_vision:  # the layers the projector reads; the later ones and the pooling head are unused
        for name, p in model.model.vision_tower.named_parameters():
            p.requires_grad = vision_param_used(name, model.config)


def load_vision_tower(source: str | Path):
    """A transformers vision model (CLIP/SigLIP) from a hub id or folder, or our open_clip ViT from a
    train.clip run/checkpoint/export folder (converted)."""
    p = Path(source)
    if p.exists() and ((p / "checkpoints").is_dir() or (p / "state.json").is_file()
                       or (p / "open_clip_config.json").is_file()):
        from vlm.models.clip import load_clip

        clip, _ = load_clip(p)
        return openclip_vit_to_hf(clip.clip.visual)
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    from vlm.remote_code import refuse_remote_code

    refuse_remote_code(str(source), "vision tower")
    cfg = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    kind = cfg.model_type
    if kind in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(str(source), trust_remote_code=False).eval()
    if kind in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel.from_pretrained(str(source), trust_remote_code=False).eval()
    raise ValueError(f"{source}: vision tower type {kind!r} is not supported (CLIP or SigLIP vision models, or a "
                     "train.clip run with an open_clip ViT)")


def build_llm(name_or_path: Optional[str], llm_config: dict, tokenizer, attn_impl: str = "sdpa",
              quantize: str = "none"):
    """A causal LM from a hub id / folder (no remote code), or built from a config dict (tiny LLMs).

    ``sdpa`` runs as ``sdpa_varlen`` (vlm/models/varlen.py): the same SDPA, plus attention kept inside
    each conversation of a packed row at the cost of the conversations, not of the row."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn_impl == "sdpa":
        from vlm.models import varlen

        attn_impl = varlen.register()
    if name_or_path:
        llm = AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=attn_impl,
                                                   trust_remote_code=False, **quantization(quantize))
    else:
        cfg = dict(llm_config)
        kind = cfg.pop("model_type", None)
        if kind is None:
            raise ValueError("model.llm_config needs a model_type (llama, qwen2, mistral, phi3, ...)")
        cfg.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(tokenizer, key, None) is not None:
                cfg.setdefault(key, getattr(tokenizer, key))
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **cfg), attn_implementation=attn_impl)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    return llm


def quantization(mode: str) -> dict:
    """from_pretrained kwargs for a 4/8-bit LLM (QLoRA), or a clear error where it cannot run."""
    if mode == "none":
        return {}
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"model.llm_quantize={mode} needs bitsandbytes (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        raise ValueError(f"model.llm_quantize={mode} needs a CUDA GPU (bitsandbytes' quantized layers)")
    from transformers import BitsAndBytesConfig

    if mode == "4bit":  # QLoRA's recipe: NF4, double quantization, bf16 compute
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q}


def assistant_from_config(model_cfg: dict, image_token: str = "<image>"):
    """Build (model, tokenizer) from a train.instruct ``model`` config section (a plain dict)."""
    from transformers import AutoTokenizer

    from vlm.models.lora import inject_lora

    from vlm.models.clip import check_hf_source

    tok_source = model_cfg.get("tokenizer") or model_cfg["llm"]
    check_hf_source(str(tok_source), "tokenizer")
    if model_cfg.get("llm"):
        check_hf_source(str(model_cfg["llm"]), "LLM")
    tokenizer = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=False)
    add_image_token(tokenizer, image_token)
    vision = load_vision_tower(model_cfg["vision"])
    llm = build_llm(model_cfg.get("llm"), model_cfg.get("llm_config") or {}, tokenizer,
                    model_cfg.get("attn_impl", "sdpa"), model_cfg.get("llm_quantize", "none"))
    model = build_llava(vision, llm, tokenizer.convert_tokens_to_ids(image_token),
                        model_cfg.get("vision_feature_layer", -2), model_cfg.get("vision_select", "default"),
                        model_cfg.get("projector", "mlp2x_gelu"))
    lora = model_cfg.get("lora") or {}
    if model_cfg.get("stage", 1) == 2 and lora.get("r", 0) > 0:
        inject_lora(model, "model.language_model.", lora["target"], lora["r"], lora["alpha"], lora.get("dropout", 0.0),
                    method=lora.get("method", "lora"))
    return model, tokenizer


def add_image_token(tokenizer, image_token: str = "<image>") -> bool:
    """Give a stock LLM tokenizer (Mistral, Llama, Qwen2: none has one) the image placeholder as a special
    token, as LLaVA does; the LLM's embeddings grow to match in ``build_llm``. Deterministic (the next
    free id), so rebuilding from the same source gives the same id. Returns whether it was added."""
    if tokenizer.convert_tokens_to_ids(image_token) not in (None, tokenizer.unk_token_id):
        return False
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    log.info("added %s to the tokenizer as special token %d", image_token, tokenizer.convert_tokens_to_ids(image_token))
    return True


def load_assistant(path: str | Path, processor_kwargs: Optional[dict] = None):
    """A trained assistant for inference: a train.instruct run / checkpoint folder (LoRA merged; the LLaVA
    assembly or a tuned stock VLM), or any stock VLM folder / hub id (AutoModelForImageTextToText +
    AutoProcessor, our transformers exports included).
    ``processor_kwargs``: a stock VLM's image processor settings (Qwen2-VL's min_pixels / max_pixels), over
    those a train.instruct run was trained with.
    -> (model in eval mode, tokenizer, image settings dict; with "processor" for a stock VLM)."""
    from vlm.checkpoint import load_weights_into, model_weights
    from vlm.models.lora import merge_lora
    from vlm.models.stock import is_stock_source, load_stock_vlm, stock_from_config

    p, cfg = _instruct_checkpoint(path)
    if cfg is not None:
        if cfg["model"].get("vlm"):
            model, processor = stock_from_config({**cfg["model"], "processor": {
                **(cfg["model"].get("processor") or {}), **(processor_kwargs or {})}})
            load_weights_into(model, model_weights(p), str(p))
            merge_lora(model)
            return model.eval(), processor.tokenizer, {"processor": processor}
        model, tokenizer = assistant_from_config(cfg["model"], cfg["chat"].get("image_token", "<image>"))
        load_weights_into(model, model_weights(p), str(p))
        merge_lora(model)
        image = cfg["data"]["image"]
        return model.eval(), tokenizer, {"size": image["size"], "mean": image["mean"], "std": image["std"],
                                         "image_token": cfg["chat"].get("image_token", "<image>")}
    if processor_kwargs and not is_stock_source(path):
        raise ValueError(f"{p}: processor settings apply to stock VLMs (a transformers folder or hub id)")
    if is_stock_source(path):
        model, processor = load_stock_vlm(path, processor_kwargs=processor_kwargs)
        return model.eval(), processor.tokenizer, {"processor": processor}
    raise ValueError(f"{p}: neither a train.instruct checkpoint nor a transformers folder or hub id")


def _instruct_checkpoint(path) -> tuple[Path, Optional[dict]]:
    """A train.instruct run (its latest complete checkpoint) or checkpoint folder -> (folder, its training config);
    anything else -> (path, None)."""
    import json

    from vlm.checkpoint import list_checkpoints

    p = Path(path)
    if (p / "checkpoints").is_dir():
        found = list_checkpoints(p / "checkpoints")
        if not found:
            raise ValueError(f"{p}: no complete checkpoint")
        p = found[-1]
    if not (p / "state.json").is_file():
        return p, None
    cfg = json.loads((p / "state.json").read_text())["config"]
    if "chat" not in cfg:
        raise ValueError(f"{p} is not a train.instruct checkpoint")
    return p, cfg


def _is_causal_lm(source) -> bool:
    """Whether the checkpoint's config is one AutoModelForCausalLM loads (an LLM), not a VLM's."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return AutoConfig.from_pretrained(source, trust_remote_code=False).model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_base_llm(checkpoint, llm: Optional[str] = None):
    """The language model an assistant was built from, for text questions (the forgetting check): ``llm`` (a hub
    id or folder: an LLM, or a stock VLM asked without images) when given; else what the train.instruct checkpoint's config names: ``model.llm`` (the LLaVA
    assembly's LLM, loaded as AutoModelForCausalLM with its own tokenizer and chat template) or ``model.vlm`` (a
    tuned stock VLM's starting checkpoint, asked without images). -> (model in eval mode, tokenizer, settings with
    ``text_only``), what eval.generate.answer_with takes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlm.models.clip import check_hf_source
    from vlm.models.stock import load_stock_vlm

    source, tokenizer_source = llm, llm
    if source is None:
        p, cfg = _instruct_checkpoint(checkpoint)
        if cfg is None:
            raise ValueError(f"{checkpoint}: not a train.instruct run, so it records no base LLM; name one with --llm")
        m = cfg["model"]
        if m.get("vlm"):
            model, processor = load_stock_vlm(m["vlm"], processor_kwargs=m.get("processor") or None)
            return model.eval(), processor.tokenizer, {"processor": processor, "text_only": True}
        if not m.get("llm"):
            raise ValueError(f"{p}: its LLM was built from model.llm_config (randomly initialised), so there is no "
                             "base LLM to compare with; name one with --llm")
        source, tokenizer_source = m["llm"], m.get("tokenizer") or m["llm"]
    check_hf_source(str(source), "LLM")
    if llm is not None and not _is_causal_lm(source):  # --llm names a stock VLM: asked without images
        model, processor = load_stock_vlm(source)
        return model.eval(), processor.tokenizer, {"processor": processor, "text_only": True}
    check_hf_source(str(tokenizer_source), "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False)
    log.info("base LLM for text questions: %s", source)
    return model.eval(), tokenizer, {"text_only": True}
