"""One shard writer shared by every source reader.

A reader yields ``Record`` objects: a key, a caption or report, metadata, and one or more
``ImageRef`` (a picklable loader function and its arguments). Worker processes load and encode
images (the slow part) in order; the main process deduplicates, writes each shard under a
temporary name, renames it when complete, and writes ``manifest.json`` last, so an interrupted
run never leaves a half shard counted. Bad rows are skipped and counted by reason; the first few
offenders are named in the summary.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlm.data.schema import KEY_RE, MANIFEST, Manifest, ShardInfo, sha256_file

log = logging.getLogger(__name__)
MAX_OFFENDERS = 5


class SkipSample(Exception):
    """Raised by a loader for a row that cannot become a sample; ``reason`` is counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Pixels:
    """Decoded pixels (uint8 or uint16, HxW or HxWx3) and, when untouched, the source file bytes."""

    array: np.ndarray
    src_bytes: Optional[bytes] = None
    src_format: Optional[str] = None  # "png" | "jpg"


@dataclass
class ImageRef:
    load: Callable[..., Pixels]  # a module-level function, so it pickles by reference
    args: tuple = ()


@dataclass
class Record:
    key: str
    images: list[ImageRef]
    text: Optional[str] = None
    meta: dict = field(default_factory=dict)
    label: str = ""  # how the summary names this row when it fails (a path, a row number)


@dataclass
class Rejected:
    """Yielded by a reader for a row it cannot turn into a record (counted, never written)."""

    reason: str
    label: str
    detail: str = ""


@dataclass
class WriteOptions:
    max_size: Optional[int] = None  # resize the longer side down to this many pixels
    image_format: str = "auto"  # auto | png | jpg
    jpeg_quality: int = 95
    dedup: bool = False
    max_pixels: int = 64_000_000


# ------------------------------------------------------------------------------------------
# Image loading helpers used by readers


def load_image_file(path: str, max_pixels: int = 64_000_000) -> Pixels:
    if not os.path.isfile(path):
        raise SkipSample("missing_image", path)
    with open(path, "rb") as f:
        data = f.read()
    return load_image_bytes(data, max_pixels)


def load_image_bytes(data: bytes, max_pixels: int = 64_000_000) -> Pixels:
    try:
        img = Image.open(io.BytesIO(data))
        if img.size[0] * img.size[1] > max_pixels:
            raise SkipSample("image_too_large", f"{img.size[0]}x{img.size[1]}")
        img.load()
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("bad_image", str(e)) from None
    fmt = {"PNG": "png", "JPEG": "jpg"}.get(img.format or "")
    if img.mode in ("I;16", "I;16B", "I;16L"):
        arr = np.asarray(img).astype(np.uint16)
    elif img.mode == "I":
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    elif img.mode in ("L", "RGB"):
        arr = np.asarray(img)
    elif img.mode == "LA":
        arr, fmt = np.asarray(img.convert("L")), None
    else:
        arr, fmt = np.asarray(img.convert("RGB")), None
    return Pixels(arr, data if fmt else None, fmt)


def resize_longer(arr: np.ndarray, max_size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if max(h, w) <= max_size:
        return arr
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if arr.dtype == np.uint16:  # PIL resizes 32-bit float images; keep the 16-bit range
        out = Image.fromarray(arr.astype(np.float32)).resize(size, Image.BICUBIC)
        return np.clip(np.asarray(out), 0, 65535).round().astype(np.uint16)
    return np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC))


def encode_pixels(px: Pixels, opts: WriteOptions) -> tuple[str, bytes]:
    arr, touched = px.array, False
    if opts.max_size and max(arr.shape[:2]) > opts.max_size:
        arr, touched = resize_longer(arr, opts.max_size), True
    fmt = opts.image_format
    if fmt == "auto":
        if not touched and px.src_bytes is not None:
            return px.src_format, px.src_bytes
        fmt = "png"
    if fmt == "jpg" and arr.dtype == np.uint16:
        fmt = "png"  # JPEG has no 16-bit; never silently drop depth
    buf = io.BytesIO()
    if arr.dtype == np.uint16:
        if arr.ndim == 3:
            raise SkipSample("unsupported_image", "16-bit colour images are not supported")
        Image.fromarray(arr).save(buf, format="PNG")  # uint16 -> mode I;16
    elif fmt == "jpg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=opts.jpeg_quality)
    else:
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return fmt, buf.getvalue()


def pixel_hash(arr: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((arr.shape, arr.dtype.str)).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Worker side


def _encode_record(job: tuple[Record, WriteOptions]) -> tuple:
    """Record -> ("ok", key, members, hash) or ("skip", reason, label, detail)."""
    rec, opts = job
    try:
        members, hashes = {}, []
        for i, ref in enumerate(rec.images):
            px = ref.load(*ref.args)
            fmt, data = encode_pixels(px, opts)
            members[(f"view{i}." if i else "") + fmt] = data
            if opts.dedup:
                hashes.append(pixel_hash(px.array))
        meta = dict(rec.meta)
        if len(rec.images) > 1:
            meta["num_images"] = len(rec.images)
        members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
        if rec.text is not None:
            members["txt"] = rec.text.encode("utf-8")
        return ("ok", rec.key, members, "|".join(hashes) or None)
    except SkipSample as e:
        return ("skip", e.reason, rec.label or rec.key, e.detail)
    except Exception as e:  # a reader's loader hit something unforeseen: count it, name it
        return ("skip", "error", rec.label or rec.key, f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------
# Main side


class ShardWriter:
    """Write samples into ``shard-NNNNNN.tar`` files of ``shard_size`` samples, atomically."""

    def __init__(self, out: str | Path, shard_size: int = 1000):
        self.out, self.shard_size = Path(out), shard_size
        self.shards: list[ShardInfo] = []
        self._tar = self._tmp = None
        self._n = 0

    def _open(self):
        name = f"shard-{len(self.shards):06d}.tar"
        self._tmp = self.out / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._name, self._n = name, 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if not KEY_RE.match(key):
            raise ValueError(f"invalid sample key {key!r}")
        if self._tar is None:
            self._open()
        for ext in sorted(members, key=lambda e: (e != "json", e)):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._n += 1
        if self._n >= self.shard_size:
            self._close()

    def _close(self):
        if self._tar is None:
            return
        self._tar.close()
        final = self.out / self._name
        os.replace(self._tmp, final)
        self.shards.append(ShardInfo(self._name, self._n, final.stat().st_size, sha256_file(final)))
        self._tar = None

    def finish(self, extra: dict) -> Manifest:
        self._close()
        m = Manifest(self.out, sum(s.num_samples for s in self.shards), self.shards, extra=extra)
        m.write()  # last: a folder without a manifest is an unfinished one
        return m


def prepare_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``; then clear our own files only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out} is not empty; pass --overwrite to replace its shards")
        for p in out.iterdir():
            if p.name == MANIFEST or p.name.startswith("shard-"):
                p.unlink() if p.is_file() else shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Summary:
    written: int = 0
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    duplicates: int = 0
    renamed_keys: int = 0
    offenders: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def note_skip(self, reason: str, label: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        names = self.offenders.setdefault(reason, [])
        if len(names) < MAX_OFFENDERS:
            names.append(f"{label} ({detail})" if detail else label)

    def to_json(self) -> dict:
        return {"read": self.read, "written": self.written, "skipped": dict(self.skipped),
                "duplicates": self.duplicates, "renamed_keys": self.renamed_keys,
                "offenders": self.offenders, "seconds": round(self.seconds, 2)}

    def lines(self) -> list[str]:
        out = [f"read {self.read} rows, wrote {self.written} samples in {self.seconds:.1f}s"]
        if self.duplicates:
            out.append(f"duplicates (same pixels) skipped: {self.duplicates}")
        if self.renamed_keys:
            out.append(f"keys made unique by a suffix: {self.renamed_keys}")
        for reason, n in sorted(self.skipped.items()):
            names = ", ".join(self.offenders.get(reason, []))
            out.append(f"skipped {n} ({reason}); first: {names}")
        return out


def write_shards(records: Iterable[Record], out: str | Path, *, shard_size: int = 1000, workers: int = 0,
                 opts: Optional[WriteOptions] = None, total: Optional[int] = None, created_by: str = "",
                 extra: Optional[dict] = None, progress: bool = True) -> tuple[Manifest, Summary]:
    """Encode ``records`` with ``workers`` processes and write them; returns manifest and summary.

    ``records`` may also hold ``Rejected`` rows, which are counted and named, never encoded.
    """
    opts = opts or WriteOptions()
    out = Path(out)
    summary, seen_hashes, seen_keys = Summary(), set(), set()
    t0 = time.time()
    writer = ShardWriter(out, shard_size)

    def jobs():
        for r in records:
            if isinstance(r, Rejected):
                summary.read += 1
                summary.note_skip(r.reason, r.label, r.detail)
            else:
                yield r, opts

    pool = mp.get_context("fork").Pool(workers) if workers > 0 else None
    results = pool.imap(_encode_record, jobs(), chunksize=8) if pool else map(_encode_record, jobs())
    try:
        for res in tqdm(results, total=total, desc=f"shards -> {out.name}", unit="sample",
                        disable=not progress, mininterval=1.0):
            summary.read += 1
            if res[0] == "skip":
                summary.note_skip(*res[1:])
                continue
            _, key, members, h = res
            if h is not None:
                if h in seen_hashes:
                    summary.duplicates += 1
                    continue
                seen_hashes.add(h)
            if key in seen_keys:
                i = 1
                while f"{key}-{i}" in seen_keys:
                    i += 1
                key, summary.renamed_keys = f"{key}-{i}", summary.renamed_keys + 1
            seen_keys.add(key)
            writer.write(key, members)
            summary.written += 1
    finally:
        if pool:
            pool.terminate()
    summary.seconds = time.time() - t0
    info = {"created_by": created_by, "summary": summary.to_json()} | (extra or {})
    manifest = writer.finish(info)
    return manifest, summary
