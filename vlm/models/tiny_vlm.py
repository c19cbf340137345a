"""Tiny, offline stand-ins of stock Hugging Face VLM families, saved as folders that
``AutoModelForImageTextToText`` + ``AutoProcessor`` load exactly as they load the real checkpoints.

No weights can be downloaded in CI, yet what breaks when a codebase meets a new VLM family lives in
what differs between them: how an image placeholder becomes tokens (Qwen2-VL's dynamic grid of
merged patches, Gemma 3's ``<start_of_image>`` block with bidirectional attention, LLaVA-NeXT's
any-resolution tiles plus newline tokens, Idefics3's row/column tile markers), where the vision tower,
the projector and the LLM live, 3-D mRoPE positions, and the chat template. Each stand-in is the
family's real transformers classes at 2 layers x 64 wide, a tokenizer of the family's kind trained in a
second (vlm/models/tiny.py) with the family's special tokens, the family's image processor at a few
dozen pixels, and a chat template of the family's shape (written for this project, not copied).

    folder = save_tiny_vlm(tmp / "qwen2_vl", "qwen2_vl")     # then model.vlm: <folder> in a config
    model = AutoModelForImageTextToText.from_pretrained(folder)

Families: qwen2_vl, qwen2_5_vl, gemma3, llava, llava_next, idefics3.
"""
from __future__ import annotations

from pathlib import Path

# chat templates of each family's shape; content is a string or a list of {"type": "image"|"text"} items
_ITEMS = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}{{ IMG }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
          "{% endfor %}{% endif %}")


def _items(image: str) -> str:
    return _ITEMS.replace("{{ IMG }}", "{{ '" + image + "' }}")


QWEN_VL = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
           "{{ '<|im_start|>' + m['role'] + '\n' }}" + _items("<|vision_start|><|image_pad|><|vision_end|>")
           + "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a system message is folded into the first user turn, as Gemma 3's template does
GEMMA3 = ("{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
          "{% set ns.sys = (m['content'] if m['content'] is string else m['content'][0]['text']) + '\n\n' %}"
          "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + ns.sys }}"
          + _items("<start_of_image>") + "{{ '<end_of_turn>\n' }}{% set ns.sys = '' %}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# LLaVA-1.5 (Vicuna shape, as LLaVA trains it: the answer ends with EOS)
LLAVA = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' }}" + _items("<image>\n") + "{{ ' ' }}"
         "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}" + _items("") + "{{ eos_token }}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# LLaVA-NeXT on Mistral (llava-v1.6-mistral shape)
LLAVA_NEXT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' }}" + _items("<image>\n")
              + "{{ ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' }}" + _items("") + "{{ eos_token }}"
              "{% endif %}{% endfor %}")
IDEFICS3 = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}"
            "{% if m['role'] == 'assistant' %}{{ ': ' }}{% else %}{{ ':' }}{% endif %}" + _items("<image>")
            + "{{ '<end_of_utterance>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "gemma3", "llava", "llava_next", "idefics3")
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096}


def _tokenizer(base: str, extra: list[str], template: str, **special):
    from vlm.models.tiny import train_tokenizer

    tok = train_tokenizer(base)
    tok.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    for k, v in special.items():
        setattr(tok, k, v)
    tok.chat_template = template
    return tok


def build_tiny_vlm(name: str, seed: int = 0, **text):
    """-> (model, processor) of the family, tiny and randomly initialised (seeded). ``text``: LLM config
    overrides (bench/instruct_packing.py widens the LLM, as a 7B LLM dominates the compute)."""
    import torch

    if name not in FAMILIES:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    TEXT_OVERRIDES.clear()
    TEXT_OVERRIDES.update(text)
    try:
        return globals()["_" + name]()
    finally:
        TEXT_OVERRIDES.clear()


def save_tiny_vlm(folder: str | Path, name: str, dtype: str = "float32", seed: int = 0) -> Path:
    """Save the family's tiny model + processor like a hub checkpoint (in ``dtype``: stock VLM checkpoints
    are stored in bf16) -> the folder."""
    import torch

    model, processor = build_tiny_vlm(name, seed)
    model.to(getattr(torch, dtype))
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TEXT_OVERRIDES: dict = {}


def _text(tok, **kw) -> dict:
    return {**TEXT, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id, **kw, **TEXT_OVERRIDES}


def _qwen(kind: str):
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLImageProcessor, Qwen2VLProcessor

    tok = _tokenizer("qwen2", ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], QWEN_VL)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                          ("video_token_id", "<|video_pad|>"),
                                                          ("vision_start_token_id", "<|vision_start|>"),
                                                          ("vision_end_token_id", "<|vision_end|>"))}
    text = _text(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    text["rope_parameters"]["mrope_section"] = _mrope_section(text)
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if kind == "qwen2_vl":  # hidden_size: what the patch merger outputs, the LLM's width
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=text["hidden_size"])
    else:  # Qwen2.5-VL: windowed attention in all blocks but the full-attention ones, RMSNorm, SwiGLU
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=56,
                      fullatt_block_indexes=[1])
    cfg = AutoConfig.for_model(kind, text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)

    # 28 px (one merged 2x2 block of 14-px patches) to 56 x 56 px: 1 to 4 image tokens per image
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                               temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=_qwen_video(), chat_template=QWEN_VL)
    return AutoModelForImageTextToText.from_config(cfg), proc


def _mrope_section(text: dict) -> list[int]:
    """Qwen2-VL splits each head's rotary frequencies among time, height and width (1:1.5:1.5 in the
    released models: 16, 24, 24 of 64); the same proportions at the tiny head size."""
    half = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_video():
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                 temporal_patch_size=2)


def _qwen2_vl():
    return _qwen("qwen2_vl")


def _qwen2_5_vl():
    return _qwen("qwen2_5_vl")


def _gemma3():
    from transformers import AutoConfig, AutoModelForImageTextToText, Gemma3ImageProcessor, Gemma3Processor

    tok = _tokenizer("gemma", ["<start_of_image>", "<end_of_image>", "<image_soft_token>"], GEMMA3)
    # named special tokens (tok.boi_token, ...), saved in tokenizer_config.json as Gemma 3's tokenizer has them
    tok._set_model_specific_special_tokens({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                            "image_token": "<image_soft_token>"})
    text = _text(tok, head_dim=16, sliding_window=512, query_pre_attn_scalar=16)
    # SigLIP 32 px / 8 px patches = 4 x 4 patches, average-pooled to 2 x 2 = 4 image tokens
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                               eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                               image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    ip = Gemma3ImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3, image_seq_length=4)
    return AutoModelForImageTextToText.from_config(cfg), proc


def _clip_vision(size: int = 28, patch: int = 14) -> dict:
    return {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": size, "patch_size": patch, "projection_dim": 32}


def _llava():
    from transformers import AutoConfig, AutoModelForImageTextToText, CLIPImageProcessor, LlavaProcessor

    tok = _tokenizer("llama2", [], LLAVA)
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = AutoConfig.for_model("llava", text_config={"model_type": "llama", **_text(tok)},
                               vision_config=_clip_vision(), image_token_id=image_id, image_seq_length=4,
                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=LLAVA, image_token="<image>", num_additional_image_tokens=1)
    return AutoModelForImageTextToText.from_config(cfg), proc


def _llava_next():
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaNextImageProcessor, LlavaNextProcessor

    tok = _tokenizer("mistral", [], LLAVA_NEXT)
    image_id = tok.convert_tokens_to_ids("<image>")
    grid = [[28, 28], [28, 56], [56, 28], [56, 56]]  # any-resolution tiles of the 28-px base image
    cfg = AutoConfig.for_model("llava_next", text_config={"model_type": "mistral", **_text(tok)},
                               vision_config=_clip_vision(), image_token_index=image_id, image_grid_pinpoints=grid,
                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    ip = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                 image_grid_pinpoints=grid)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", chat_template=LLAVA_NEXT,
                              image_token="<image>", num_additional_image_tokens=1)
    return AutoModelForImageTextToText.from_config(cfg), proc


def _idefics3():
    from transformers import AutoConfig, AutoModelForImageTextToText, Idefics3ImageProcessor, Idefics3Processor

    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _tokenizer("llama3", ["<fake_token_around_image>", "<end_of_utterance>", "<global-img>", *tiles], IDEFICS3)
    image_id = tok.convert_tokens_to_ids("<image>")
    # 32 px tiles of 8 px patches = 16 patches, pixel-shuffled by 2 -> 4 tokens per tile; images up to 64 px
    # are split into up to 2 x 2 tiles plus the global view
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    cfg = AutoConfig.for_model("idefics3", text_config={"model_type": "llama", **_text(tok)}, vision_config=vision,
                               scale_factor=2, image_token_id=image_id, tie_word_embeddings=False)
    ip = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3)
    return AutoModelForImageTextToText.from_config(cfg), proc
