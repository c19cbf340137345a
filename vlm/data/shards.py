"""Streaming WebDataset shards with exact, resumable positions.

Design (why it is not a plain ``wds.WebDataset`` chain): a resumed run must see exactly the
samples an uninterrupted run would have seen. Every random choice here is therefore a pure
function of ``(seed, epoch, global worker id)``:

* shards of each source are shuffled per epoch and dealt round-robin to the global workers
  (``rank * num_workers + worker``), so 2 ranks x 2 workers see every sample once per epoch;
  ``resampled`` mode instead draws shards with replacement, forever;
* several sources are mixed by weight, sample by sample;
* a shuffle buffer of raw (undecoded) samples reorders within a worker;
* each worker forms whole batches, tagged with its logical id and the number of raw samples it
  has pulled from its buffer.

The consumer (``ShardLoader``) records, per logical worker, that raw count and which worker
comes next in the DataLoader's round-robin. Restoring replays each worker's stream and skips
the recorded count without decoding, and rotates the worker slots so the round-robin resumes
where it stopped. Corrupt data (bad tar, escaping member names, undecodable or oversized
images, bad JSON, missing caption) is skipped and counted by reason, never raised.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data.schema import IMAGE_EXTS, ManifestError, read_manifest, sha256_file, split_member_name
from vlm.data.tario import TruncatedTar, iter_members
from vlm.data.transforms import ImageConfig, MedicalImageTransform

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """One shard folder (written by data_prep) and its mixing weight."""

    path: str = "???"
    weight: float = 1.0

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"source weight must be > 0, got {self.weight} for {self.path}")


@dataclass
class DataConfig:
    """The streaming pipeline: which shards, how they are shuffled, batched and decoded."""

    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 32  # per rank
    num_workers: int = 2  # DataLoader worker processes per rank (0: in the main process)
    resampled: bool = False  # draw shards with replacement forever (mixing big corpora)
    samples_per_epoch: Optional[int] = None  # resampled mode: global samples that make an "epoch"
    shuffle_buffer: int = 1000  # raw samples held per worker for shuffling (0: no shuffle)
    shuffle_shards: bool = True
    seed: int = 0
    require_text: bool = True  # a sample without .txt is skipped (counted as missing_text)
    drop_last: bool = False  # drop each worker's final partial batch
    verify_sha256: bool = False  # hash every shard before streaming (slow on big corpora)
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.samples_per_epoch is not None and not self.resampled:
            raise ValueError("samples_per_epoch only applies with resampled=true")


# ------------------------------------------------------------------------------------------
# Raw sample iteration


def _raw_samples(path: str, counts: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar's consecutive members into samples ``(key, {ext: bytes})``, counting what is wrong.

    A sample is yielded once a member of another key begins, so a truncated tar loses only the
    sample it broke inside, never a complete one.
    """
    key, parts = None, {}
    try:
        for name, data in iter_members(path):
            split = split_member_name(name)
            if split is None:
                counts["unsafe_member_name"] += 1
                continue
            k, ext = split
            if k != key:
                if parts:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = data
    except (TruncatedTar, OSError) as exn:
        counts["truncated_tar"] += 1
        log.warning("shard %s is truncated or corrupt (%s); the rest of it is skipped", path, exn)
        cut = split_member_name(exn.member) if getattr(exn, "member", None) else None
        if parts and cut is not None and cut[0] != key:
            yield key, parts  # the break came in the next sample: this one is complete
        return
    if parts:
        yield key, parts


def decode_sample(key: str, parts: dict[str, bytes], transform: MedicalImageTransform, cfg: DataConfig,
                  out: Optional[torch.Tensor] = None) -> dict | str:
    """Raw parts -> sample dict, or the reason (a string) why it is skipped.

    ``out``: a zeroed (3, S, S) slot of the batch tensor to decode the primary image into.
    """
    image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if image_ext is None:
        return "missing_image"
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
            if not isinstance(meta, dict):
                return "bad_json"
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "bad_json"
    text = None
    if "txt" in parts:
        try:
            text = parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return "bad_text"
    if cfg.require_text and not text:
        return "missing_text"
    try:
        images = [transform.from_bytes(parts[image_ext], out)]
        views = sorted(e for e in parts if e.startswith("view") and e.rsplit(".", 1)[-1] in IMAGE_EXTS)
        for v in views:
            images.append(transform.from_bytes(parts[v]))
    except ValueError as e:
        return "image_too_large" if "max_pixels" in str(e) else "bad_image"
    except Exception:  # PIL raises many types for truncated/corrupt files
        return "bad_image"
    return {"key": key, "image": images[0], "views": images[1:], "text": text, "meta": meta}


def default_collate(samples: list[dict], tokenize: Optional[Callable] = None,
                    images: Optional[torch.Tensor] = None) -> dict:
    """``images``: the batch tensor the samples were decoded into (no stacking needed)."""
    batch = {
        "keys": [s["key"] for s in samples],
        "images": images if images is not None else torch.stack([s["image"] for s in samples]),
        "texts": [s["text"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }
    if any(s["views"] for s in samples):
        batch["views"] = [s["views"] for s in samples]
    if tokenize is not None:
        batch["tokens"] = tokenize(batch["texts"])
    return batch


# ------------------------------------------------------------------------------------------
# The dataset (runs inside each loader worker)


class ShardStream(IterableDataset):
    """Deterministic per-worker stream of batches. See the module docstring."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, tokenize: Optional[Callable] = None,
                 sample_fn: Optional[Callable[[dict], Any]] = None, collate_fn: Optional[Callable] = None):
        if not cfg.sources:
            raise ValueError("data.sources is empty: name at least one shard folder")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenize, self.sample_fn, self.collate_fn = tokenize, sample_fn, collate_fn
        self.transform = MedicalImageTransform(cfg.image)
        self.sources = []  # [(paths, counts)] per source
        for src in cfg.sources:
            try:
                m = read_manifest(src.path)
            except ManifestError as e:
                raise ValueError(str(e)) from None
            if cfg.verify_sha256:
                bad = [s.name for s in m.shards if sha256_file(m.folder / s.name) != s.sha256]
                if bad:
                    raise ValueError(f"{src.path}: sha256 mismatch for {bad}")
            self.sources.append(m)
        self.num_samples = sum(m.num_samples for m in self.sources)
        self.epoch = 0
        self.skip: dict[int, int] = {}  # logical worker -> raw samples to skip (resume)
        self.counts0: dict[int, dict] = {}  # logical worker -> skip counts at the resume point
        self.emitted0: dict[int, int] = {}  # logical worker -> batches already emitted this epoch
        self.rotation = 0  # worker slot s plays logical worker (s + rotation) % W

    # -- helpers -------------------------------------------------------------------------
    def _seed(self, *parts) -> int:
        # Not hash(): str hashes are salted per process, and a resumed run is a new process.
        text = repr((self.cfg.seed, self.epoch) + parts).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")

    def _shard_iter(self, src_idx: int, gw: int, total: int, counts: Counter) -> Iterator:
        paths = self.sources[src_idx].paths
        if self.cfg.resampled:
            rng = random.Random(self._seed("resample", src_idx, gw))
            while True:
                yield from _raw_samples(rng.choice(paths), counts)
        order = list(paths)
        if self.cfg.shuffle_shards:
            random.Random(self._seed("shards", src_idx)).shuffle(order)
        for p in order[gw::total]:
            yield from _raw_samples(p, counts)

    def _mixed(self, gw: int, total: int, counts: Counter) -> Iterator:
        iters = [self._shard_iter(i, gw, total, counts) for i in range(len(self.sources))]
        if len(iters) == 1:
            yield from iters[0]
            return
        weights = [s.weight for s in self.cfg.sources]
        rng = random.Random(self._seed("mix", gw))
        live = list(range(len(iters)))
        while live:
            i = rng.choices(live, weights=[weights[j] for j in live])[0]
            try:
                yield next(iters[i])
            except StopIteration:
                live.remove(i)

    def _shuffled(self, it: Iterator, gw: int) -> Iterator:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            yield from it
            return
        rng = random.Random(self._seed("buffer", gw))
        buf = []
        for item in it:
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def worker_batches_per_epoch(self, num_logical: int) -> Optional[int]:
        if self.cfg.samples_per_epoch is None:
            return None
        per_worker = self.cfg.samples_per_epoch / (self.world_size * num_logical * self.cfg.batch_size)
        return max(1, int(-(-per_worker // 1)))

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot, n_logical = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (slot + self.rotation) % n_logical
        gw, total = self.rank * n_logical + logical, self.world_size * n_logical
        counts: Counter = Counter()
        skip = self.skip.get(logical, 0)
        limit = self.worker_batches_per_epoch(n_logical)
        cfg, batch, raw, emitted = self.cfg, [], 0, self.emitted0.get(logical, 0)
        if limit is not None and emitted >= limit:
            return
        size = cfg.image.size
        buf = torch.zeros(cfg.batch_size, 3, size, size)
        for key, parts in self._shuffled(self._mixed(gw, total, counts), gw):
            raw += 1
            if raw <= skip:
                continue
            if raw == skip + 1 and skip:  # replay done: counts continue from the saved ones
                counts.clear()  # in place: the shard readers hold this object
                counts.update(self.counts0.get(logical, {}))
            sample = decode_sample(key, parts, self.transform, cfg, buf[len(batch)])
            if isinstance(sample, dict) and self.sample_fn is not None:
                sample = self.sample_fn(sample)
            if not isinstance(sample, dict):
                buf[len(batch)].zero_()  # the slot is reused: no stale pixels in its padding
                reason = sample if isinstance(sample, str) else "rejected"
                counts[reason] += 1
                if counts[reason] <= 3:
                    log.warning("skipping sample %s: %s", key, reason)
                continue
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                yield self._finish(batch, buf, logical, raw, counts)
                batch, emitted = [], emitted + 1
                buf = torch.zeros(cfg.batch_size, 3, size, size)
                if limit is not None and emitted >= limit:
                    return
        if batch and not cfg.drop_last:
            yield self._finish(batch, buf, logical, raw, counts)

    def _finish(self, samples: list[dict], buf: torch.Tensor, logical: int, raw: int, counts: Counter) -> dict:
        if self.collate_fn:
            out = self.collate_fn(samples)
        else:  # the samples were decoded into buf, unless a sample_fn may have replaced their images
            images = buf[:len(samples)] if self.sample_fn is None else None
            out = default_collate(samples, self.tokenize, images)
        out["__worker__"], out["__raw__"], out["__counts__"] = logical, raw, dict(counts)
        return out


# ------------------------------------------------------------------------------------------
# The consumer side: a DataLoader that knows its position


def _as_is(batch):
    """The workers already collated; the DataLoader's default_convert would walk every meta dict."""
    return batch


class ShardLoader:
    """Iterate batches epoch by epoch; ``state_dict()`` at any batch boundary resumes exactly.

        loader = ShardLoader(cfg, rank, world_size, tokenize=tok)
        loader.load_state_dict(saved)           # optional
        for batch in loader: ...                # one epoch (or samples_per_epoch)
        loader.set_epoch(loader.epoch + 1)
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, **stream_kwargs):
        self.cfg = cfg
        self.dataset = ShardStream(cfg, rank, world_size, **stream_kwargs)
        self.num_logical = max(1, cfg.num_workers)
        self._reset_position()

    def _reset_position(self) -> None:
        self.raw = [0] * self.num_logical  # raw samples consumed per logical worker
        self.worker_batches = [0] * self.num_logical  # batches consumed per logical worker
        self.worker_counts: list[dict] = [{} for _ in range(self.num_logical)]
        self.next_worker = 0
        self.batches = 0

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.dataset.epoch:
            self.dataset.epoch = epoch
            self._reset_position()

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far this epoch, by reason, summed over workers (consumer view)."""
        total: Counter = Counter()
        for c in self.worker_counts:
            total.update(c)
        return dict(total)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "raw": list(self.raw), "worker_batches": list(self.worker_batches),
                "next_worker": self.next_worker,
                "batches": self.batches, "counts": [dict(c) for c in self.worker_counts],
                "num_workers": self.num_logical, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_logical:
            raise ValueError(f"data position was saved with num_workers={state['num_workers']}, "
                             f"this run has {self.num_logical}: exact resume needs the same value")
        self.dataset.epoch = state["epoch"]
        self.raw = list(state["raw"])
        self.worker_batches = list(state["worker_batches"])
        self.worker_counts = [dict(c) for c in state["counts"]]
        self.next_worker = state["next_worker"]
        self.batches = state["batches"]

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds.skip = {w: r for w, r in enumerate(self.raw) if r}
        ds.counts0 = {w: c for w, c in enumerate(self.worker_counts)}
        ds.emitted0 = {w: n for w, n in enumerate(self.worker_batches)}
        ds.rotation = self.next_worker
        loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=self.cfg.num_workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if self.cfg.num_workers else None)
        for batch in loader:
            w = batch.pop("__worker__")
            self.raw[w] = batch.pop("__raw__")
            self.worker_counts[w] = batch.pop("__counts__")
            self.worker_batches[w] += 1
            self.next_worker = (w + 1) % self.num_logical
            self.batches += 1
            yield batch
