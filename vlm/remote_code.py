"""No code from model folders: a model, tokenizer or processor folder that asks transformers to import
its own Python (``auto_map`` in any of its configs) is refused before anything loads it.

transformers prompts on stdin when a folder has custom code and ``trust_remote_code`` was not passed,
and ``echo y |`` would then run that folder's Python. Every ``from_pretrained`` of this project passes
``trust_remote_code=False`` (tests/reliability/test_remote_code.py scans the source), libraries we call
(open_clip's Hugging Face text tower and tokenizer) do not, so every loader first calls
``refuse_remote_code`` on its folder or cached hub snapshot, which also turns transformers' prompt into an
immediate error for the rest of the process. There is no switch to allow remote code: convert such a
model to a native transformers architecture (or remove ``auto_map`` when the architecture is native).
"""
from __future__ import annotations

import json
from pathlib import Path

# the files in which transformers looks for auto_map (models, tokenizers, processors, image processors)
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                "image_processor_config.json", "video_preprocessor_config.json", "feature_extractor_config.json",
                "generation_config.json", "chat_template.json", "open_clip_config.json")
# auto_map / custom_pipelines name the folder's Python; trust_remote_code=true inside a config (open_clip passes
# an export's tokenizer_kwargs to from_pretrained as they are) would switch the refusal off
CODE_KEYS = ("auto_map", "custom_pipelines", "trust_remote_code")


class RemoteCodeError(ValueError):
    """A folder that would need its own Python code to load."""


def _has_code_key(obj) -> str | None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in CODE_KEYS and v not in (None, False, {}, [], "", "false", "False"):
                return k
            found = _has_code_key(v)
            if found:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _has_code_key(v)
            if found:
                return found
    return None


def _config_files(source: str) -> list[tuple[str, Path]]:
    p = Path(source).expanduser()
    if p.is_dir():
        return [(f, p / f) for f in CONFIG_FILES if (p / f).is_file()]
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        return []  # neither a folder nor a hub id: the loader reports it
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    out = []
    for f in CONFIG_FILES:
        try:
            cached = try_to_load_from_cache(source, f)
        except Exception:  # an invalid repo id: the loader's own error names it
            return out
        if isinstance(cached, str):
            out.append((f, Path(cached)))
    return out


def refuse_remote_code(source: str | Path, what: str = "model") -> None:
    """Raise RemoteCodeError when the folder or cached hub repo ``source`` declares custom code."""
    forbid_remote_code_prompt()
    for name, path in _config_files(str(source)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable config: the loader's own error names it
        key = _has_code_key(data)
        if key:
            raise RemoteCodeError(
                f"{what} {source}: {name} declares {key} (Python code shipped with the model); medvlm never runs "
                "code from a model folder. Use a model with a native transformers architecture (remove "
                f"{key} if the architecture is native)")


def forbid_remote_code_prompt() -> None:
    """Make transformers raise instead of asking on stdin, for calls we do not make ourselves (open_clip)."""
    try:
        import transformers.dynamic_module_utils as dmu
    except ImportError:
        return
    dmu.TIME_OUT_REMOTE_CODE = 0
