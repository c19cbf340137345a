"""One shard writer shared by every source reader.

A reader yields ``Record`` objects: a key, a caption or report, metadata, and one or more
``ImageRef`` (a picklable loader function and its arguments), or a ``Group`` (several records whose
images one loader call decodes together: the frames of a multi-frame DICOM file, decoded once).
Worker processes load and encode images (the slow part) in order; the main process deduplicates and
writes the shards.

Failures, one input at a time. An exception while loading or encoding one input (in this process or
in a worker) is that input's skip: ``SkipSample`` keeps its reason, anything else is ``error``; a
``Rejected`` row is counted as the reader names it. Every skip is counted by reason, and the first
``MAX_OFFENDERS`` of each reason are named in the summary by the reader's label (readers of users' own
data label rows without path text) with a detail that ``safe_detail`` has stripped of anything
path-like (paths, file names, UIDs); an unforeseen exception's own message is kept without its
quoted parts, which may hold header values. Readers catch failures of one input themselves (a
generator that raised cannot be resumed); should a reader's generator raise anyway, or writing fail
(disk full), the run stops with ``WriteAborted`` and nothing is committed: a half-read input never
becomes a shard set with a manifest.

Keys: a key longer than ``MAX_KEY_CHARS`` (80) becomes its first 59 characters, '-' and 20 hex digits
of its blake2b hash (deterministic, so stable between runs, and unique), counted as
``shortened_keys``; tar members are written in PAX format, which is byte-identical to USTAR for
names of up to 100 characters and stores longer ones in a PAX ``path`` record instead of failing.

The output folder. A shard set is ``shard-NNNNNN.tar`` files plus ``manifest.json``, and a folder
with a manifest always holds a complete set. A run writes into a hidden staging folder inside
``--out`` (``.incoming-<pid>/``: shards under a ``.tmp`` name, renamed when complete, then the
manifest) and swaps the complete set in at the end:

1. the old manifest, then every old ``shard-*`` file, move to ``.old-<pid>/``; a ``COMPLETE`` marker
   is written there when all have moved;
2. the new shards move into ``--out``, then the new manifest (the commit);
3. ``.old-<pid>/`` and ``.incoming-<pid>/`` are deleted.

Every step is a rename within one file system. The next run into the folder (any run: with or
without ``--overwrite``) first repairs what a kill left: a folder with a manifest only loses stale
staging folders; without one, an ``.old-*`` folder is rolled back (without its ``COMPLETE`` marker it
holds the rest of the old set; with it, the ``shard-*`` files in ``--out`` are the new set's and are
deleted first), so an interrupted run leaves the old set (or no set) exactly as it was, and a run
that finished leaves the new one. A run that writes no sample does not replace an old set that had
samples (its summary is printed; exit 1). Other files in ``--out`` (and ``.key_secret``, which keeps
keys stable across ``--overwrite``) are never touched. One run at a time per folder: a run holds an
exclusive ``flock`` on the folder while it writes (a second one is refused), and pool workers die with
the main process (``PR_SET_PDEATHSIG``), so a killed run holds nothing. A run without ``--overwrite``
checks that the folder is empty twice under that lock: when it starts (``prepare_output``) and again
before it writes (``write_shards``), so a run that committed in between is never replaced.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlm.data.schema import KEY_RE, MANIFEST, Manifest, ShardInfo, read_manifest, sha256_file
from vlm.utils import fsync_path

log = logging.getLogger(__name__)
MAX_OFFENDERS = 5
MAX_KEY_CHARS = 80  # longer keys are shortened: key + ".view12.png" stays within USTAR's 100 characters
MAX_DETAIL_CHARS = 200
STAGING, OLD, COMPLETE = ".incoming-", ".old-", "COMPLETE"
KILL_AT_ENV = "MEDVLM_TEST_KILL_AT"  # tests only: "<point>" or "<point>#<n>" SIGKILLs this process there
LOCK_WAIT_S = 5.0  # how long a run waits for another run's lock on the output folder before it gives up


class SkipSample(Exception):
    """Raised by a loader for a row that cannot become a sample; ``reason`` is counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # pickles whole (a group's loader returns them from a worker)
        return (SkipSample, (self.reason, self.detail))


class WriteAborted(RuntimeError):
    """The run stopped (a reader's generator raised, writing failed); nothing was committed."""


class OutputBusy(FileExistsError):
    """Another run holds the output folder."""


@dataclass
class Pixels:
    """Decoded pixels (uint8 or uint16, HxW or HxWx3) and, when untouched, the source file bytes."""

    array: np.ndarray
    src_bytes: Optional[bytes] = None
    src_format: Optional[str] = None  # "png" | "jpg"
    meta: Optional[dict] = None  # what the loader learnt (e.g. non-finite voxels), merged into the sample's json


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
    label: str = ""  # how the summary names this row when it fails (a row number; never path text for users' data)


@dataclass
class Group:
    """Records whose images one loader call decodes together (the frames of one multi-frame file).

    ``load.load(*load.args)`` returns one ``Pixels`` per record, in order (each record's own ``images``
    stay empty), or a ``SkipSample`` in the place of a record that fails alone. A failure of the call
    itself is one skip named ``label``, whatever the number of records.
    """

    records: list[Record]
    load: ImageRef
    label: str


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

    def __post_init__(self):
        if self.max_size is not None and (not isinstance(self.max_size, int) or self.max_size < 1):
            raise ValueError(f"--max-size must be a positive number of pixels (got {self.max_size})")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be a positive number of pixels (got {self.max_pixels})")
        if self.image_format not in ("auto", "png", "jpg"):
            raise ValueError(f"--image-format must be auto, png or jpg (got {self.image_format!r})")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg quality must be within 1..100 (got {self.jpeg_quality})")


def check_counts(shard_size: int, workers: int) -> None:
    """``--shard-size`` >= 1 and ``--workers`` >= 0, or a ``ValueError`` naming the option."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1 (got {shard_size})")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: encode in this process; got {workers})")


# ------------------------------------------------------------------------------------------
# Details that reach the summary: nothing path-like


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHISH = re.compile(r"[^\s'\"(),;]*[/\\][^\s'\"(),;]*")
_FILEISH = re.compile(r"(?<![\w^~@%+=.-])[\w^~@%+=-]{2,}(?:\.[\w^~@%+=-]+)*\.[A-Za-z][A-Za-z0-9]{0,4}\b")
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_NOISE = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def safe_detail(text: str) -> str:
    """A skip detail fit for the manifest: paths (anything with a slash or backslash) become ``<path>``,
    file names (``name.ext``) ``<file>``, dotted numbers (DICOM UIDs) ``<uid>``; at most 200 characters.
    Readers already keep paths and header values out of their details; this is the backstop, applied
    to every detail by ``Summary.note_skip``."""
    text = _NOISE.sub("", str(text))
    text = _QUOTED.sub(lambda m: "<path>" if _PATHISH.search(m[0][1:-1]) or _FILEISH.search(m[0][1:-1]) else m[0],
                       text)
    text = _PATHISH.sub("<path>", text)
    text = _FILEISH.sub("<file>", text)
    text = _UID.sub("<uid>", text)
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS - 3] + "..."


def exception_detail(e: BaseException) -> str:
    """An unforeseen exception as a detail: its type and its message without the quoted parts (which
    may quote a path or a header value)."""
    msg = _QUOTED.sub("'…'", str(e)).strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def shorten_key(key: str) -> str:
    """A key of at most ``MAX_KEY_CHARS``: longer ones keep their first 59 characters plus a hash of the
    whole key (deterministic: the same long key gives the same short key in every run)."""
    if len(key) <= MAX_KEY_CHARS:
        return key
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()
    return key[:MAX_KEY_CHARS - 21] + "-" + digest


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


def _encode_one(rec: Record, pixels: Optional[list[Pixels]], opts: WriteOptions) -> tuple:
    """One record -> ("ok", key, members, hash, label) or ("skip", reason, label, detail); never raises."""
    try:
        members, hashes, meta = {}, [], dict(rec.meta)
        n = len(pixels) if pixels is not None else len(rec.images)
        for i in range(n):
            px = pixels[i] if pixels is not None else rec.images[i].load(*rec.images[i].args)
            fmt, data = encode_pixels(px, opts)
            members[(f"view{i}." if i else "") + fmt] = data
            if opts.dedup:
                hashes.append(pixel_hash(px.array))
            meta.update(px.meta or {})
        if n > 1:
            meta["num_images"] = n
        members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
        if rec.text is not None:
            members["txt"] = rec.text.encode("utf-8")
        return ("ok", rec.key, members, "|".join(hashes) or None, rec.label)
    except SkipSample as e:
        return ("skip", e.reason, rec.label or rec.key, e.detail)
    except Exception as e:  # a reader's loader hit something unforeseen: count it, name it
        return ("skip", "error", rec.label or rec.key, exception_detail(e))


def _encode_record(job: tuple[Union[Record, Group, Rejected], WriteOptions]) -> list[tuple]:
    """A job -> its results: one per record, or one skip for a rejected row or a group whose loader failed."""
    item, opts = job
    if isinstance(item, Rejected):
        return [("skip", item.reason, item.label, item.detail)]
    if isinstance(item, Record):
        return [_encode_one(item, None, opts)]
    try:
        pixels = item.load.load(*item.load.args)
        if len(pixels) != len(item.records):
            raise SkipSample("error", f"the loader gave {len(pixels)} images for {len(item.records)} samples")
    except SkipSample as e:
        return [("skip", e.reason, item.label, e.detail)]
    except Exception as e:
        return [("skip", "error", item.label, exception_detail(e))]
    return [("skip", px.reason, rec.label or rec.key, px.detail) if isinstance(px, SkipSample)
            else _encode_one(rec, [px], opts) for rec, px in zip(item.records, pixels)]


def _die_with_parent() -> None:
    """Pool initializer: a worker gets SIGKILL when the main process dies (Linux), so a killed run leaves
    no orphan holding the output folder's lock."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ------------------------------------------------------------------------------------------
# Main side


class ShardWriter:
    """Write samples into ``shard-NNNNNN.tar`` files of ``shard_size`` samples, atomically, in ``out``."""

    def __init__(self, out: str | Path, shard_size: int = 1000):
        self.out, self.shard_size = Path(out), shard_size
        self.shards: list[ShardInfo] = []
        self._tar = self._tmp = None
        self._n = 0

    def _open(self):
        name = f"shard-{len(self.shards):06d}.tar"
        self._tmp = self.out / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
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
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.out / self._name
        os.replace(self._tmp, final)
        self.shards.append(ShardInfo(self._name, self._n, final.stat().st_size, sha256_file(final)))
        self._tar = None
        _fault_point("shard-closed")

    def abort(self) -> None:
        """Close an open shard without keeping it."""
        if self._tar is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
            self._tar = None

    def finish(self, extra: dict) -> Manifest:
        self._close()
        m = Manifest(self.out, sum(s.num_samples for s in self.shards), self.shards, extra=extra)
        m.write()  # last: a folder without a manifest is an unfinished one
        return m


def _fault_point(name: str) -> None:
    """Tests only: ``MEDVLM_TEST_KILL_AT=<name>[#n]`` SIGKILLs this process the n-th time (default first) it
    passes ``name``, to prove that a kill at that exact moment loses nothing."""
    want = os.environ.get(KILL_AT_ENV)
    if not want:
        return
    point, _, nth = want.partition("#")
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}


def _is_shard_file(p: Path) -> bool:
    return p.name.startswith("shard-") and (p.is_file() or p.is_symlink())


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold an exclusive flock on the folder ``out`` (waits up to ``LOCK_WAIT_S``)."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OutputBusy(f"--out {out} is being written by another run (wait for it to finish)") from None
                time.sleep(0.05)
            except OSError:  # a file system without flock (some network mounts): go on unguarded
                log.warning("%s: cannot lock the folder; make sure no other run writes to it", out)
                break
        yield
    finally:
        os.close(fd)


def _roll_back(out: Path, old: Path) -> None:
    """Undo an interrupted swap (``out`` has no manifest): the old set goes back where it was."""
    if (old / COMPLETE).exists():  # every old shard had left ``out``: the shard files there are the new set's
        for p in out.iterdir():
            if _is_shard_file(p):
                p.unlink()
        (old / COMPLETE).unlink()  # only now: a kill before this point repeats the deletion
    for p in sorted(old.iterdir()):
        if p.name.startswith("shard-"):
            os.replace(p, out / p.name)
    if (old / MANIFEST).exists():
        os.replace(old / MANIFEST, out / MANIFEST)  # last: the set is complete again
    fsync_path(out)


def recover_output(out: str | Path) -> None:
    """Repair what an interrupted run left in ``out`` (see the module docstring); the caller holds the lock."""
    out = Path(out)
    for old in sorted(out.glob(OLD + "*")):
        if old.is_dir() and not (out / MANIFEST).is_file():
            log.warning("%s: rolling back an interrupted replacement of the shard set", out)
            _roll_back(out, old)
        shutil.rmtree(old, ignore_errors=True)
    for stale in out.glob(STAGING + "*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    if not (out / MANIFEST).is_file():
        for p in out.glob("shard-*.tar.tmp"):  # an unfinished shard of an older writer
            p.unlink()


def _ours(p: Path) -> bool:
    """Entries of ``out`` that do not make it 'not empty': the key secret, staging leftovers."""
    return p.name.startswith((STAGING, OLD, ".key_secret")) or (p.name.startswith("shard-") and p.name.endswith(".tmp"))


def prepare_output(out: str | Path, overwrite: bool) -> Path:
    """Create ``out``, repair an interrupted run's leftovers, and refuse a folder that holds anything (a
    shard set, other files) unless ``overwrite``. Nothing of an old set is removed here: the new set
    replaces it when complete (``write_shards``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        recover_output(out)
        _refuse_unless_empty(out, overwrite)
    return out


def _refuse_unless_empty(out: Path, overwrite: bool) -> None:
    """Unless ``overwrite``: a ``FileExistsError`` when ``out`` holds anything but our own files."""
    if not overwrite and any(not _ours(p) for p in out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty; pass --overwrite to replace its shards")


def _commit(out: Path, staging: Path, manifest: Manifest) -> None:
    """Swap the complete set in ``staging`` into ``out`` (steps 1-3 of the module docstring)."""
    old = out / f"{OLD}{os.getpid()}"
    old.mkdir()
    if (out / MANIFEST).exists():
        os.replace(out / MANIFEST, old / MANIFEST)
        _fault_point("old-manifest-moved")
    for p in sorted(out.iterdir()):
        if _is_shard_file(p):
            os.replace(p, old / p.name)
            _fault_point("old-shard-moved")
    fsync_path(old)
    (old / COMPLETE).touch()
    fsync_path(old)
    _fault_point("old-moved")
    for s in manifest.shards:
        os.replace(staging / s.name, out / s.name)
        _fault_point("new-shard-moved")
    fsync_path(out)
    os.replace(staging / MANIFEST, out / MANIFEST)  # the commit
    fsync_path(out)
    _fault_point("committed")
    shutil.rmtree(old, ignore_errors=True)  # past the commit nothing may fail the run
    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Summary:
    written: int = 0
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    duplicates: int = 0
    renamed_keys: int = 0
    shortened_keys: int = 0
    offenders: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    committed: bool = True  # False: nothing replaced the folder's previous set

    def note_skip(self, reason: str, label: str, detail: str = "") -> None:
        """Count a skip; the first ``MAX_OFFENDERS`` per reason are named: ``label (detail)``, the detail made
        safe (``safe_detail``). Labels come from readers, which keep path text out of them for users' data."""
        self.skipped[reason] += 1
        names = self.offenders.setdefault(reason, [])
        if len(names) < MAX_OFFENDERS:
            detail = safe_detail(detail) if detail else ""
            names.append(f"{label} ({detail})" if detail else label)

    def to_json(self) -> dict:
        return {"read": self.read, "written": self.written, "skipped": dict(self.skipped),
                "duplicates": self.duplicates, "renamed_keys": self.renamed_keys,
                "shortened_keys": self.shortened_keys, "offenders": self.offenders, "seconds": round(self.seconds, 2)}

    def lines(self) -> list[str]:
        out = [f"read {self.read} rows, wrote {self.written} samples in {self.seconds:.1f}s"]
        if self.duplicates:
            out.append(f"duplicates (same pixels) skipped: {self.duplicates}")
        if self.renamed_keys:
            out.append(f"keys made unique by a suffix: {self.renamed_keys}")
        if self.shortened_keys:
            out.append(f"keys longer than {MAX_KEY_CHARS} characters shortened with a hash: {self.shortened_keys}")
        for reason, n in sorted(self.skipped.items()):
            names = ", ".join(self.offenders.get(reason, []))
            out.append(f"skipped {n} ({reason}); first: {names}")
        return out


def write_shards(records: Iterable[Union[Record, Group, Rejected]], out: str | Path, *, shard_size: int = 1000,
                 workers: int = 0, opts: Optional[WriteOptions] = None, total: Optional[int] = None,
                 created_by: str = "", extra: Optional[dict] = None,
                 progress: bool = True, overwrite: bool = True) -> tuple[Manifest, Summary]:
    """Encode ``records`` with ``workers`` processes, write them and swap them into ``out``; returns the
    manifest and the summary. ``records`` may also hold ``Rejected`` rows (counted and named, never
    encoded) and ``Group`` items. Raises ``WriteAborted`` (nothing committed, ``out`` unchanged) when the
    records iterator raises or writing fails. When no sample was written and ``out`` holds a set with
    samples, that set is kept (``summary.committed`` is False and the returned manifest is empty).

    ``overwrite=False`` (``data_prep.shards`` without ``--overwrite``) checks again, under the folder's lock
    and before anything is read or written, that ``out`` is still empty: another run may have committed a
    set there since this run's ``prepare_output``; then the same ``FileExistsError`` is raised and ``out``
    is left as that run made it. The default (True) replaces whatever set ``out`` holds, for callers that
    write into a folder of their own (``data_prep.synth``)."""
    check_counts(shard_size, workers)
    opts = opts or WriteOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, seen_hashes, seen_keys = Summary(), set(), set()
    t0 = time.time()
    failure: list[str] = []
    last_label = [""]

    def jobs():
        it = iter(records)
        while True:
            try:
                r = next(it)
            except StopIteration:
                return
            except Exception as e:  # a reader bug: its generator cannot go on; stop cleanly
                failure.append(type(e).__name__)
                return
            last_label[0] = getattr(r, "label", "") or getattr(r, "key", "")
            yield r, opts

    pool = mp.get_context("fork").Pool(workers, initializer=_die_with_parent) if workers > 0 else None
    staging = out / f"{STAGING}{os.getpid()}"
    writer = ShardWriter(staging, shard_size)
    try:
        with _exclusive(out):  # taken after the pool forked: workers never hold it
            recover_output(out)
            _refuse_unless_empty(out, overwrite)  # a run that committed since prepare_output: keep its set
            staging.mkdir()
            try:
                _write_all(jobs(), writer, summary, pool, total=total, desc=f"shards -> {out.name}",
                           progress=progress, seen=(seen_hashes, seen_keys))
                if failure:
                    raise WriteAborted(f"the reader stopped with {failure[0]} after {summary.read} inputs (last: "
                                       f"{last_label[0] or 'none'}); this is a bug in the reader, since one bad "
                                       f"input should be one counted skip; nothing was written, {out} is unchanged")
                summary.seconds = time.time() - t0
                info = {"created_by": created_by, "summary": summary.to_json()} | (extra or {})
                manifest = writer.finish(info)
                _fault_point("staged")
                if summary.written == 0 and _old_count(out) > 0:  # never replace a set by nothing
                    summary.committed = False
                    shutil.rmtree(staging)
                    return Manifest(out, 0, [], extra=info), summary
                _commit(out, staging, manifest)
            except BaseException as e:
                if pool:
                    pool.terminate()
                writer.abort()
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(Exception):  # else the next run repairs it
                    recover_output(out)  # an exception within the swap: the old set goes back now
                if isinstance(e, OSError):
                    raise WriteAborted(f"writing to {out} failed: {e.strerror or type(e).__name__}; nothing was "
                                       f"committed, {out} is unchanged") from None
                raise
    finally:
        if pool:
            pool.terminate()
    return Manifest(out, manifest.num_samples, manifest.shards, extra=manifest.extra), summary


def _write_all(jobs, writer: ShardWriter, summary: Summary, pool, *, total, desc: str, progress: bool,
               seen: tuple[set, set]) -> None:
    first = next(jobs, None)
    if first is None:
        return
    jobs = itertools.chain([first], jobs)
    chunk = 1 if isinstance(first[0], Group) else 8  # a group is a whole file's work: one per task, spread out
    results = pool.imap(_encode_record, jobs, chunksize=chunk) if pool else map(_encode_record, jobs)
    for batch in tqdm(results, total=total, desc=desc, unit="sample", disable=not progress, mininterval=1.0):
        for res in batch:
            _take(res, writer, summary, *seen)


def _old_count(out: Path) -> int:
    try:
        return read_manifest(out).num_samples
    except Exception:
        return 0


def _take(res: tuple, writer: ShardWriter, summary: Summary, seen_hashes: set, seen_keys: set) -> None:
    """One encoded result -> a written sample, a duplicate, or a counted skip."""
    summary.read += 1
    if res[0] == "skip":
        summary.note_skip(*res[1:])
        return
    _, key, members, h, label = res
    if not KEY_RE.match(key):  # a reader bug, for this input only
        summary.note_skip("bad_key", label or "a sample", "a key holds only letters, digits, '_' and '-'")
        return
    if h is not None:
        if h in seen_hashes:
            summary.duplicates += 1
            return
        seen_hashes.add(h)
    if len(key) > MAX_KEY_CHARS:
        key = shorten_key(key)
        summary.shortened_keys += 1
    if key in seen_keys:
        i = 1
        while f"{key}-{i}" in seen_keys:
            i += 1
        key, summary.renamed_keys = f"{key}-{i}", summary.renamed_keys + 1
    seen_keys.add(key)
    writer.write(key, members)
    summary.written += 1
