"""Checkpoints: one folder per step, written by every rank in parallel, atomic, the last K kept.

A checkpoint is a folder ``<dir>/step_<N>/``:

    dcp/                torch.distributed.checkpoint (DCP) shards: every rank writes its own part of the
                        model ("model.*"), the optimizer states ("optim.*") and the EMA weights ("ema.*"),
                        tensors only; DCP reshards them on load, so a run resumes on another world size
    train_state.pt      scheduler and torch RNG states of every rank (tensors and plain containers only:
                        loaded with torch.load(weights_only=True))
    state.json          step, data-stream positions, python/numpy RNGs, counters, world size, config
    model.safetensors   the whole model in one file (stock loaders read it): written at the end of a run
                        (and by ``consolidate``); the intermediate checkpoints have only the shards
    ema.safetensors     the same with the EMA weights, when EMA is on
    checksums.json      size and sha256 of every other file (each rank hashes its own shard file while it is
                        still in the page cache; rank 0 the small files), written just before COMPLETE
    COMPLETE            written last

It is written as ``step_<N>.tmp`` and renamed when every rank has finished (the data fsynced first), so a
crash never leaves a half checkpoint that ``resume=latest`` could pick. No rank ever holds the whole
optimizer state; rank 0 writes the small files. Multi-node runs need ``output_dir`` on a shared file system.

Reading never unpickles arbitrary objects: DCP's metadata file is read with an allowlist of its own
classes, and checkpoints holding pickled (non-tensor) entries are refused. ``model_weights(path)`` gives
the full weights of any checkpoint (this format, or the older single-file one) for ``init_from``,
``eval.*`` and ``train.export``.

Integrity: ``verify(path)`` re-hashes the files against ``checksums.json`` and names the first damaged one
(a flipped byte, a truncation, a missing or extra shard). ``resume=latest`` uses the newest checkpoint that
verifies and warns about each damaged one it passes over (``pick_intact``); ``model_weights`` verifies the
files it reads. Checkpoints of earlier versions (no checksums.json) load unverified.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlm.data.schema import sha256_file
from vlm.utils import atomic_write_text, fsync_path

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d+)$")
CHECKSUMS = "checksums.json"
_RANK_SUMS = ".sha256.rank"  # dcp/.sha256.rank<r>.json: a rank's digests of its own shard files, merged at COMPLETE


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


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / "dcp").is_dir()


# -- writing -----------------------------------------------------------------------------------------------
class PendingSave:
    """A checkpoint whose shards are still being written (``dcp.async_save``): ``finish()`` waits for them and,
    on rank 0, completes the folder (COMPLETE, rename, pruning). ``done()`` polls without waiting."""

    def __init__(self, future: Optional[Future], tmp: Path, final: Path, keep_last: int, main: bool, ranks: int = 0):
        self.future, self.tmp, self.final, self.keep_last, self.main = future, tmp, final, keep_last, main
        self.ranks = ranks  # async: how many ranks' digest files to wait for

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def finish(self) -> Path:
        if self.future is not None:
            self.future.result()  # re-raises a failed write
            self.future = None
        if self.main and self.tmp.exists():
            _complete(self.tmp, self.final, self.keep_last, self.ranks)
        return self.final


def save_sharded(folder: str | Path, step: int, tensors: dict, small: dict, state: dict, keep_last: int = 3,
                 main: bool = True, async_save: bool = False, process_group=None) -> PendingSave:
    """Write ``folder/step_<step>``: ``tensors`` (plain tensors or DTensors, named "model.*", "optim.*", "ema.*")
    as DCP shards by every rank, ``small`` (train_state.pt) and ``state`` (state.json) by rank 0 (``main``).
    A collective under torch.distributed: every rank calls it with its own shards. With ``async_save`` the
    shards are copied to host memory and written in the background (``PendingSave.finish()`` completes)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    bad = sorted(k for k, v in tensors.items() if not torch.is_tensor(v))
    if bad:
        raise CheckpointError(f"checkpoint shards hold tensors only; got other values for {bad[:5]}")
    folder = Path(folder)
    final, tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"
    distributed = dist.is_available() and dist.is_initialized()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        torch.save(small, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps(state | {"integrity": CHECKSUMS}, indent=1))
    if distributed:
        dist.barrier()
    writer = dcp.FileSystemWriter(str(tmp / "dcp"), single_file_per_rank=True, sync_files=True)
    kw = dict(storage_writer=writer, process_group=process_group, no_dist=not distributed)
    with _single_process_ok():
        rank = dist.get_rank() if distributed else 0
        if async_save:
            fut = dcp.async_save(tensors, **kw)
            fut = getattr(fut, "upload_completion", fut)  # newer torch wraps the future in a response object
            # each rank hashes its own shard in the background thread that wrote it, as soon as it is written;
            # rank 0 waits for those digests when it completes the checkpoint (_write_checksums)
            fut.add_done_callback(lambda f: f.exception() is None and _rank_digests(tmp, rank))
            world = dist.get_world_size(process_group) if distributed else 1
            return PendingSave(fut, tmp, final, keep_last, main, ranks=world)
        dcp.save(tensors, **kw)
    _rank_digests(tmp, rank)
    if distributed:
        dist.barrier(group=process_group)
    pending = PendingSave(None, tmp, final, keep_last, main)
    pending.finish()
    if distributed:
        dist.barrier()
    return pending


def _complete(tmp: Path, final: Path, keep_last: int, ranks: int = 0) -> None:
    """fsync the small files and the folders, record checksums, write COMPLETE, rename into place, prune old
    checkpoints."""
    for p in (tmp / "train_state.pt", tmp / "state.json", tmp / "model.safetensors", tmp / "ema.safetensors"):
        if p.exists():
            fsync_path(p)
    if (tmp / "dcp").is_dir():
        fsync_path(tmp / "dcp")
    _write_checksums(tmp, ranks)
    with open(tmp / "COMPLETE", "w") as f:
        f.write(final.name.split("_")[-1])
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)  # the folder's entries
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)  # the rename itself
    for old in list_checkpoints(final.parent)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save(folder: str | Path, step: int, model_state: dict, train_state: dict, state: dict,
         ema_state: Optional[dict] = None, keep_last: int = 3) -> Path:
    """Write a single-process, single-file checkpoint (``model.safetensors`` + ``train_state.pt``) atomically."""
    folder = Path(folder)
    final, tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_unshared(model_state), tmp / "model.safetensors")
    if ema_state is not None:
        save_file(_unshared(ema_state), tmp / "ema.safetensors")
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "state.json").write_text(json.dumps(state | {"integrity": CHECKSUMS}, indent=1))
    _complete(tmp, final, keep_last)
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


def _atomic_save_file(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(_unshared(tensors), tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


# -- integrity ---------------------------------------------------------------------------------------------
def _digest(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _files(folder: Path) -> list[str]:
    """A checkpoint's files, relative, excluding COMPLETE, the checksums and the ranks' digest files."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in ("COMPLETE", CHECKSUMS) and not p.name.startswith(_RANK_SUMS) \
                and not p.name.endswith(".tmp"):  # an interrupted consolidation's leftover
            out.append(rel)
    return out


def _rank_digests(folder: Path, rank: int) -> None:
    """``dcp/.sha256.rank<r>.json``: this rank's digests of the shard files it wrote (empty when hashing failed:
    rank 0 then hashes them itself, never waiting for a file that will not come)."""
    try:
        digests = {p.name: _digest(p) for p in sorted((folder / "dcp").glob(f"__{rank}_*.distcp"))}
    except OSError as e:
        log.warning("rank %d could not hash its checkpoint shard (%s): rank 0 will", rank, e)
        digests = {}
    _write_json(folder / "dcp" / f"{_RANK_SUMS}{rank}.json", digests)


def _write_checksums(folder: Path, wait_ranks: int = 0, timeout: float = 600.0) -> None:
    """checksums.json for every file of ``folder``: the ranks' own digests of their shards (an async save: waits
    up to ``timeout`` s for ``wait_ranks`` ranks' digest files, which their background threads write), rank 0
    hashes the rest (the small files; a shard whose digest did not come)."""
    import time

    deadline = time.time() + timeout
    while wait_ranks and time.time() < deadline and \
            len(list((folder / "dcp").glob(f"{_RANK_SUMS}*.json"))) < wait_ranks:
        time.sleep(0.05)
    ranks: dict = {}
    rank_files = sorted((folder / "dcp").glob(f"{_RANK_SUMS}*.json"))  # none when there is no dcp/ folder
    for p in rank_files:
        ranks.update({f"dcp/{k}": v for k, v in json.loads(p.read_text()).items()})
    files = {rel: ranks.get(rel) or _digest(folder / rel) for rel in _files(folder)}
    _write_json(folder / CHECKSUMS, {"algorithm": "sha256", "files": files})
    for p in rank_files:
        p.unlink()


def verify(path: str | Path, part: tuple[int, int] = (0, 1), only: Optional[set] = None) -> Optional[str]:
    """None when the checkpoint's files match checksums.json (or it has none: an earlier version), else a
    line naming the first damaged file. ``part=(i, n)``: check only every n-th file from the i-th (ranks share
    the work); ``only``: check only these relative paths (the files a reader needs)."""
    path = Path(path)
    sums = path / CHECKSUMS
    if not (path / "COMPLETE").exists():
        return f"{path}: no COMPLETE marker"
    if not sums.is_file():
        try:  # a checkpoint of an earlier version has none; one written with checksums says so in state.json
            has = json.loads((path / "state.json").read_text()).get("integrity") == CHECKSUMS
        except (OSError, ValueError, AttributeError):
            return f"{path / 'state.json'}: unreadable, and no {CHECKSUMS} to check the checkpoint with"
        return f"{sums}: missing (the checkpoint was written with it)" if has else None
    try:
        files = json.loads(sums.read_text())["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                for v in files.values()):
            raise ValueError("malformed entries")
    except (OSError, ValueError, KeyError, TypeError):
        return f"{sums}: unreadable checksums"
    if only is None:
        extra = sorted(set(_files(path)) - set(files))
        if extra and part[0] == 0:
            return f"{path / extra[0]}: a file the checkpoint did not have when it was written"
    else:
        unlisted = sorted(only - set(files))
        if unlisted:
            return f"{path / unlisted[0]}: not in {CHECKSUMS} (added after the checkpoint was written)"
    names = sorted(files) if only is None else sorted(only)
    for rel in names[part[0]::part[1]]:
        want, p = files[rel], path / rel
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != want.get("size"):
            return f"{p}: {p.stat().st_size} bytes, {want.get('size')} when written (truncated or replaced)"
        if sha256_file(p) != want.get("sha256"):
            return f"{p}: contents changed since it was written (checksum mismatch)"
    return None


def pick_intact(folder: str | Path, part: tuple[int, int] = (0, 1), agree=None) -> Optional[Path]:
    """The newest complete checkpoint of ``folder`` that verifies, warning about each damaged one passed over;
    raises CheckpointError when checkpoints exist and none is intact. ``agree(bad: bool) -> bool`` combines
    the ranks' verdicts when ``part`` splits the work (any rank's damage counts)."""
    found = list_checkpoints(folder)
    damaged = []
    for p in reversed(found):
        problem = verify(p, part)
        bad = agree(problem is not None) if agree else problem is not None
        if not bad:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", p)
            return p
        damaged.append(problem or f"{p}: damaged (found by another rank)")
        log.warning("checkpoint damaged, falling back to the previous one: %s", damaged[-1])
    if found:
        raise CheckpointError(f"no intact checkpoint in {folder}: " + "; ".join(damaged[:3]))
    return None


def _shard_files(path: Path) -> set:
    """The DCP files of a checkpoint: those on disk and those its checksums list (a deleted one is missing)."""
    found = {f"dcp/{p.name}" for p in (path / "dcp").iterdir() if p.is_file()} if is_sharded(path) else set()
    try:
        found |= {k for k in json.loads((path / CHECKSUMS).read_text())["files"] if k.startswith("dcp/")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none, or unreadable: verify says so
    return found


def require_intact(path: str | Path, only: Optional[set] = None) -> None:
    problem = verify(path, only=only)
    if problem:
        raise CheckpointError(f"damaged checkpoint: {problem}")


# -- reading -----------------------------------------------------------------------------------------------
_DCP = "torch.distributed.checkpoint."
_SAFE_NAMES = {(_DCP + "metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    (_DCP + "filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: read it with its own dataclasses, torch sizes, dtypes and layouts only."""

    def find_class(self, module: str, name: str):
        # exact (module, name) pairs only: protocol 4 resolves dotted names ("os.system" through any module
        # that imports os), so a name with a dot is never looked up
        if "." not in name and ((module, name) in _SAFE_NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                              torch.memory_format)))):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a DCP checkpoint never holds: "
                              "refusing to load it")


def _reader(dcp_dir: Path):
    from torch.distributed.checkpoint import BytesStorageMetadata, FileSystemReader, Metadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with open(path, "rb") as f:
                    md = _MetadataUnpickler(f).load()
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
            if not isinstance(md, Metadata):
                raise CheckpointError(f"{path}: not DCP metadata (a {type(md).__name__})")
            objects = [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
            if objects:  # DCP would torch.load them with weights_only=False
                raise CheckpointError(f"{path}: holds pickled objects ({objects[:3]}): refusing to load them")
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(dcp_dir))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:300]


def shard_metadata(path: str | Path) -> dict:
    """{name: (shape, dtype)} of every tensor in a checkpoint's DCP shards."""
    md = _reader(Path(path) / "dcp").read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()}


def load_sharded(path: str | Path, tensors: dict, strict: bool = True) -> None:
    """Load the DCP shards of ``path`` into ``tensors`` in place (any sharding: DCP reshards). A collective
    under torch.distributed. ``strict``: every requested tensor must be in the checkpoint."""
    import torch.distributed as dist

    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"{path} is not a complete checkpoint")
    reader = _reader(path / "dcp")
    saved = reader.read_metadata().state_dict_metadata
    missing = sorted(set(tensors) - set(saved))
    if missing and strict:
        raise CheckpointError(f"{path} lacks {len(missing)} tensors this run needs: {missing[:8]}")
    want = {k: v for k, v in tensors.items() if k in saved}
    shapes = [f"{k}: saved {tuple(saved[k].size)} vs {tuple(v.shape)}" for k, v in want.items()
              if tuple(saved[k].size) != tuple(v.shape)]
    if shapes:
        raise CheckpointError(f"{path} does not match this model: " + "; ".join(shapes[:8]))
    _dcp_load(path, want, reader, no_dist=not (dist.is_available() and dist.is_initialized()))


def _dcp_load(path: Path, tensors: dict, reader, no_dist: bool) -> None:
    """dcp.load into ``tensors`` in place; a truncated or foreign shard is a CheckpointError naming ``path``."""
    import torch.distributed.checkpoint as dcp

    with _single_process_ok():
        try:
            dcp.load(tensors, storage_reader=reader, no_dist=no_dist)
        except CheckpointError:
            raise
        except (Exception, dcp.CheckpointException) as e:
            raise CheckpointError(f"{path}: its shards could not be read ({_first_line(e)})") from e


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns "assuming the intent is to save/load in a single process" without a process group: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        yield


def _read_full(path: Path, prefix: str) -> dict:
    """Every tensor named ``prefix*`` of a checkpoint's shards, whole, in this process (no process group)."""
    meta = shard_metadata(path)
    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in meta.items() if k.startswith(prefix)}
    if out:
        _dcp_load(path, out, _reader(path / "dcp"), no_dist=True)
    return {k[len(prefix):]: v for k, v in out.items()}


def model_weights(path: str | Path, ema: bool = False) -> dict:
    """The whole model's weights of a checkpoint folder: ``model.safetensors`` (``ema.safetensors``) when there,
    else assembled from the DCP shards in this process. With ``ema``: the model's state with the averaged
    weights in place (tied aliases included)."""
    path = Path(path)
    single = path / ("ema.safetensors" if ema else "model.safetensors")
    if single.is_file():
        require_intact(path, only={single.name})
        return _load_safetensors(single)
    require_intact(path, only=_shard_files(path))
    if not is_sharded(path):
        raise CheckpointError(f"{path}: no {single.name} and no dcp/ shards" +
                              (" (the run had no EMA)" if ema and (path / "model.safetensors").is_file() else ""))
    weights = _read_full(path, "model.")
    if ema:
        averaged = _read_full(path, "ema.")
        if not averaged:
            raise CheckpointError(f"{path}: the run had no EMA")
        weights.update(averaged)
        aliases = json.loads((path / "state.json").read_text()).get("ema_aliases", {})
        for alias, name in aliases.items():
            weights[alias] = weights[name]
    return weights


def consolidate(path: str | Path) -> list[Path]:
    """Write ``model.safetensors`` (and ``ema.safetensors`` when the run had EMA) into a sharded checkpoint
    from its DCP shards, each file atomically. Returns the files written."""
    path = Path(path)
    written = []
    sums = path / CHECKSUMS
    listed = set(json.loads(sums.read_text())["files"]) if sums.is_file() else None
    for ema, name in ((False, "model.safetensors"), (True, "ema.safetensors")):
        if (path / name).is_file():
            if listed is None or name in listed:
                continue
            (path / name).unlink()  # written after the checksums (an interrupted consolidation): write it again
        if ema and not any(k.startswith("ema.") for k in shard_metadata(path)):
            continue
        _atomic_save_file(model_weights(path, ema=ema), path / name)
        written.append(path / name)
    if written and sums.is_file():
        data = json.loads(sums.read_text())
        data["files"].update({p.name: _digest(p) for p in written})
        _write_json(sums, data)
    return written


def _load_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except Exception as e:  # a damaged header or a truncated file: name it in one line
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None


def load_train_state(path: Path) -> dict:
    """train_state.pt (tensors and plain containers only) or a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None


def load_state_json(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a checkpoint state (no step)")
        return state
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None


def load(path: str | Path) -> tuple[dict, dict, dict, Optional[dict]]:
    """A single-file checkpoint -> (model state, train state, state.json, ema state or None). Never unpickles
    objects."""
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"{path} is not a complete checkpoint")
    require_intact(path)
    model_state = _load_safetensors(path / "model.safetensors")
    train_state = load_train_state(path / "train_state.pt")
    state = load_state_json(path / "state.json")
    ema = _load_safetensors(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None
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
