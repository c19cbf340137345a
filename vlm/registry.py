"""Architectures are data: one open_clip-format JSON per model under configs/model/.

    list_models()                       -> ["biomedclip-vit-b16-pubmedbert", "tiny-vit-text", ...]
    get_model_config("tiny-vit-text")   -> the dict open_clip builds from
    get_model_config("path/to/x.json")  -> also fine: any JSON file

Keys starting with "_" are comments. Tiny variants (2 layers, 64 wide) sit beside the real ones,
so every code path is tested on a real, small model (timm's test_vit idea).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


def list_models() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.json"))


def get_model_config(name: str) -> dict:
    path = Path(name)
    if not (path.suffix == ".json" and path.is_file()):
        path = MODEL_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}: not a JSON file and not one of {list_models()}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"{path}: an architecture needs {key!r}")
    return copy.deepcopy({k: v for k, v in cfg.items() if not k.startswith("_")})
