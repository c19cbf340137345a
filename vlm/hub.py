"""Export to stock-library folders (open_clip today; transformers for the assistant), model cards,
and upload to the Hugging Face Hub.

An open_clip export folder holds what ``open_clip.create_model_from_pretrained('local-dir:PATH')``
reads: ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}), ``open_clip_model.safetensors``
(the wrapped open_clip model's state dict, so the names are open_clip's own), the tokenizer files
of a Hugging Face text tower, and a README.md model card.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from safetensors.torch import save_file

from vlm.utils import atomic_folder

log = logging.getLogger(__name__)


def export_open_clip(model, out: str | Path, image_mean: list[float], image_std: list[float],
                     card: Optional[str] = None) -> Path:
    """Write ``model`` (a MedCLIP) as an open_clip folder; returns the folder."""
    out = Path(out)
    with atomic_folder(out) as tmp:
        arch = json.loads(json.dumps(model.arch))
        text = arch["text_cfg"]
        if "hf_model_name" in text:
            text["hf_model_pretrained"] = False  # the weights are in this folder, not on the hub
            if Path(text["hf_model_name"]).is_dir():  # a local tower: open_clip needs its config at load time
                text["hf_model_name"] = str(Path(text["hf_model_name"]).resolve())
                log.warning("the text tower is a local folder (%s): the export refers to it by absolute path",
                            text["hf_model_name"])
            from vlm.models.clip import build_tokenizer

            build_tokenizer(model.arch).tokenizer.save_pretrained(tmp)  # open_clip's local-dir reads these
        fill = int(round(255 * sum(image_mean) / 3))
        config = {"model_cfg": arch,
                  "preprocess_cfg": {"size": model.image_size, "mean": list(image_mean), "std": list(image_std),
                                     "interpolation": "bilinear", "resize_mode": "longest", "fill_color": fill}}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=1))
        state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
        save_file(state, tmp / "open_clip_model.safetensors")
        if card:
            (tmp / "README.md").write_text(card)
    return out


def clip_model_card(name: str, arch: dict, info: dict, results: Optional[dict] = None) -> str:
    """A model card: architecture, training data and the zero-shot results the run measured."""
    vision = arch["vision_cfg"]
    text = arch["text_cfg"]
    tower = vision.get("timm_model_name") or f"ViT {vision.get('layers')}x{vision.get('width')}, patch " \
                                               f"{vision.get('patch_size')}"
    text_tower = text.get("hf_model_name") or f"text transformer {text.get('layers')}x{text.get('width')}"
    data = info.get("config", {}).get("data", {}).get("sources", [])
    lines = [
        "---", "library_name: open_clip", "tags: [clip, medical, zero-shot-image-classification]", "---", "",
        f"# {name}", "",
        "A medical CLIP model trained with this repository's `train.clip`; it loads in stock open_clip:", "",
        "```python", "import open_clip",
        "model, preprocess = open_clip.create_model_from_pretrained('hf-hub:REPO')  # or 'local-dir:PATH'",
        "tokenizer = open_clip.get_tokenizer('hf-hub:REPO')", "```", "",
        "## Architecture", "",
        f"- image tower: {tower}, {vision.get('image_size')} px",
        f"- text tower: {text_tower}, context {text.get('context_length', 77)}",
        f"- embedding dimension: {arch['embed_dim']}", "",
        "## Training data", "",
        *([f"- {s.get('path')} (weight {s.get('weight', 1.0)})" for s in data] or ["- not recorded"]),
        f"- steps: {info.get('step', 'unknown')}", "",
    ]
    if results:
        lines += ["## Zero-shot results (measured by the training run)", "", "| set | accuracy | balanced acc. | "
                  "macro-F1 | mean AUROC |", "|---|---|---|---|---|"]
        for k, r in results.items():
            lines.append(f"| {k} | {r.get('accuracy', 0):.3f} | {r.get('balanced_accuracy', 0):.3f} | "
                         f"{r.get('macro_f1', 0):.3f} | {(r.get('mean_auroc') or 0):.3f} |")
        lines.append("")
    lines += ["## Limitations", "", "Research use only; not a medical device. Zero-shot results depend on the "
              "prompts (see configs/prompts/).", ""]
    return "\n".join(lines)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, message: str = "Upload model") -> str:
    """Create (if needed) and upload ``folder`` to ``repo_id``; returns the repo URL."""
    import os

    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RuntimeError("HF_HUB_OFFLINE=1: cannot push to the Hugging Face Hub (unset it, and log in with "
                           "`hf auth login` or HF_TOKEN)")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    return f"https://huggingface.co/{repo_id}"
