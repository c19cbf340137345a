"""Medical CLIP on top of open_clip: any open_clip or timm image tower, any open_clip or Hugging
Face text tower, built from an open_clip-format JSON architecture (configs/model/).

``MedCLIP`` holds a stock open_clip model (``self.clip``), so its state dict is open_clip's and an
export is a plain ``open_clip_config.json`` + weights that stock open_clip loads. Around it we add
what medical pretraining needs: patch embeddings and token embeddings in the joint space (for
concept alignment) and the concept head's own logit scale and bias.

Shapes: images (B, 3, S, S); tokens (B, L); features (B, D) with D = embed_dim; patch embeddings
(B, N, D) with N = (S / patch)^2.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm.registry import get_model_config

log = logging.getLogger(__name__)


def check_hf_source(name_or_path: str, what: str = "text tower") -> None:
    """A Hugging Face text tower must be a local folder, or a hub id already in the local cache, and must not
    ship Python code (vlm/remote_code.py)."""
    import os

    from vlm.remote_code import refuse_remote_code

    refuse_remote_code(name_or_path, what)
    if Path(name_or_path).is_dir():
        wanted = ("tokenizer.json", "tokenizer_config.json") if what == "tokenizer" else ("config.json",)
        if not any((Path(name_or_path) / f).is_file() for f in wanted):
            raise ValueError(f"{what} folder {name_or_path} has no {' or '.join(wanted)}")
        return
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_like_path:
        raise ValueError(f"{what} {name_or_path!r} is not a local folder (and not a hub id 'org/name')")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # an invalid repo id
        cached = None
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not isinstance(cached, str) and offline:
        raise ValueError(f"{what} {name_or_path!r} is not a local folder and not in the Hugging Face cache, "
                         "and HF_HUB_OFFLINE=1: nothing can be downloaded")


def build_open_clip(arch: dict, pretrained_text: bool = True) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP for Hugging Face text towers) from an architecture dict."""
    from open_clip.model import CLIP, CustomTextCLIP

    arch = dict(arch)
    text_cfg = dict(arch.pop("text_cfg"))
    vision_cfg = dict(arch.pop("vision_cfg"))
    custom = "hf_model_name" in text_cfg or arch.pop("custom_text", False)
    if "hf_model_name" in text_cfg:
        check_hf_source(text_cfg["hf_model_name"])
        text_cfg.setdefault("hf_model_pretrained", pretrained_text)
    cls = CustomTextCLIP if custom else CLIP
    return cls(vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True, **arch)


@contextlib.contextmanager
def _output_tokens(tower: nn.Module):
    """Temporarily make an open_clip tower return (pooled, tokens)."""
    was = tower.output_tokens
    tower.output_tokens = True
    try:
        yield
    finally:
        tower.output_tokens = was


class MedCLIP(nn.Module):
    def __init__(self, arch: dict | str, pretrained_text: bool = True):
        super().__init__()
        self.arch = get_model_config(arch) if isinstance(arch, str) else dict(arch)
        self.clip = build_open_clip(self.arch, pretrained_text)
        # ConceptCLIP-style patch-concept alignment has its own sigmoid scale and bias
        self.concept_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.concept_logit_bias = nn.Parameter(torch.tensor(-10.0))

    # -- properties ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        s = self.arch["vision_cfg"].get("image_size", 224)
        return s if isinstance(s, int) else s[0]

    @property
    def context_length(self) -> int:
        return self.arch["text_cfg"].get("context_length", 77)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> Optional[nn.Parameter]:
        return getattr(self.clip, "logit_bias", None)

    # -- encoders --------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def encode_image_with_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled (B, D), patch embeddings (B, N, D)), both L2-normalised, in the joint space."""
        visual = self.clip.visual
        if hasattr(visual, "trunk"):  # timm tower: per-token trunk features through the same head
            x = visual.trunk.forward_features(images)  # (B, T, C)
            prefix = getattr(visual.trunk, "num_prefix_tokens", 1)
            pooled = visual.head(visual.trunk.forward_head(x))
            patches = visual.head(x[:, prefix:])
        else:  # open_clip VisionTransformer: tokens after ln_post, projected like the pooled one
            with _output_tokens(visual):
                pooled, tokens = visual(images)
            patches = tokens @ visual.proj if visual.proj is not None else tokens
        return F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1)

    def encode_text_with_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled (B, D), per-token embeddings (B, L, D)), both L2-normalised, in the joint space.

        Token states are taken where the tower's pooling reads them (after the final norm) and
        projected with the same projection as the pooled feature.
        """
        text = getattr(self.clip, "text", None)
        if text is not None and hasattr(text, "transformer") and hasattr(text, "pooler"):  # Hugging Face tower
            with _output_tokens(text):
                pooled, states = text(tokens)
            per_token = text.proj(states)
        else:  # open_clip text transformer (inside CLIP, or CustomTextCLIP's TextTransformer)
            owner = text if text is not None else self.clip
            captured = {}
            handle = owner.ln_final.register_forward_hook(lambda m, i, o: captured.update(states=o))
            try:
                pooled = self.clip.encode_text(tokens, normalize=False)
            finally:
                handle.remove()
            proj = owner.text_projection
            states = captured["states"]
            per_token = proj(states) if isinstance(proj, nn.Linear) else (states @ proj if proj is not None else states)
        return F.normalize(pooled, dim=-1), F.normalize(per_token, dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, patches: bool = False,
                concept_tokens: Optional[torch.Tensor] = None) -> dict:
        """Everything a step needs in one forward, so that DDP sees every parameter use.

        concept_tokens: (C, L) tokenised concept names -> "concept_features" (C, D), normalised.
        """
        out = {"logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}
        if patches:
            out["image_features"], out["image_patches"] = self.encode_image_with_patches(images)
        else:
            out["image_features"] = self.encode_image(images)
        if concept_tokens is not None and len(concept_tokens):
            both = self.encode_text(torch.cat([tokens, concept_tokens]))
            out["text_features"], out["concept_features"] = both[:len(tokens)], both[len(tokens):]
        else:
            out["text_features"] = self.encode_text(tokens)
        return out

    def tower_prefix(self, tower: str) -> str:
        """Qualified-name prefix of the image or text tower's modules."""
        if tower == "image":
            return "clip.visual."
        return "clip.text." if hasattr(self.clip, "text") else "clip.transformer."

    # -- freezing ----------------------------------------------------------------------------
    def lock_image(self, unlocked_groups: int = 0) -> None:
        """Freeze the image tower, its projection into the joint space included (open_clip's own lock leaves
        a timm tower's head trainable); keep the last ``unlocked_groups`` of open_clip's layer groups
        trainable (for a ViT the last group is the final norm and the projection)."""
        self.clip.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=True)
        if unlocked_groups == 0:
            self.freeze_tower("image")

    def lock_text(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower, its projection included (open_clip's lock leaves a Hugging Face tower's
        projection trainable); keep the last ``unlocked_layers`` trainable (open_clip's groups: for its own
        text transformer the first one unlocked is the final norm and projection)."""
        self.clip.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=True)
        if unlocked_layers == 0:
            self.freeze_tower("text")

    def in_tower(self, name: str, tower: str) -> bool:
        """Whether parameter ``name`` belongs to the image or text tower (open_clip's own text transformer
        keeps its embeddings, final norm and projection beside ``transformer``, at the top level)."""
        if tower == "image":
            return name.startswith("clip.visual.")
        top = ("clip.token_embedding.", "clip.positional_embedding", "clip.ln_final.", "clip.text_projection")
        return name.startswith(self.tower_prefix("text")) or (not hasattr(self.clip, "text") and name.startswith(top))

    def freeze_tower(self, tower: str, keep=lambda name: False) -> None:
        """Freeze every parameter of a tower except those ``keep`` names (adapters, say)."""
        for name, p in self.named_parameters():
            if self.in_tower(name, tower) and not keep(name):
                p.requires_grad = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)


def build_tokenizer(arch: dict | str):
    """The text tower's tokenizer: open_clip's BPE (shipped with open_clip) or the HF tokenizer."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    arch = get_model_config(arch) if isinstance(arch, str) else arch
    text_cfg = arch["text_cfg"]
    ctx = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        check_hf_source(text_cfg["hf_tokenizer_name"], "tokenizer")
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx)
    return SimpleTokenizer(context_length=ctx)


def load_clip(path: str | Path, use_ema: bool = False) -> tuple[MedCLIP, dict]:
    """A trained CLIP from a train.clip checkpoint folder (checkpoints/step_N or its run folder) or an
    open_clip export folder (open_clip_config.json + weights). -> (model in eval mode, info)."""
    import json

    from safetensors.torch import load_file

    from vlm.checkpoint import is_sharded, list_checkpoints, load_weights_into, model_weights

    p = Path(path)
    if (p / "checkpoints").is_dir():  # a run folder: its newest checkpoint
        found = list_checkpoints(p / "checkpoints")
        if not found:
            raise ValueError(f"{p}: no complete checkpoint under checkpoints/")
        p = found[-1]
    if (p / "open_clip_config.json").is_file():
        from vlm.remote_code import refuse_remote_code

        refuse_remote_code(p, "open_clip export")
        cfg = json.loads((p / "open_clip_config.json").read_text())
        model = MedCLIP(cfg["model_cfg"], pretrained_text=False)
        weights = next((p / n for n in ("open_clip_model.safetensors", "model.safetensors") if (p / n).is_file()), None)
        if weights is None:
            raise ValueError(f"{p}: no open_clip_model.safetensors")
        load_weights_into(model.clip, load_file(weights), str(weights))
        return model.eval(), {"arch": cfg["model_cfg"], "source": str(p), "preprocess": cfg.get("preprocess_cfg", {})}
    if (p / "state.json").is_file() and ((p / "model.safetensors").is_file() or is_sharded(p)):
        state = json.loads((p / "state.json").read_text())
        mcfg = state["config"]["model"]
        name = mcfg["name"]
        model = MedCLIP(name, pretrained_text=False)
        weights = model_weights(p, ema=use_ema)
        lora = {t: mcfg.get(f"lora_{t}", {}) for t in ("image", "text")}
        if any(c.get("r", 0) > 0 for c in lora.values()):  # rebuild the adapters, load, fold them in
            from vlm.models.lora import inject_lora

            for tower, c in lora.items():
                if c.get("r", 0) > 0:
                    inject_lora(model, model.tower_prefix(tower), c["target"], c["r"], c["alpha"], 0.0,
                                adapter_name=f"lora_{tower}", method=c.get("method", "lora"))
            load_weights_into(model, weights, str(p))
            from vlm.models.lora import merge_lora

            merge_lora(model)
        else:
            load_weights_into(model, weights, str(p))
        image = state["config"].get("data", {}).get("image", {})
        return model.eval(), {"arch": model.arch, "source": str(p), "model_name": name, "step": state["step"],
                              "image": image, "config": state["config"]}
    raise ValueError(f"{p} is neither a train.clip checkpoint (state.json + weights) nor an open_clip "
                     "export (open_clip_config.json)")
