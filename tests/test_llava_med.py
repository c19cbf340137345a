"""LLaVA-Med -> stock transformers (train.export --from llava_med): tiny checkpoints written in LLaVA-Med's exact
layouts (config.json fields, tensor names, shards) are converted through the CLI, loaded with stock
AutoModelForImageTextToText / AutoProcessor, and compared with a forward pass written here step by step after
LLaVA-Med's code (clip_encoder.py, llava_arch.py prepare_inputs_labels_for_multimodal, v1's llava.py, mm_utils.py
expand2square and tokenizer_image_token, conversation.py get_prompt) on the source's raw tensors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FIXTURES

Q = "What is shown?"
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
SIMPLE = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
# the prompt LLaVA-Med's eval builds for one question about one image (conv.get_prompt(), written out by hand)
PROMPTS = {
    "llava_mistral": f"[INST] <image>\n{Q} [/INST]",  # v1.5, model_vqa.py --conv-mode mistral_instruct
    "llava_llama": f"{VICUNA} USER: <image>\n{Q} ASSISTANT:",  # model_vqa.py's default vicuna_v1
    # v1: model_vqa_med.py, conv "simple", image block after the question, no "Assistant:" turn appended
    "llava": f"{SIMPLE}###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###Human: {Q}\n"
             "<im_start><im_patch><im_end>###",
}
PATCHES = 4  # (28 / 14) ** 2 image features
TOWER = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
         "image_size": 28, "patch_size": 14}  # 128 wide (LLM: 64) so a transposed projector cannot pass
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "vocab_size", "sliding_window",
             "tie_word_embeddings")


def llava_med_tokenizer(family: str, legacy: bool = True, extra=()):
    """The family's tiny tokenizer as LLaVA-Med ships it: no <image> token, BOS added on every encode, and
    (legacy=True, as LlamaTokenizer's legacy SentencePiece) a space prepended to each text piece."""
    from tokenizers import Tokenizer, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    from vlm.models.tiny import CORPUS, train_tokenizer

    corpus = [*CORPUS, "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###"]  # v1's "###" turns
    data = json.loads(train_tokenizer(family, corpus=corpus).backend_tokenizer.to_str())
    for t in data["added_tokens"]:  # keep ids contiguous, lose the image token
        if t["content"] == "<image>":
            t["content"] = "<reserved0>"
    data["model"]["vocab"]["<reserved0>"] = data["model"]["vocab"].pop("<image>")
    tk = Tokenizer.from_str(json.dumps(data))
    if legacy:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.pre_tokenizer = None
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    tok.add_tokens(list(extra), special_tokens=True)  # v1's <im_patch>, <im_start>, <im_end> (LLaVA's training)
    return tok


def make_source(root: Path, layout: str, legacy: bool = True, mutate=None) -> tuple[Path, Path]:
    """A tiny LLaVA-Med checkpoint of ``layout`` in ``root/src`` (+ its CLIP tower folder ``root/clip``):
    llava_mistral = v1.5 (tower inside, 2 safetensors shards + index), llava = v1 (linear projector,
    <im_start>/<im_end>, pytorch_model .bin shards + index with 4.28-era rotary buffers, no tower), llava_llama
    (LLaVA-1.5 code with Llama: one model.safetensors, mm_vision_tower naming the tower folder)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from vlm.models.tiny import tiny_config

    src, clip = root / "src", root / "clip"
    src.mkdir(parents=True)
    family = "mistral" if layout == "llava_mistral" else "llama2"
    tok = llava_med_tokenizer(family, legacy, ("<im_patch>", "<im_start>", "<im_end>") if layout == "llava" else ())
    tok.save_pretrained(src)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), tok))
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER))
    tower.save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(clip)
    linear = layout == "llava"
    proj = (torch.nn.Linear(128, 64) if linear else
            torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)))
    sd = {**llm.state_dict(), **{f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}}
    keep = (*TEXT_KEYS, "initializer_range", "attention_dropout")
    text = {k: v for k, v in llm.config.to_dict().items() if k in keep}
    mm = {"mm_hidden_size": 128, "mm_vision_select_layer": -2, "use_mm_proj": True, "tie_word_embeddings": False,
          "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_cache": False, "torch_dtype": "float32"}
    if layout == "llava_mistral":  # LLaVA-Med v1.5's config.json (with its segtok fields)
        sd.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()})
        cfg = {"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral",
               "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
               "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
               "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
               "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "feature_outs": "encoder+decoder",
               "img_size": 640, "vision_backbone": "convnext-large", "segtok_posembed": "sincos",
               "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.2"}
    elif layout == "llava":  # LLaVA-Med v1 (LLaVA v0 code): bos/eos/pad as LLaMA's early conversion wrote them
        head_dim = 64 // 4
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        sd.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(2)})
        cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
               "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_use_im_start_end": True,
               "sep_image_conv_front": False, "max_sequence_length": 2048, "bos_token_id": 0, "eos_token_id": 1,
               "pad_token_id": -1, "transformers_version": "4.28.0.dev0"}
    else:
        cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": str(clip),
               "mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
               "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "transformers_version": "4.31.0"}
    cfg = {**text, **mm, **cfg}
    sd = {k: v.contiguous() for k, v in sd.items()}
    if mutate:
        mutate(sd, cfg)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    keys = sorted(sd)
    halves = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
    if layout == "llava_llama":
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    else:
        ext, stem = (".bin", "pytorch_model") if layout == "llava" else (".safetensors", "model")
        weight_map = {}
        for i, part in enumerate(halves, 1):
            name = f"{stem}-{i:05d}-of-00002{ext}"
            shard = {k: sd[k] for k in part}
            torch.save(shard, src / name) if ext == ".bin" else save_file(shard, src / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        (src / f"{stem}{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src, clip


def raw_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            out.update(load_file(f))
        elif f.suffix == ".bin":
            out.update(torch.load(f, weights_only=True))
    return out


def expand2square_pixels(image: Image.Image, size: int, pad: bool) -> torch.Tensor:
    """mm_utils.process_images by hand: expand2square with the mean colour (offset (w - h) // 2), then
    CLIPImageProcessor's resize (shortest edge, bicubic), centre crop, rescale and normalise. -> [1, 3, S, S]"""
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    w, h = image.size
    if pad and w != h:
        square = Image.new(image.mode, (max(w, h),) * 2, tuple(int(x * 255) for x in mean))
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        image = square
    w, h = image.size  # shortest edge -> size, the other int(size * long / short), as CLIPImageProcessor does
    image = image.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = (np.asarray(image, dtype=np.float32) / 255 - mean) / std
    return torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None]


def reference_logits(src: Path, clip: Path, prompt: str, image: Image.Image) -> tuple[torch.Tensor, list[int]]:
    """LLaVA-Med's forward on the source's raw tensors -> (logits [1, T, V], the ids with one -200 per image
    for v1.5 / llava_llama, or with the N <im_patch> ids for v1)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads((src / "config.json").read_text())
    raw = raw_tensors(src)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    # CLIPVisionTower: the checkpoint's own tower weights when it has them, else the mm_vision_tower model
    inside = {k[len("model.vision_tower.vision_tower.vision_model."):]: v for k, v in raw.items()
              if k.startswith("model.vision_tower.vision_tower.vision_model.")}
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()
    if inside:
        tower.load_state_dict(inside)
    else:
        tower = CLIPVisionModel.from_pretrained(clip, trust_remote_code=False).eval()
    pixels = expand2square_pixels(image, 28, cfg.get("image_aspect_ratio") == "pad")
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]]
        feats = hidden[:, 1:]  # select_feature "patch": CLS dropped, [1, 4, 128]
        if cfg.get("mm_projector_type", "linear") == "mlp2x_gelu":  # nn.Sequential(Linear, GELU, Linear)
            w = {k: raw[f"model.mm_projector.{k}"] for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
            feats = F.linear(F.gelu(F.linear(feats, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])
        else:
            feats = F.linear(feats, raw["model.mm_projector.weight"], raw["model.mm_projector.bias"])  # [1, 4, 64]
    embed = raw["model.embed_tokens.weight"]
    if cfg["model_type"] == "llava":  # v1: the whole prompt tokenized, features replace the <im_patch> run
        ids = tok(prompt.replace("<im_patch>", "<im_patch>" * PATCHES))["input_ids"]
        start = ids.index(tok.convert_tokens_to_ids("<im_start>"))
        emb = torch.cat([embed[ids[:start + 1]], feats[0], embed[ids[start + PATCHES + 1:]]])
    else:  # tokenizer_image_token: pieces around <image>, BOS kept on the first only, -200 in between
        pieces = [tok(p)["input_ids"] for p in prompt.split("<image>")]
        off = int(pieces[0][0] == tok.bos_token_id)
        ids = pieces[0] + [-200] + pieces[1][off:]
        at = ids.index(-200)  # prepare_inputs_labels_for_multimodal: text embeds, image features, text embeds
        emb = torch.cat([embed[ids[:at]], feats[0], embed[ids[at + 1:]]])
    llm_cfg = AutoConfig.for_model("mistral" if cfg["model_type"] == "llava_mistral" else "llama",
                                   **{k: v for k, v in cfg.items() if k in TEXT_KEYS})
    llm = AutoModelForCausalLM.from_config(llm_cfg).eval()
    llm.load_state_dict({k: v for k, v in raw.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))
                         and not k.endswith("inv_freq")})
    with torch.no_grad():
        return llm(inputs_embeds=emb[None]).logits, ids


def export(argv) -> int:
    from train.export import main

    return main(argv)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each layout converted once through the CLI, as the issue writes it: --from llava_med SRC --to transformers
    (llava_llama with --checkpoint SRC, the export's other spelling; v1 with --vision-tower)."""
    out = {}
    for layout in ("llava_mistral", "llava", "llava_llama"):
        root = tmp_path_factory.mktemp(layout)
        src, clip = make_source(root, layout)
        extra = ["--vision-tower", str(clip)] if layout == "llava" else []
        where = ["--checkpoint", str(src)] if layout == "llava_llama" else [str(src)]
        assert export(["--from", "llava_med", *where, "--to", "transformers", "--out", str(root / "hf"), *extra]) == 0
        out[layout] = (src, clip, root / "hf")
    return out


def image(w=41, h=23, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def load_stock(folder: Path, backend=None):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=False).eval()
    kw = {"backend": backend} if backend else {}
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=False, **kw)


def user(text=Q, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


@pytest.mark.parametrize("layout", ["llava_mistral", "llava", "llava_llama"])
def test_converted_logits_equal_llava_med_forward(converted, layout):
    """Stock classes load the folder (trust_remote_code off) and give LLaVA-Med's logits, on LLaVA-Med's ids."""
    src, clip, hf = converted[layout]
    model, processor = load_stock(hf, backend="pil")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not any(p.device.type == "meta" for p in model.parameters())
    gen_prompt = layout != "llava"  # v1's eval appends no "Assistant:" turn
    prompt = processor.apply_chat_template([user()], add_generation_prompt=gen_prompt)
    assert prompt == PROMPTS[layout]
    img = image()
    inputs = processor(text=prompt, images=img, return_tensors="pt")
    with torch.no_grad():
        got = model(**inputs).logits
    ref, ref_ids = reference_logits(src, clip, prompt, img)
    image_id = model.config.image_token_id
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(image_id) == PATCHES == model.config.image_seq_length
    llava_med_ids = [t for i in ref_ids for t in ([image_id] * PATCHES if i == -200 else [i])]
    assert ids == llava_med_ids  # the same tokens LLaVA-Med's pipeline feeds its model
    vocab = ref.shape[-1]
    assert got.shape[1] == ref.shape[1] and got.shape[-1] >= vocab
    torch.testing.assert_close(got[..., :vocab], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["llava_mistral", "llava"])
def test_pixels_equal_expand2square_and_clip_preprocessing(converted, layout):
    """Pad to square with the mean colour (v1.5; v1 does not pad), CLIP resize + crop + normalise: exact with the
    PIL backend (LLaVA-Med's CLIPImageProcessor resized with PIL); transformers 5's default torchvision backend
    resamples slightly differently (on average well under a grey level)."""
    hf = converted[layout][2]
    _, exact = load_stock(hf, backend="pil")
    _, default = load_stock(hf)
    for img in (image(41, 23, 1), image(30, 90, 2), image(28, 28, 3)):
        want = expand2square_pixels(img, 28, layout != "llava")
        torch.testing.assert_close(exact.image_processor(img, return_tensors="pt")["pixel_values"], want,
                                   atol=1e-5, rtol=0)
        assert (default.image_processor(img, return_tensors="pt")["pixel_values"] - want).abs().mean() < 0.01
    assert exact.image_processor.do_pad == (layout != "llava")


def test_chat_templates_render_llava_med_prompts(converted):
    from transformers import AutoTokenizer

    from vlm.models.llava_med import chat_template

    _, v15 = load_stock(converted["llava_mistral"][2])
    two_turns = [user("Is there a mass?"), {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]},
                 {"role": "user", "content": "Where?"}]
    assert v15.apply_chat_template(two_turns, add_generation_prompt=True) == \
        "[INST] <image>\nIs there a mass? [/INST] Yes </s>[INST] Where? [/INST]"
    # a string content with the image token inline (as eval passes it) renders the same prompt
    tok = AutoTokenizer.from_pretrained(converted["llava_mistral"][2], trust_remote_code=False)
    assert tok.apply_chat_template([{"role": "user", "content": f"<image>\n{Q} "}], tokenize=False,
                                   add_generation_prompt=True) == PROMPTS["llava_mistral"]
    with_system = [{"role": "system", "content": "Be brief."}, user()]
    assert v15.apply_chat_template(with_system) == f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\n{Q} [/INST]"
    _, v1 = load_stock(converted["llava"][2])
    assert v1.apply_chat_template([user()], add_generation_prompt=True) == PROMPTS["llava"] + "Assistant:"
    assert v1.apply_chat_template([{"role": "user", "content": f"<im_patch>\n{Q}"}]) == PROMPTS["llava"]
    answered = [user(), {"role": "assistant", "content": "A chest x-ray."}]
    assert v1.apply_chat_template(answered) == PROMPTS["llava"] + "Assistant: A chest x-ray.###"
    _, vicuna = load_stock(converted["llava_llama"][2])
    assert vicuna.apply_chat_template(answered) == f"{VICUNA} USER: <image>\n{Q} ASSISTANT: A chest x-ray.</s>"
    with pytest.raises(ValueError, match="unknown LLaVA-Med conversation mode 'chatml'"):
        chat_template("chatml")


def test_converted_folder_contents(converted):
    from safetensors.torch import load_file

    hf = converted["llava_mistral"][2]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["projector_hidden_act"] == "gelu"
    keys = set(load_file(hf / "model.safetensors"))  # llava-hf's hub layout (transformers 4.x, vLLM)
    assert "vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight" in keys
    assert {"language_model.lm_head.weight", "multi_modal_projector.linear_2.bias"} <= keys
    gen = json.loads((hf / "generation_config.json").read_text())
    tok = json.loads((hf / "tokenizer_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0  # </s>; <unk> pads, as in LLaVA-Med
    assert tok["padding_side"] == "left"
    assert (hf / "preprocessor_config.json").is_file() and not (hf.parent / "hf.tmp").exists()
    assert "mistral_instruct" in (hf / "README.md").read_text()
    v1 = json.loads((converted["llava"][2] / "generation_config.json").read_text())
    assert isinstance(v1["eos_token_id"], list) and len(v1["eos_token_id"]) >= 2  # </s> and "###"
    assert json.loads((converted["llava"][2] / "config.json").read_text())["projector_hidden_act"] == "linear"


def test_non_legacy_tokenizer_gap_is_reported(tmp_path, caplog):
    """A tokenizer that adds no SentencePiece space after special tokens cannot give LLaVA-Med's ids for the text
    after the image: the conversion says so (log and model card)."""
    src, _ = make_source(tmp_path, "llava_mistral", legacy=False)
    assert export(["--from", "llava_med", str(src), "--to", "transformers", "--out", str(tmp_path / "hf")]) == 0
    assert "Tokenization note: stock tokenization differs from LLaVA-Med's" in (tmp_path / "hf/README.md").read_text()


def _unknown(sd, cfg):
    sd["model.vision_resampler.query"] = torch.zeros(4, 64)


def _shape(sd, cfg):
    sd["model.mm_projector.2.weight"] = torch.zeros(64, 32)


def _missing(sd, cfg):
    del sd["lm_head.weight"]


def _model_type(sd, cfg):
    cfg["model_type"] = "llava_qwen"


def _remote_code(sd, cfg):
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling.LlavaMistralForCausalLM"}


@pytest.mark.parametrize("mutate,needle", [
    (_unknown, r"model-0000\d-of-00002.safetensors: tensor model.vision_resampler.query has no place"),
    (_shape, r"tensor model.mm_projector.2.weight has shape \[64, 32\] but .* expects \[64, 64\]"),
    (_missing, r"no tensor for lm_head.weight"),
    (_model_type, r"model_type 'llava_qwen' is not a LLaVA-Med layout"),
    (_remote_code, r"declares auto_map"),
], ids=["unknown", "shape", "missing", "model_type", "remote_code"])
def test_bad_checkpoints_give_one_line_naming_the_tensor(tmp_path, capsys, mutate, needle):
    import re

    src, _ = make_source(tmp_path, "llava_mistral", mutate=mutate)
    assert export(["--from", "llava_med", str(src), "--to", "transformers", "--out", str(tmp_path / "hf")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and re.search(needle, err[0]), err
    assert not (tmp_path / "hf").exists()


class _Planted:
    """Unpickling this writes a file (what a hostile pytorch_model.bin would do instead)."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __reduce__(self):
        return (Path(self.mark).write_text, ("pickle ran",))


def test_hostile_bin_shard_is_refused_without_running(tmp_path, capsys):
    src, clip = make_source(tmp_path, "llava")
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    shard = src / sorted(set(index["weight_map"].values()))[0]
    mark = tmp_path / "PICKLE_RAN"
    torch.save({k: v for k, v in torch.load(shard, weights_only=True).items()} | {"extra": _Planted(mark)}, shard)
    rc = export(["--from", "llava_med", str(src), "--to", "transformers", "--out", str(tmp_path / "hf"),
                 "--vision-tower", str(clip)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and not mark.exists()
    assert len(err) == 1 and f"{shard}: not a readable tensor file" in err[0], err


def test_push_to_hub_follows_the_conversion(tmp_path, capsys, monkeypatch):
    """--push-to-hub runs after the folder is written (offline here: the push fails with exit 1, folder kept)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, _ = make_source(tmp_path, "llava_mistral")
    rc = export(["--from", "llava_med", str(src), "--to", "transformers", "--out", str(tmp_path / "hf"),
                 "--push-to-hub", "someone/llava-med-hf"])
    assert rc == 1 and (tmp_path / "hf/config.json").is_file()
    assert "push to someone/llava-med-hf failed" in capsys.readouterr().err


def test_cli_misuse_exits_2(tmp_path, capsys):
    for argv in (["--from", "llava_med", "--to", "transformers", "--out", str(tmp_path / "o")],
                 ["--from", "llava_med", str(tmp_path), "--to", "open_clip", "--out", str(tmp_path / "o")],
                 ["--from", "llava_med", str(tmp_path), "--checkpoint", str(tmp_path), "--to", "transformers",
                  "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as e:
            export(argv)
        assert e.value.code == 2
    assert export(["--from", "llava_med", str(tmp_path), "--to", "transformers", "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_eval_vqa_generate_runs_on_converted_folder(converted, tmp_path):
    from eval.vqa import main as vqa_main

    root = tmp_path / "slake"
    (root / "imgs").mkdir(parents=True)
    records = [r for r in json.loads((FIXTURES / "slake/validate.json").read_text()) if r["q_lang"] == "en"][:6]
    (root / "test.json").write_text(json.dumps(records))
    for i, r in enumerate(records):
        (root / "imgs" / r["img_name"]).parent.mkdir(parents=True, exist_ok=True)
        image(40 + i, 30, i).save(root / "imgs" / r["img_name"])
    preds = tmp_path / "preds.jsonl"
    rc = vqa_main(["generate", "--checkpoint", str(converted["llava_mistral"][2]), "--benchmark", "slake",
                   "--data-root", str(root), "--out", str(preds), "--batch-size", "4", "--max-new-tokens", "3"])
    assert rc == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert sorted(x["question_id"] for x in lines) == sorted(r["qid"] for r in records)
    assert all(isinstance(x["text"], str) for x in lines)


def test_a_sentencepiece_only_tokenizer_loads(tmp_path):
    """LLaVA-Med (like Llama-2 and Mistral v0.x) ships tokenizer.model without tokenizer.json: transformers
    needs sentencepiece (an install requirement) to read it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["Is there a nodule in the right upper lung?", "The lungs are clear.",
                                 "What imaging modality is this?", "Head CT without contrast."] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=64,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                               "bos_token": "<s>", "eos_token": "</s>",
                                                               "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False)
    ids = tok("The lungs are clear.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The lungs are clear."
