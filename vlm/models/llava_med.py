"""LLaVA-Med checkpoints -> stock transformers ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

    convert_llava_med("llava-med-v1.5-mistral-7b", "exports/llava-med-hf")   # python -m train.export --from llava_med

LLaVA-Med ships its own classes (``LlavaMistralForCausalLM``, ``LlavaLlamaForCausalLM``) that stock transformers
and vLLM cannot load. config.json's model_type tells the layout (read from LLaVA-Med's model code and eval scripts):

  model_type     release               projector    prompt: the conv mode LLaVA-Med's eval uses
  llava_mistral  LLaVA-Med v1.5        mlp2x_gelu   mistral_instruct  "[INST] <image>\\nQ [/INST]"
  llava_llama    LLaVA-1.5 code+Llama  mlp2x_gelu   vicuna_v1         "SYSTEM USER: <image>\\nQ ASSISTANT:"
  llava          LLaVA-Med v1 (v0 code) linear      simple            "SYSTEM###Human: Hi!###Assistant: Hi there!...
                                                                       ###Human: Q\\n<im_start><im_patch>*N<im_end>###"

Tensors, LLaVA-Med name -> llava-hf hub name (the layout transformers 4.x and 5.x and vLLM all load):

  model.embed_tokens.weight, lm_head.weight        language_model.model.embed_tokens.weight,
                                                   language_model.lm_head.weight (+ one mean row per token the
                                                   conversion adds, e.g. <image>, as LLaVA initialises new tokens)
  model.layers.{i}.*, model.norm.weight            language_model.model.layers.{i}.*, language_model.model.norm.weight
  model.mm_projector.0.* / .2.* (mlp2x_gelu)       multi_modal_projector.linear_1.* / linear_2.* (GELU between)
  model.mm_projector.{weight,bias} (linear)        multi_modal_projector.linear_1.*; linear_2 = identity, zero bias,
                                                   projector_hidden_act "linear" (x @ I is exact)
  model.vision_tower.vision_tower.vision_model.*   vision_tower.vision_model.*; a checkpoint without them (v1 keeps its
                                                   tower out of the state dict) takes them from ``vision_tower``
                                                   (default: config's mm_vision_tower), a CLIP vision model
  *.rotary_emb.inv_freq, vision *.position_ids     dropped (buffers transformers recomputes)

Config: mm_vision_select_layer -> vision_feature_layer; mm_vision_select_feature patch | cls_patch ->
vision_feature_select_strategy default | full; image_aspect_ratio "pad" -> LlavaImageProcessor(do_pad=True): pad
to a square with the mean colour (expand2square), then CLIP's resize, crop and normalisation with the tower's
preprocessor_config.json values (LLaVA-Med loads its CLIPImageProcessor from the tower), else CLIP's at the
tower's size. Another tensor name, or a shape the stock class does not expect, is an error naming the tensor.

Where stock cannot follow LLaVA-Med exactly (also in the README):
- v1.5's mm_utils.expand2square pastes at a random offset, (w - h) // 2 or one more; stock pastes at the first.
- a grey-scale ("L") image: LLaVA-Med pads it with grey 114 before converting to RGB; stock converts first and
  pads with the mean colour (122, 116, 104).
- LLaVA-Med tokenizes the text after each image on its own, so SentencePiece puts a space token there; a
  tokenizer loaded with legacy=False does not: the conversion checks this and warns (and notes it on the card).
- transformers 5's default (torchvision) image backend resamples slightly differently from PIL;
  AutoProcessor.from_pretrained(DIR, backend="pil") reproduces LLaVA-Med's pixels exactly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlm.utils import atomic_folder

log = logging.getLogger(__name__)

LAYOUTS = {"llava_mistral": ("mistral", "mistral_instruct"), "llava_llama": ("llama", "vicuna_v1"),
           "llava": ("llama", "simple")}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
SIMPLE_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
SIMPLE_SHOTS = "Human: Hi!###Assistant: Hi there!  How can I help you today?\n###"  # simple_conv's fixed turns
# config keys of LLaVA's own (vision side, training switches, ids the tokenizer gives); the rest configures the LLM
LLAVA_KEYS = {"use_mm_proj", "image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "use_cache",
              "freeze_mm_mlp_adapter", "tokenizer_model_max_length", "tokenizer_padding_side", "feature_outs",
              "img_size", "vision_backbone", "segtok_posembed", "unfreeze_mm_vision_tower", "sep_image_conv_front",
              "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
              "max_sequence_length", "bos_token_id", "eos_token_id", "pad_token_id", "auto_map"}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SHARD_BYTES = 4 << 30
EMBED, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"


def _read(tokens: tuple[str, ...]) -> str:
    """Jinja setting ``n`` (images in message m) and ``text`` (its text, image tokens removed): the content is a
    string with the tokens inline (as LLaVA data has it) or a list of {"type": "image"} / {"type": "text"} parts."""
    strip = "".join(f".replace('{t}', '')" for t in tokens)
    count = " + ".join(f"m['content'].count('{t}')" for t in tokens)
    return (f"{{%- if m['content'] is string -%}}{{%- set n = {count} -%}}{{%- set text = m['content']{strip} -%}}"
            "{%- else -%}{%- set n = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
            "{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
            "| join('\\n') -%}{%- endif -%}")


def chat_template(conv_mode: str, image_token: str = "<image>", im_start_end: bool = False) -> str:
    """A Jinja chat template rendering exactly what LLaVA-Med's conversation.py ``get_prompt`` gives for its
    eval's user text: the question stripped, ``<image>\\n`` in front (model_vqa.py), or for v1 the image block
    after it (model_vqa_med.py). No BOS: the tokenizer adds it, as in LLaVA-Med."""
    read = _read(tuple(dict.fromkeys(("<image>", image_token))))
    if conv_mode == "mistral_instruct":  # SeparatorStyle.LLAMA_2, system "", sep "", sep2 "</s>"
        return ("{%- set ns = namespace(sys='', first=true) -%}{%- for m in messages -%}" + read +
                "{%- if m['role'] == 'system' -%}{%- set ns.sys = text -%}{%- else -%}"
                "{%- if m['role'] == 'user' -%}{%- set text = '" + image_token + "\\n' * n + text | trim -%}"
                "{%- if ns.first and ns.sys -%}{%- set text = '<<SYS>>\\n' + ns.sys + '\\n<</SYS>>\\n\\n' + text -%}"
                "{%- endif -%}{{- '[INST] ' + text + ' [/INST]' -}}{%- else -%}{{- ' ' + text + ' ' + eos_token -}}"
                "{%- endif -%}{%- set ns.first = false -%}{%- endif -%}{%- endfor -%}")
    if conv_mode == "vicuna_v1":  # SeparatorStyle.TWO: sep " ", sep2 "</s>", the whole prompt stripped
        return ("{%- set ns = namespace(out='" + VICUNA_SYSTEM.replace("'", "\\'") + " ') -%}"
                "{%- for m in messages -%}" + read + "{%- if m['role'] == 'system' -%}{%- set ns.out = text + ' ' -%}"
                "{%- elif m['role'] == 'user' -%}{%- set ns.out = ns.out + 'USER: ' + ('" + image_token +
                "\\n' * n + text | trim) | trim + ' ' -%}{%- else -%}"
                "{%- set ns.out = ns.out + 'ASSISTANT: ' + text | trim + eos_token + ' ' -%}{%- endif -%}"
                "{%- endfor -%}{%- if add_generation_prompt -%}{%- set ns.out = ns.out + 'ASSISTANT:' -%}"
                "{%- endif -%}{{- ns.out | trim -}}")
    if conv_mode == "simple":  # v1's SeparatorStyle.SINGLE, sep "###", two fixed greeting turns
        block = f"<im_start>{image_token}<im_end>" if im_start_end else image_token
        return ("{%- set ns = namespace(sys='" + SIMPLE_SYSTEM.replace("'", "\\'") + "') -%}"
                "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.sys = m['content'] -%}{%- endfor -%}"
                "{{- ns.sys + '###" + SIMPLE_SHOTS.replace("\n", "\\n") + "' -}}"
                "{%- for m in messages if m['role'] != 'system' -%}" + read +
                "{%- if m['role'] == 'user' -%}{{- 'Human: ' + text | trim + '\\n" + block + "' * n + '###' -}}"
                "{%- else -%}{{- 'Assistant: ' + text + '###' -}}{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}")
    raise ValueError(f"unknown LLaVA-Med conversation mode {conv_mode!r}; known: mistral_instruct, vicuna_v1, simple")


def read_weights(src: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor of a checkpoint folder -> {name: (tensor, file name)}: safetensors, or pytorch_model*.bin read
    with torch.load(weights_only=True) (never unpickled); sharded with an index json, or one file."""
    weight_map = None
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).is_file():
            weight_map = json.loads((src / index).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            break
        if (src / single).is_file():
            files = [single]
            break
    else:
        raise ValueError(f"{src}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for f in files:
        if Path(f).name != f or not (src / f).is_file():
            raise ValueError(f"{src}: shard {f!r} named in the index is not a file in this folder")
        try:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                tensors = load_file(src / f)
            else:  # weights_only: a pickle that names anything but tensors and containers is refused, never run
                tensors = torch.load(src / f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # safetensors' and pickle's errors have no common base
            raise ValueError(f"{src / f}: not a readable tensor file ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{src / f}: not a {{name: tensor}} file")
        for name, t in tensors.items():
            if name in out:
                raise ValueError(f"{src}: tensor {name} is in both {out[name][1]} and {f}")
            out[name] = (t, f)
    for name, f in (weight_map or {}).items():
        if out.get(name, (None, None))[1] != f:
            raise ValueError(f"{src / f}: tensor {name} (named in the index) is not in this shard")
    return out


def hub_name(key: str, projector: str) -> str | None:
    """LLaVA-Med tensor name -> llava-hf hub name; None for a recomputed buffer; '' for no place at all."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        table = ({"weight": "linear_1.weight", "bias": "linear_1.bias"} if projector == "linear" else
                 {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                  "2.bias": "linear_2.bias"})
        return "multi_modal_projector." + table[rest] if rest in table else ""
    for prefix in ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model."):
        if key.startswith(prefix):
            return None if key.endswith("position_ids") else "vision_tower.vision_model." + key[len(prefix):]
    if key == "lm_head.weight":
        return HEAD
    return "language_model.model." + key[len("model."):] if key.startswith("model.") else ""


def _stock_name(name: str) -> str:
    """A hub name, or a LlavaForConditionalGeneration.state_dict() name of any transformers version, spelt one way:
    model.language_model.*, lm_head.*, model.multi_modal_projector.*, model.vision_tower.* (no vision_model.)."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("vision_tower.", "model.vision_tower.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return name.replace("model.vision_tower.vision_model.", "model.vision_tower.")


def _vision_tower(name: str, tensors: dict, origin: dict):
    """The CLIP vision config; its weights go into ``tensors`` unless the checkpoint holds them already. ``name``:
    a folder or hub id (from the hub cache, or downloaded when online), loaded without remote code."""
    from transformers import AutoConfig, CLIPVisionModel

    from vlm.remote_code import refuse_remote_code

    refuse_remote_code(name, "vision tower")
    inside = any(k.startswith("vision_tower.") for k in tensors)
    try:
        if inside:
            cfg = AutoConfig.from_pretrained(name, trust_remote_code=False)
            return getattr(cfg, "vision_config", cfg)
        model = CLIPVisionModel.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if inside:
            return _infer_vision_config(tensors, name)
        raise ValueError(f"the checkpoint has no vision tower weights and the CLIP vision tower {name} could not be "
                         f"loaded ({type(e).__name__}: {str(e).splitlines()[0]}); pass --vision-tower DIR_OR_ID") from e
    for k, v in model.state_dict().items():
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k  # transformers 4.x keeps the prefix
        if not k.endswith("position_ids"):
            tensors["vision_tower.vision_model." + k], origin["vision_tower.vision_model." + k] = v, f"{name}: {k}"
    return model.config


def _infer_vision_config(tensors: dict, name: str):
    """An OpenAI CLIP ViT's config from its tensor shapes (64-wide heads, quick_gelu, eps 1e-5, as every
    openai/clip-vit-*), for a checkpoint holding its tower when the tower's config.json is out of reach."""
    from transformers import CLIPVisionConfig

    pre = "vision_tower.vision_model."
    need = [pre + s for s in ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
                              "encoder.layers.0.mlp.fc1.weight")]
    if not name.startswith("openai/clip-vit") or any(k not in tensors for k in need):
        raise ValueError(f"cannot read the config of vision tower {name}; pass --vision-tower DIR_OR_ID")
    patch, pos, fc1 = (tensors[k].shape for k in need)  # [hidden, 3, p, p], [1 + (image/p)^2, hidden], [mlp, hidden]
    layers = {k.split(".")[4] for k in tensors if k.startswith(pre + "encoder.layers.")}
    log.info("vision tower %s: config inferred from the checkpoint's tensor shapes (OpenAI CLIP conventions)", name)
    return CLIPVisionConfig(hidden_size=patch[0], patch_size=patch[-1], num_hidden_layers=len(layers),
                            image_size=patch[-1] * round((pos[0] - 1) ** 0.5), num_attention_heads=patch[0] // 64,
                            intermediate_size=fc1[0], hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _tower_file(name: str, fname: str) -> Path | None:
    """``fname`` of the tower: in its folder, or in the local hub cache for a hub id (never downloaded)."""
    if Path(name).is_dir():
        return Path(name) / fname if (Path(name) / fname).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, fname)
    except Exception:  # not a valid repo id: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def _image_processor(name: str, image_size: int, pad: bool):
    """LlavaImageProcessor with the tower's preprocessor_config.json values, or CLIP's at its size."""
    from transformers import LlavaImageProcessor

    path = _tower_file(name, "preprocessor_config.json")
    cfg = json.loads(path.read_text()) if path else {}
    size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)  # {"shortest_edge": N} or N (old)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if crop != image_size:
        raise ValueError(f"vision tower {name}: preprocessor crop size {crop} != the tower's image size {image_size}")
    return LlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                               image_mean=cfg.get("image_mean", CLIP_MEAN), image_std=cfg.get("image_std", CLIP_STD),
                               resample=cfg.get("resample", 3), do_pad=pad, do_center_crop=True)


def llava_med_ids(tokenizer, prompt: str, image_token: str) -> list[int]:
    """LLaVA-Med's tokenizer_image_token (mm_utils.py): the prompt tokenized in pieces around each image, BOS
    kept on the first piece only; here the image token's id stands where LLaVA-Med puts -200."""
    pieces = [tokenizer(p)["input_ids"] for p in prompt.split(image_token)]
    bos = int(tokenizer.bos_token_id is not None and pieces[0][:1] == [tokenizer.bos_token_id])
    ids = pieces[0]
    for p in pieces[1:]:
        ids = ids + [tokenizer.convert_tokens_to_ids(image_token)] + p[bos:]
    return ids


def tokenization_gap(processor, conv_mode: str) -> str | None:
    """A note when stock tokenization of a rendered prompt differs from LLaVA-Med's piecewise one, else None."""
    if conv_mode == "simple":  # v1 tokenizes its whole prompt at once, as stock does
        return None
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    tok = processor.tokenizer
    stock, ours = tok(prompt)["input_ids"], llava_med_ids(tok, prompt, processor.image_token)
    if stock == ours:
        return None
    at = next((i for i, (a, b) in enumerate(zip(stock, ours)) if a != b), min(len(stock), len(ours)))
    return (f"stock tokenization differs from LLaVA-Med's from token {at}: "
            f"{tok.convert_ids_to_tokens(stock[at:at + 3])} vs {tok.convert_ids_to_tokens(ours[at:at + 3])} "
            "(LLaVA-Med tokenizes the text after each image on its own, so SentencePiece puts a space token there; "
            "a tokenizer with legacy=True does the same)")


def _source_config(src: Path) -> dict:
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json (a LLaVA-Med checkpoint folder is expected)")
    from vlm.remote_code import refuse_remote_code

    refuse_remote_code(src, "LLaVA-Med checkpoint")  # config, tokenizer and generation configs alike
    cfg = json.loads((src / "config.json").read_text())
    checks = [("model_type", LAYOUTS, cfg.get("model_type")),
              ("mm_projector_type", ("linear", "mlp2x_gelu"), cfg.get("mm_projector_type", "linear")),
              ("mm_vision_select_feature", ("patch", "cls_patch"), cfg.get("mm_vision_select_feature", "patch"))]
    for key, known, value in checks:
        if value not in known:
            raise ValueError(f"{src}/config.json: {key} {value!r} is not a LLaVA-Med layout with a stock equivalent "
                             f"(known: {', '.join(known)})")
    return cfg


def convert_llava_med(src: str | Path, out: str | Path, vision_tower: str | None = None,
                      conv_mode: str | None = None, name: str | None = None) -> Path:
    """Convert the LLaVA-Med checkpoint folder ``src`` into a stock transformers folder ``out`` (written to
    OUT.tmp, then renamed). ``vision_tower``: a CLIP vision model folder or hub id (default: mm_vision_tower)."""
    from transformers import (AddedToken, AutoConfig, AutoTokenizer, GenerationConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    src, out = Path(src), Path(out)
    cfg = _source_config(src)
    llm_type, conv_mode = LAYOUTS[cfg["model_type"]][0], conv_mode or LAYOUTS[cfg["model_type"]][1]
    projector, feature = cfg.get("mm_projector_type", "linear"), cfg.get("mm_vision_select_feature", "patch")
    tower = vision_tower or cfg.get("mm_vision_tower")
    if not tower:
        raise ValueError(f"{src}/config.json: no mm_vision_tower; pass --vision-tower DIR_OR_ID")

    # 1. tensors under hub names (origin: the file and name each came from, for errors)
    tensors, origin = {}, {}
    for key, (t, f) in read_weights(src).items():
        target = hub_name(key, projector)
        if target == "":
            raise ValueError(f"{src / f}: tensor {key} has no place in LlavaForConditionalGeneration")
        if target is not None:
            tensors[target], origin[target] = t, f"{src / f}: tensor {key}"
    if EMBED not in tensors:
        raise ValueError(f"{src}: no tensor model.embed_tokens.weight (not a LLaVA-Med checkpoint?)")
    vcfg = _vision_tower(tower, tensors, origin)
    dtype = tensors[EMBED].dtype  # LLaVA-Med runs its tower in the LLM's dtype

    # 2. tokenizer: the image token (v1: <im_patch>, <im_start>, <im_end>) added where absent, as LLaVA-Med's eval
    #    does; embeddings and head grown to match
    try:  # left padding: batched generation
        tok = AutoTokenizer.from_pretrained(src, padding_side="left", trust_remote_code=False)
    except (ImportError, OSError, ValueError) as e:  # e.g. a SentencePiece tokenizer.model without sentencepiece
        raise ValueError(f"{src}: its tokenizer could not be loaded ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    start_end = bool(cfg.get("mm_use_im_start_end", False))
    image_token = "<im_patch>" if cfg["model_type"] == "llava" else "<image>"
    new = [t for t in [image_token] + ["<im_start>", "<im_end>"] * start_end if t not in tok.get_vocab()]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    for key in (EMBED, HEAD):
        w = tensors.get(key)
        if w is not None and w.shape[0] < len(tok):  # [V, hidden] -> [len(tok), hidden]
            mean = w.float().mean(0, keepdim=True).to(w.dtype)  # [1, hidden]
            tensors[key] = torch.cat([w, mean.expand(len(tok) - w.shape[0], -1)])
    vocab, hidden = tensors[EMBED].shape
    if projector == "linear":  # linear_2: identity [hidden, hidden], zero bias
        for k, v in (("weight", torch.eye(hidden, dtype=dtype)), ("bias", torch.zeros(hidden, dtype=dtype))):
            tensors[f"multi_modal_projector.linear_2.{k}"] = v
            origin[f"multi_modal_projector.linear_2.{k}"] = "identity"

    # 3. the stock config; each tensor's name and shape checked against the stock class (built on the meta device)
    text = {k: v for k, v in cfg.items() if k not in LLAVA_KEYS and not k.startswith("mm_")}
    text.update(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    text_config = AutoConfig.for_model(llm_type, **text)
    config = LlavaConfig(vision_config=vcfg.to_dict(), text_config=text_config.to_dict(),
                         image_token_index=tok.convert_tokens_to_ids(image_token),
                         image_seq_length=(vcfg.image_size // vcfg.patch_size) ** 2 + (feature == "cls_patch"),
                         projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
                         vision_feature_select_strategy="default" if feature == "patch" else "full",
                         vision_feature_layer=int(cfg.get("mm_vision_select_layer", -1)),
                         multimodal_projector_bias=True, tie_word_embeddings=text_config.tie_word_embeddings)
    config.dtype, config.architectures = dtype, ["LlavaForConditionalGeneration"]  # vLLM dispatches on architectures
    with torch.device("meta"):
        stock_model = LlavaForConditionalGeneration(config)
    expected = {_stock_name(k): tuple(v.shape) for k, v in stock_model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for k, t in tensors.items():
        stock = _stock_name(k)
        if stock not in expected:
            raise ValueError(f"{origin[k]} has no place in LlavaForConditionalGeneration (would be {stock})")
        if tuple(t.shape) != expected[stock]:
            raise ValueError(f"{origin[k]} has shape {list(t.shape)} but LlavaForConditionalGeneration expects "
                             f"{list(expected[stock])} for {stock}")
    missing = sorted(set(expected) - {_stock_name(k) for k in tensors})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{src}: no tensor for {missing[0]}{more}")

    # 4. processor and generation config; everything into OUT.tmp, then renamed
    pad = cfg.get("image_aspect_ratio") == "pad"
    processor = LlavaProcessor(image_processor=_image_processor(tower, vcfg.image_size, pad), tokenizer=tok,
                               patch_size=vcfg.patch_size, image_token=image_token, num_additional_image_tokens=1,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               chat_template=chat_template(conv_mode, image_token, start_end))
    tok.chat_template = processor.chat_template
    eos = [tok.eos_token_id]
    if conv_mode == "simple":  # v1 ends its turns with "###", not </s>: stop at the vocabulary's "###" tokens too
        eos += [i for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).strip() == "###"]
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
                           pad_token_id=tok.pad_token_id)
    gap = tokenization_gap(processor, conv_mode)
    if gap:
        log.warning("%s", gap)
    with atomic_folder(out) as tmp:
        _save_weights({k: t.to(dtype).contiguous() for k, t in tensors.items()}, tmp)
        config.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json as well, for transformers 4.x readers
        (tmp / "README.md").write_text(_card(name or out.name, src, cfg["model_type"], conv_mode, gap))
    log.info("LLaVA-Med %s (%s, prompt %s) -> %s", src, cfg["model_type"], conv_mode, out)
    return out


def _save_weights(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """safetensors shards of <= 4 GiB, with model.safetensors.index.json when there are several."""
    from safetensors.torch import save_file

    shards, size = [{}], 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards, size = shards + [{}], 0
        shards[-1][k], size = tensors[k], size + n
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")


def _card(title: str, src: Path, model_type: str, conv_mode: str, gap: str | None) -> str:
    note = f"\n\nTokenization note: {gap}." if gap else ""
    return (f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [medical, llava, llava-med]\n---"
            f"\n\n# {title}\n\nLLaVA-Med ({model_type} layout, from `{src.name}`) converted to stock transformers "
            "`LlavaForConditionalGeneration` + `LlavaProcessor` by medvlm's `python -m train.export --from llava_med`; "
            f"the chat template renders LLaVA-Med's `{conv_mode}` conversation mode.{note}\n\n```python\n"
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
            "model = AutoModelForImageTextToText.from_pretrained('PATH')\n"
            "processor = AutoProcessor.from_pretrained('PATH')\n```\n\nLLaVA-Med's terms apply: research use only, "
            "not for clinical care or clinical decisions.\n")
