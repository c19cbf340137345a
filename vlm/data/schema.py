"""The shard sample schema and ``manifest.json``: the contract between data_prep and vlm.data.

A sample is one WebDataset key (``<source>-<id>``, unique within a folder, no dots) with members

    <key>.jpg | <key>.png        primary image (16-bit PNG stays 16-bit)
    <key>.view1.png, ...         further views of a multi-view study (optional)
    <key>.txt                    caption or report, UTF-8 (optional for instruction data)
    <key>.json                   metadata: source, modality, split, and optionally concepts
                                 ([{"name", "cui", "span": [start, end]}]), labels, conversations
                                 (LLaVA format), qa (VQA records), num_images; preference pairs:
                                 chosen, rejected (conversations = the prompt)

Every shard folder has ``manifest.json``::

    {"schema_version": 1, "num_samples": N, "created_by": "...", "summary": {...},
     "shards": [{"name": "shard-000000.tar", "num_samples": n, "bytes": b, "sha256": "..."}]}
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from vlm.utils import atomic_write_text

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTS = ("png", "jpg", "jpeg")
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
REQUIRED_META = ("source", "modality", "split")


class ManifestError(ValueError):
    """A shard folder whose manifest is missing, malformed or disagrees with the files."""


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key fragment: letters, digits, '_' and '-' only (dots would split the key)."""
    out = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return out or "x"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    folder: Path
    num_samples: int
    shards: list[ShardInfo]
    schema_version: int = SCHEMA_VERSION
    extra: dict | None = None

    @property
    def paths(self) -> list[str]:
        return [str(self.folder / s.name) for s in self.shards]

    def to_json(self) -> dict:
        d = {"schema_version": self.schema_version, "num_samples": self.num_samples}
        d.update(self.extra or {})
        d["shards"] = [vars(s) | {} for s in self.shards]
        return d

    def write(self) -> Path:
        path = self.folder / MANIFEST
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")
        return path


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check the shape of ``folder/manifest.json`` (not the shard contents)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST} (is this a shard folder written by data_prep.shards?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    for key in ("schema_version", "num_samples", "shards"):
        if key not in raw:
            raise ManifestError(f"{path}: missing key {key!r}")
    if raw["schema_version"] > SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {raw['schema_version']} is newer than this code ({SCHEMA_VERSION})")
    shards = []
    for i, s in enumerate(raw["shards"]):
        missing = [k for k in ("name", "num_samples", "bytes", "sha256") if k not in s]
        if missing:
            raise ManifestError(f"{path}: shards[{i}] lacks {missing}")
        if "/" in s["name"] or s["name"].startswith("."):
            raise ManifestError(f"{path}: shards[{i}] name {s['name']!r} must be a plain file name")
        shards.append(ShardInfo(s["name"], int(s["num_samples"]), int(s["bytes"]), s["sha256"]))
    total = sum(s.num_samples for s in shards)
    if total != raw["num_samples"]:
        raise ManifestError(f"{path}: num_samples {raw['num_samples']} != sum over shards {total}")
    extra = {k: v for k, v in raw.items() if k not in ("schema_version", "num_samples", "shards")}
    return Manifest(folder, raw["num_samples"], shards, raw["schema_version"], extra)


def split_member_name(name: str) -> tuple[str, str] | None:
    """``'dir/key.view1.png' -> ('dir/key', 'view1.png')``; None for names that try to escape.

    Absolute paths, ``..`` components and backslashes are rejected: a shard must never be able to
    name a file outside its own namespace.
    """
    if not name or name.startswith("/") or "\\" in name or any(p == ".." for p in name.split("/")):
        return None
    base = name.rsplit("/", 1)
    stem = base[-1]
    if "." not in stem:
        return None
    key, ext = stem.split(".", 1)
    prefix = base[0] + "/" if len(base) == 2 else ""
    return prefix + key, ext.lower()
