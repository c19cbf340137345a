"""Rehearsal: run a shipped training config as shipped, except the model shrunk to a tiny one of the same
family, and check what a 48-hour run would get wrong in its first minutes.

Kept as shipped: parallelism (run under torchrun as the config is launched), precision and master weights,
adapters and what trains, EMA, packing, gradient checkpointing, the loss, the chat template's *kind* and the
stored dtype of the LLM checkpoint, the data pipeline (sources, mixing, resampling) and the evaluation hooks.
Shrunk: the towers (2 layers, 64 wide, same architecture family and image size), the LLM (same
model_type, tokenizer kind, template shape and stored dtype: from the real config/tokenizer when they are
local or in the Hugging Face cache, else from vlm.models.tiny's families), and the number of steps.
Substituted only where they do not exist here, and reported: data folders (``synthetic``: a
data_prep.synth corpus), the starting checkpoint (a tiny stage-1 one), GPU-only kernels on a CPU.

Checks, each a line of the report: the trainable parameter groups are what the config says; after two
steps every trainable group changed and every frozen one did not; the loss is finite; the checkpoint saved
at step 2 reloads bit-identical (weights and data position) and training resumes from it; the evaluation
hooks ran; samples skipped, by reason.
"""
from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from vlm.models.lora import ADAPTER_PARAM
from vlm.remote_code import refuse_remote_code
from vlm.utils import seed_everything

log = logging.getLogger("train.rehearse")

# Hub ids of LLMs whose family cannot be read offline: org/prefix -> vlm.models.tiny family. Used only when
# neither the id's config nor its tokenizer is local or cached (CI); the real files win when present.
HUB_FAMILIES = [(r"^mistralai/", "mistral"), (r"^meta-llama/Llama-2", "llama2"), (r"^meta-llama/(Meta-)?Llama-3", "llama3"),
                (r"^Qwen/", "qwen2"), (r"^google/(med)?gemma", "gemma"), (r"^microsoft/Phi-3", "phi3")]


# Stock VLM hub ids -> vlm.models.tiny_vlm family, when the id's config.json is not local or cached
HUB_VLM_FAMILIES = [(r"^Qwen/Qwen2\.5-VL", "qwen2_5_vl"), (r"^Qwen/Qwen2-VL", "qwen2_vl"),
                    (r"^google/(medgemma|gemma-3)", "gemma3"), (r"^llava-hf/(llava-v1\.6|llava-next)", "llava_next"),
                    (r"^llava-hf/", "llava"), (r"^(HuggingFaceM4/Idefics3|HuggingFaceTB/SmolVLM)", "idefics3")]


@dataclass
class Rehearsal:
    kind: str  # clip | instruct | preference
    cfg: object  # the run config, shrunk
    notes: list[str] = field(default_factory=list)  # what differs from the shipped config, and why


def config_kind(path: str | Path) -> str:
    """clip, instruct or preference, from the config's own keys (a preference config has a ``preference``,
    ``grpo`` or ``objective`` section; an assistant config names a vision tower or a chat)."""
    from vlm.config import _read_yaml

    raw = _read_yaml(Path(path))
    if any(k in raw for k in ("preference", "grpo", "objective")):
        return "preference"
    model = raw.get("model") or {}
    return "instruct" if "chat" in raw or "vision" in model or "llm" in model or "vlm" in model else "clip"


# -- shrinking ---------------------------------------------------------------------------------------------


def _cached_file(source: str, name: str) -> Optional[Path]:
    """A file of a local folder or of a hub id already in the Hugging Face cache (never a download)."""
    p = Path(source)
    if p.is_dir():
        return p / name if (p / name).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, name)
    except Exception:  # an invalid repo id
        return None
    return Path(hit) if isinstance(hit, str) else None


def _data(cfg, folder_for: str, synthetic: Optional[str], notes: list[str]) -> None:
    for i, src in enumerate(cfg.data.sources):
        if Path(src.path).is_dir():
            continue
        if not synthetic:
            raise ValueError(f"data.sources.{i}.path={src.path} does not exist: the rehearsal reads your data; "
                             f"to rehearse on a synthetic corpus give --synthetic-data DIR "
                             f"(made by python -m data_prep.synth --out DIR)")
        notes.append(f"data.sources.{i}.path: {src.path} (missing) -> {synthetic}/{folder_for}")
        src.path = str(Path(synthetic) / folder_for)


def tiny_clip_arch(arch: dict, image_size: int, work: Path, notes: list[str]) -> dict:
    """The architecture's tiny twin: same image tower kind (open_clip ViT / timm ViT) at the same image size,
    same text tower kind (open_clip transformer / Hugging Face model_type), 64 wide."""
    out = {k: v for k, v in arch.items() if k not in ("vision_cfg", "text_cfg", "_comment")}
    out["embed_dim"] = 64
    v, t = dict(arch["vision_cfg"]), dict(arch["text_cfg"])
    if "timm_model_name" in v:
        # timm's own test ViT (the same class and patch size as BiomedCLIP's ViT-B/16; dynamic image size)
        name = "test_vit"
        out["vision_cfg"] = {**{k: v[k] for k in ("timm_pool", "timm_proj", "timm_proj_bias") if k in v},
                             "timm_model_name": name, "timm_model_pretrained": False, "image_size": image_size}
        notes.append(f"image tower: timm {v['timm_model_name']} -> timm {name}")
    else:
        patch = next(p for p in (32, 16, 8, 4, 2, 1) if image_size % p == 0 and image_size // p <= 8)
        out["vision_cfg"] = {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32,
                             "patch_size": patch, "mlp_ratio": 2.0}
        notes.append(f"image tower: open_clip ViT {v.get('layers')}x{v.get('width')} -> 2x64 (patch {patch})")
    if "hf_model_name" in t:
        folder = tiny_hf_text_tower(t["hf_model_name"], work / "text_tower", notes)
        out["text_cfg"] = {**t, "hf_model_name": str(folder), "hf_tokenizer_name": str(folder)}
    else:
        out["text_cfg"] = {"context_length": t.get("context_length", 77), "vocab_size": t.get("vocab_size", 49408),
                           "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0}
        notes.append(f"text tower: open_clip transformer {t.get('layers', 12)}x{t.get('width', 512)} -> 2x64")
    return out


def tiny_hf_text_tower(source: str, folder: Path, notes: list[str]) -> Path:
    """A 2-layer twin of a Hugging Face text tower: its own config (shrunk) and tokenizer when local or
    cached, else a BERT with an uncased WordPiece vocabulary trained here (PubMedBERT's kind)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    refuse_remote_code(source, "text tower")
    real_cfg = _cached_file(source, "config.json")
    has_tok = _cached_file(source, "tokenizer_config.json") or _cached_file(source, "tokenizer.json")
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False) if has_tok else wordpiece_tokenizer()
    if real_cfg:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=False)
        kind = cfg.model_type
    else:
        kind, cfg = "bert", AutoConfig.for_model("bert")
    for k, val in {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "vocab_size": len(tok)}.items():
        setattr(cfg, k, val)
    AutoModel.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    notes.append(f"text tower: {source} -> 2x64 {kind} ({'its config' if real_cfg else 'assumed bert: not cached'}, "
                 f"{'its tokenizer' if has_tok else 'a WordPiece tokenizer trained here'})")
    return folder


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vlm.models.tiny import CORPUS

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator(CORPUS * 20, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def _gpu_kernels(impl: str, module: str, notes: list[str], key: str) -> str:
    import importlib.util

    if impl in ("xformers", "flash_attention_2") and not (torch.cuda.is_available()
                                                          and importlib.util.find_spec(module)):
        notes.append(f"{key}: {impl} -> sdpa ({module} needs the gpu extra and a CUDA GPU)")
        return "sdpa"
    return impl


def shrink_clip(cfg, work: Path, synthetic: Optional[str]) -> Rehearsal:
    from vlm.registry import get_model_config

    notes: list[str] = []
    _data(cfg, "pretrain", synthetic, notes)  # before building anything: a missing folder is the usual error
    arch = tiny_clip_arch(get_model_config(cfg.model.name), cfg.data.image.size, work, notes)
    (work / "tiny_arch.json").write_text(json.dumps(arch, indent=1))
    notes.insert(0, f"model.name: {cfg.model.name} -> {work / 'tiny_arch.json'}")
    cfg.model.name = str(work / "tiny_arch.json")
    if cfg.model.pretrained:
        notes.append(f"model.pretrained: {cfg.model.pretrained} -> none (the tiny twin starts from scratch)")
        cfg.model.pretrained = None
    cfg.model.attn_impl = _gpu_kernels(cfg.model.attn_impl, "xformers" if cfg.model.attn_impl == "xformers"
                                       else "flash_attn", notes, "model.attn_impl")
    for z in cfg.zeroshot:
        if not Path(z.folder).is_dir():
            if not synthetic:
                raise ValueError(f"zeroshot {z.name}: {z.folder} does not exist (give --synthetic-data DIR)")
            same = Path(synthetic) / "eval/zeroshot" / Path(z.folder).name  # the synthetic set of that name, if any
            folder = same if same.is_dir() else Path(synthetic) / "eval/zeroshot/modality"
            notes.append(f"zeroshot {z.name}: {z.folder} (missing) -> {folder}, default prompts")
            z.folder, z.prompts = str(folder), None
        z.max_images = min(z.max_images or 64, 64)
    return Rehearsal("clip", cfg, notes)


def llm_family(source: str, override: Optional[str]) -> tuple[Optional[str], str]:
    """(vlm.models.tiny family or None when the real files are at hand, how it was decided)."""
    if override:
        return override, "--llm-family"
    if _cached_file(source, "config.json"):
        return None, "its own config.json"
    for rx, fam in HUB_FAMILIES:
        if re.search(rx, source):
            return fam, "the hub-id table (not cached here)"
    from vlm.models.tiny import FAMILIES

    raise ValueError(f"model.llm={source}: its config is not local or cached and its family is unknown; give "
                     f"--llm-family one of {', '.join(sorted(FAMILIES))}")


def tiny_llm_folder(source: str, folder: Path, family_override: Optional[str], notes: list[str]) -> Path:
    """A 2-layer twin of ``source`` saved like a hub checkpoint, in the dtype the original is stored in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vlm.models.tiny import TINY, family, train_tokenizer, tiny_config

    refuse_remote_code(source, "LLM")
    fam, how = llm_family(source, family_override)
    has_tok = _cached_file(source, "tokenizer_config.json") or _cached_file(source, "tokenizer.json")
    if fam is None:
        real = AutoConfig.from_pretrained(source, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False) if has_tok else None
        if tok is None:
            raise ValueError(f"model.llm={source}: config found but no tokenizer (local or cached)")
        cfg = copy.deepcopy(real)
        for k, v in {**TINY, "vocab_size": max(len(tok), real.vocab_size)}.items():
            setattr(cfg, k, v)
        if getattr(cfg, "head_dim", None):
            cfg.head_dim = 16
        dtype = str(getattr(real, "dtype", None) or getattr(real, "torch_dtype", None) or "float32").replace("torch.", "")
        kind = f"{real.model_type} (its config and tokenizer)"
    else:
        tok = train_tokenizer(fam)
        cfg, dtype = tiny_config(fam, len(tok), tok), "bfloat16"
        f = family(fam)
        kind = f"{f.model_type} ({f.tokenizer} tokenizer, {fam}-shaped template, stored bf16; family from {how})"
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    llm.save_pretrained(folder)
    tok.save_pretrained(folder)
    notes.append(f"model.llm: {source} -> 2x64 {kind} in {dtype}")
    return folder


def tiny_vision(source: str, image_size: int, folder: Path, notes: list[str]) -> Path:
    """A 2-layer twin of the vision tower at the config's image size: our open_clip ViT (a train.clip run
    or export, as the shipped configs name) or a transformers CLIP/SigLIP vision model (hub id)."""
    from vlm.hub import export_open_clip
    from vlm.models.clip import MedCLIP

    patch = next(p for p in (32, 16, 8, 4, 2, 1) if image_size % p == 0 and image_size // p <= 8)
    p = Path(source)
    hub = not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith(("runs/", "./"))
    if not hub:
        arch = {"embed_dim": 64, "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32,
                                                "patch_size": patch, "mlp_ratio": 2.0},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
        torch.manual_seed(0)
        export_open_clip(MedCLIP(arch), folder, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
        notes.append(f"model.vision: {source} -> an open_clip ViT 2x64 at {image_size} px, patch {patch} (a train.clip "
                     f"export)")
        return folder
    from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    refuse_remote_code(source, "vision tower")
    cached = _cached_file(source, "config.json")
    kind = AutoConfig.from_pretrained(source, trust_remote_code=False).model_type if cached else ("siglip" if "siglip" in source.lower() else "clip")
    cls, ccls = (SiglipVisionModel, SiglipVisionConfig) if kind.startswith("siglip") else (CLIPVisionModel, CLIPVisionConfig)
    torch.manual_seed(0)
    cls(ccls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
             patch_size=patch)).save_pretrained(folder)
    notes.append(f"model.vision: {source} -> a {cls.__name__} 2x64 at {image_size} px "
                 f"({'its type from its config' if cached else 'type from the id: not cached'})")
    return folder


def tiny_vlm_folder(source: str, folder: Path, family_override: Optional[str], notes: list[str]) -> Path:
    """A tiny stock VLM of ``source``'s family (vlm.models.tiny_vlm), saved in bf16 as hub VLMs are stored."""
    from vlm.models.tiny_vlm import FAMILIES, save_tiny_vlm

    refuse_remote_code(source, "model")
    cached = _cached_file(source, "config.json")
    if family_override:
        fam, how = family_override, "--llm-family"
    elif cached:
        fam, how = json.loads(cached.read_text()).get("model_type"), "its own config.json"
    else:
        fam, how = next((f for rx, f in HUB_VLM_FAMILIES if re.search(rx, source)), None), "the hub-id table"
    if fam not in FAMILIES:
        raise ValueError(f"model.vlm={source}: no tiny stand-in for its family ({fam or 'unknown'}); give "
                         f"--llm-family one of {', '.join(FAMILIES)}")
    save_tiny_vlm(folder, fam, dtype="bfloat16")
    notes.append(f"model.vlm: {source} -> a 2x64 {fam} (its image processor and a {fam}-shaped template, stored "
                 f"bf16; family from {how})")
    return folder


def shrink_instruct(cfg, work: Path, synthetic: Optional[str], family_override: Optional[str]) -> Rehearsal:
    from vlm.checkpoint import save as save_checkpoint
    from vlm.models.tiny import train_tokenizer

    notes: list[str] = []
    kind = "preference" if hasattr(cfg, "preference") else "instruct"
    m = cfg.model
    if m.llm_quantize != "none" and not torch.cuda.is_available():
        raise ValueError(f"model.llm_quantize={m.llm_quantize} (QLoRA) needs bitsandbytes on a CUDA GPU: rehearse "
                         "this config on a GPU machine")
    pairs = getattr(cfg, "objective", "preference") == "preference" and hasattr(cfg, "preference")
    _data(cfg, "preference/shards" if pairs else "pretrain" if cfg.chat.template == "plain" else "instruct",
          synthetic, notes)
    if m.vlm:
        m.vlm = str(tiny_vlm_folder(m.vlm, work / "vlm", family_override, notes))
        m.attn_impl = _gpu_kernels(m.attn_impl, "flash_attn", notes, "model.attn_impl")
        return Rehearsal(kind, cfg, notes)
    m.vision = str(tiny_vision(m.vision, cfg.data.image.size, work / "vision", notes))
    if m.llm:
        m.llm = str(tiny_llm_folder(m.llm, work / "llm", family_override, notes))
        if m.tokenizer:
            notes.append(f"model.tokenizer: {m.tokenizer} -> the tiny LLM's")
            m.tokenizer = None
    elif m.tokenizer and not Path(m.tokenizer).is_dir():
        tok = train_tokenizer("qwen2")  # data_prep.tokenizer's kind: byte-level BPE with ChatML
        tok.save_pretrained(work / "tokenizer")
        notes.append(f"model.tokenizer: {m.tokenizer} (missing) -> a byte-level BPE ChatML tokenizer trained here")
        m.tokenizer = str(work / "tokenizer")
    m.attn_impl = _gpu_kernels(m.attn_impl, "flash_attn", notes, "model.attn_impl")
    if m.init_from:  # a stage-1 checkpoint of the tiny model (what init_from loads: the projector aligned)
        from train.instruct import build_assistant

        first = copy.deepcopy(cfg)
        first.model.stage, first.model.init_from, first.model.lora.r = 1, None, 0
        model, _ = build_assistant(first)
        state = {"step": 0, "config": {"model": {}, "chat": {}}}
        save_checkpoint(work / "init" / "checkpoints", 0, model.state_dict(), {}, state)
        notes.append(f"model.init_from: {m.init_from} -> a stage-1 checkpoint of the tiny model")
        m.init_from = str(work / "init")
    return Rehearsal(kind, cfg, notes)


# -- what trains ---------------------------------------------------------------------------------------------

ADAPTER = ADAPTER_PARAM  # the parameters peft adds


def clip_group(name: str) -> str:
    adapter = " adapters" if ADAPTER.search(name) else ""
    if name.startswith("clip.visual."):
        return "image tower" + adapter
    if name in ("clip.logit_scale", "clip.logit_bias"):
        return name.removeprefix("clip.")
    if name.startswith("concept_logit_"):
        return "concept head"
    return "text tower" + adapter


def expected_clip(cfg, present: set[str]) -> dict[str, str]:
    """Each group: 'all', 'none' or 'some' (partly unlocked) trainable, as the config states it."""
    m = cfg.model
    exp = {}
    for tower, lock, unlocked, lora in (("image tower", m.lock_image, m.lock_image_unlocked_groups, m.lora_image),
                                        ("text tower", m.lock_text, m.lock_text_unlocked_layers, m.lora_text)):
        exp[tower] = "none" if lora.r > 0 or (lock and not unlocked) else ("some" if lock else "all")
        if lora.r > 0:
            exp[tower + " adapters"] = "all"
    exp["logit_scale"] = "all"
    exp["logit_bias"] = "all" if cfg.loss.kind == "siglip" else "none"
    exp["concept head"] = "all" if cfg.loss.concept_weight > 0 else "none"
    # a group the config trains must exist; a frozen one may be absent (a CLIP loss on a model without bias)
    return {g: v for g, v in exp.items() if g in present or v != "none"}


def instruct_group(name: str) -> str:
    if ADAPTER.search(name):
        return "LLM adapters"
    if ".vision_tower." in name:
        return "vision tower"
    if ".multi_modal_projector." in name:
        return "projector"
    return "LLM"


def adapters_only(cfg) -> bool:
    """Preference tuning with LoRA and a reference: the reference is the policy with its adapters off, so only
    the adapters train (train.preference freezes the projector and the vision tower)."""
    if not hasattr(cfg, "preference") or cfg.model.lora.r <= 0:
        return False
    if getattr(cfg, "objective", "preference") == "grpo":
        return cfg.grpo.beta != 0
    return cfg.preference.needs_reference


def expected_instruct(cfg, present: set[str]) -> dict[str, str]:
    m = cfg.model
    exp = {"projector": "none" if adapters_only(cfg) else "all",
           "vision tower": "some" if m.stage == 2 and m.train_vision and not adapters_only(cfg) else "none",
           "LLM": "all" if m.stage == 2 and m.lora.r <= 0 else "none"}
    if m.stage == 2 and m.lora.r > 0:
        exp["LLM adapters"] = "all"
    return {g: v for g, v in exp.items() if g in present or v != "none"}


def stock_groups(model):
    """group_of for a stock VLM: its parts as vlm.models.stock finds them, adapters apart."""
    from vlm.models.stock import part_of, vlm_parts

    parts = vlm_parts(model)
    names = {"vision": "vision tower", "projector": "projector", "llm": "LLM"}
    return lambda n: "LLM adapters" if ADAPTER.search(n) else names[part_of(n, parts)]


def expected_stock(cfg, actual: dict[str, str]) -> dict[str, str]:
    """As expected_instruct; a trained vision tower may be 'some' (layers after the one the model reads and
    pooling heads are frozen: vlm.models.stock.unused_vision_params) or 'all'."""
    m = cfg.model
    lora = m.lora.r > 0
    vision = actual.get("vision tower") if actual.get("vision tower") in ("some", "all") else "all"
    present = set(actual)
    only = adapters_only(cfg)
    exp = {"vision tower": "none" if "vision" in m.freeze or only else vision,
           "projector": "none" if "projector" in m.freeze or only else "all",
           "LLM": "none" if lora or "llm" in m.freeze else "all"}
    if lora:
        exp["LLM adapters"] = "all"
    return {g: v for g, v in exp.items() if g in present or v != "none"}


def trainable_groups(model, group_of) -> dict[str, str]:
    seen: dict[str, set] = {}
    for n, p in model.named_parameters():
        seen.setdefault(group_of(n), set()).add(bool(p.requires_grad))
    return {g: "all" if s == {True} else "none" if s == {False} else "some" for g, s in seen.items()}


def changed_fraction(before: dict, after: dict, group_of) -> dict[str, float]:
    """Per group: the fraction of weight elements that differ after training (fp32 comparison)."""
    num, den = {}, {}
    for k, b in before.items():
        if k not in after or not b.is_floating_point():
            continue
        g = group_of(k)
        num[g] = num.get(g, 0) + int((after[k].float() != b.float()).sum())
        den[g] = den.get(g, 0) + b.numel()
    return {g: num[g] / max(1, den[g]) for g in den}


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _gather_counts(counts: dict, d) -> dict:
    import torch.distributed as dist

    if not d.enabled:
        return dict(counts)
    parts = [None] * d.world_size
    dist.all_gather_object(parts, dict(counts))
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def _build(r: Rehearsal, d):
    """What the entry point builds for this config (train.clip / train.instruct / train.preference), seeded as
    they seed."""
    from train.clip import build_run as clip_run
    from train.instruct import build_run as instruct_run
    from train.preference import build_run as preference_run

    seed_everything(r.cfg.train.seed)
    model, kwargs = {"clip": clip_run, "instruct": instruct_run, "preference": preference_run}[r.kind](r.cfg, d)
    kwargs.pop("tokenizer", None)
    seed_everything(r.cfg.train.seed + d.rank)
    return model, kwargs


def run(r: Rehearsal, d, steps: int = 2, max_skipped: float = 0.5) -> list[Check]:
    """Train ``steps`` steps with a checkpoint at the last, reload it in a fresh run and train one more step.
    ``max_skipped``: the largest fraction of the samples read that may be skipped. Returns the checks (rank 0
    holds the full list; other ranks an empty one)."""
    import math

    from train.trainer import Trainer
    from vlm.checkpoint import model_weights, shard_metadata

    t = r.cfg.train
    t.steps, t.save_every, t.resume, t.log_every = steps, steps, None, 1
    t.tensorboard, t.wandb_project, t.progress = False, None, False
    group_of, expected = (clip_group, expected_clip) if r.kind == "clip" else (instruct_group, expected_instruct)
    checks: list[Check] = []

    model, kwargs = _build(r, d)
    if r.kind != "clip" and r.cfg.model.vlm:
        group_of = stock_groups(model)
    actual = trainable_groups(model, group_of)
    want = expected_stock(r.cfg, actual) if r.kind != "clip" and r.cfg.model.vlm else expected(r.cfg, set(actual))
    before = {k: v.detach().cpu().clone() for k, v in model.named_parameters()} if d.is_main else {}
    trainer = Trainer(model, **kwargs)
    res = trainer.fit()
    skipped = _gather_counts(trainer.loader.skipped, d)
    read = _gather_counts({"read": sum(trainer.loader.raw)}, d)["read"]  # samples the workers went through
    saved = trainer.ckpt_dir / f"step_{steps:08d}"
    if not (saved / "COMPLETE").exists():
        raise RuntimeError(f"the rehearsal's run wrote no complete checkpoint at step {steps} in {trainer.ckpt_dir}")
    if d.is_main:
        after = model_weights(saved)
        changed = changed_fraction(before, after, group_of)
        for g in sorted(set(actual) | set(want)):
            exp, got, frac = want.get(g, "?"), actual.get(g, "absent"), changed.get(g, 0.0)
            moved = frac > 0 if got != "none" else frac == 0
            checks.append(Check(f"{g}", exp == got and moved,
                                f"config: {exp:<4}  model: {got:<6}  changed after {steps} steps: {100 * frac:.1f}% "
                                f"of elements"))
        loss = res["metrics"].get("loss", float("nan"))
        checks.append(Check("loss", math.isfinite(loss), f"{loss:.4f} at step {res['step']}"))
        if r.cfg.optim.ema_decay > 0:
            ema = model_weights(saved, ema=True) if any(k.startswith("ema.") for k in shard_metadata(saved)) else {}
            shapes = {k: tuple(v.shape) for k, v in after.items()}
            ok = bool(ema) and {k: tuple(v.shape) for k, v in ema.items()} == shapes
            checks.append(Check("ema", ok, f"decay {r.cfg.optim.ema_decay}: {len(ema)} tensors saved, "
                                           f"{'the model' if ok else 'NOT the model'}'s names and shapes"))
    del trainer, model

    t.steps = steps + 1
    model, kwargs = _build(r, d)
    trainer = Trainer(model, **kwargs)
    trainer.resume(saved)
    state = trainer._model_state()  # collective under FSDP
    data_ok = json.loads(json.dumps(trainer.loader.state_dict())) == \
        json.loads((saved / "state.json").read_text())["data"][d.rank]  # as JSON: tuples and lists alike
    data_ok = _gather_counts({"ok": int(data_ok)}, d).get("ok", 0) == d.world_size  # every rank's own
    if d.is_main:
        ref = model_weights(saved)
        same = set(ref) == set(state) and all(torch.equal(ref[k], state[k].to(ref[k].dtype)) for k in ref)
        checks.append(Check("checkpoint", same and data_ok,
                            f"{saved.name} reloaded: weights {'identical' if same else 'DIFFER'}, data position "
                            f"{'identical' if data_ok else 'DIFFERS'}"))
    res2 = trainer.fit()
    if d.is_main:
        loss2 = res2["metrics"].get("loss", float("nan"))
        checks.append(Check("resume", res2["step"] == steps + 1 and math.isfinite(loss2),
                            f"continued to step {res2['step']}, loss {loss2:.4f}"))
        if kwargs.get("eval_fn") is not None:
            flat = json.dumps(res["eval"])[:160]
            checks.append(Check("eval", bool(res["eval"]), f"ran at step {res['step']}: {flat}"))
        else:
            checks.append(Check("eval", True, "no evaluation hook in this config"))
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"
        n_skipped = sum(skipped.values())
        frac = n_skipped / max(1, read)
        checks.append(Check("skipped", frac <= max_skipped,
                            f"{n_skipped} of {read} samples read skipped ({100 * frac:.1f}%, at most "
                            f"{100 * max_skipped:.0f}% allowed), by reason on all ranks: {why}"))
    return checks


def report(path: str, r: Rehearsal, d, checks: list[Check]) -> str:
    t = r.cfg.train
    lines = [f"rehearsal of {path}: train.{r.kind}, {d.world_size} process(es), parallel={t.parallel}, "
             f"precision={t.precision}, master weights {t.master_dtype}",
             "as shipped except:"] + [f"  - {n}" for n in r.notes] + ["checks:"]
    lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name:<20} {c.detail}" for c in checks]
    lines.append("RESULT: " + ("PASS" if all(c.ok for c in checks) else "FAIL"))
    return "\n".join(lines)
