"""Checkpoints: one Stateful bundle per step, written atomically, the last K kept.

A checkpoint is a folder ``<dir>/step_<N>/``:

    model.safetensors   the model's full state dict (safetensors: no pickle)
    ema.safetensors     the EMA weights, when EMA is on
    train_state.pt      optimizer, scheduler, grad scaler, torch RNG states (tensors and plain
                        containers only: loaded with torch.load(weights_only=True))
    state.json          step, epoch, data-stream position, python/numpy RNG, counters, config
    COMPLETE            written last

It is written as ``step_<N>.tmp`` and renamed when complete, so a crash never leaves a half
checkpoint that ``resume=latest`` could pick. Only rank 0 writes (the state dict is gathered to
full first, which also works under FSDP2).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    pass


def rng_state() -> tuple[dict, dict]:
    """(json-able python/numpy state, tensor state) of every RNG we use."""
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.match(p.name)) and (p / "COMPLETE").exists()]
    return [p for _, p in sorted(found)]


def resolve(resume: Optional[str], folder: str | Path) -> Optional[Path]:
    """``latest`` -> the newest complete checkpoint in ``folder`` (None if there is none); a path -> itself."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "COMPLETE").exists():
        raise CheckpointError(f"{p} is not a complete checkpoint (no COMPLETE marker)")
    return p


def save(folder: str | Path, step: int, model_state: dict, train_state: dict, state: dict,
         ema_state: Optional[dict] = None, keep_last: int = 3) -> Path:
    """Write ``folder/step_<step>`` atomically and prune to the last ``keep_last``."""
    folder = Path(folder)
    final = folder / f"step_{step:08d}"
    tmp = folder / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_unshared(model_state), tmp / "model.safetensors")
    if ema_state is not None:
        save_file(_unshared(ema_state), tmp / "ema.safetensors")
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for name in ("model.safetensors", "ema.safetensors", "train_state.pt", "state.json"):
        if (tmp / name).exists():
            _fsync(tmp / name)  # the data on disk before COMPLETE says it is
    with open(tmp / "COMPLETE", "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)  # the folder's entries
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(folder)  # the rename itself
    for old in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unshared(state: dict) -> dict:
    """CPU, contiguous tensors with no two sharing memory (tied weights, e.g. an LLM's input embedding
    and its head, are one tensor under two names: safetensors refuses that, so later names get a copy)."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | Path) -> tuple[dict, dict, dict, Optional[dict]]:
    """-> (model state, train state, state.json, ema state or None). Never unpickles objects."""
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"{path} is not a complete checkpoint")
    model_state = load_file(path / "model.safetensors")
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None
    return model_state, train_state, state, ema


def check_weights(model: torch.nn.Module, weights: dict, what: str = "checkpoint") -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k}: {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{name} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise CheckpointError(f"{what} does not match this architecture: " + "; ".join(parts))


def load_weights_into(model: torch.nn.Module, weights: dict, what: str = "checkpoint") -> None:
    """Strict load that names mismatched tensors (missing, unexpected, wrong shape)."""
    check_weights(model, weights, what)
    model.load_state_dict(weights, strict=True)
