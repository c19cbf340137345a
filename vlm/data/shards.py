"""Streaming WebDataset shards with exact, resumable positions.

Design (why it is not a plain ``wds.WebDataset`` chain): a resumed run must see exactly the
samples an uninterrupted run would have seen. Every random choice here is therefore a pure
function of ``(seed, epoch, global worker id)``:

* each source's epoch is one sequence of positions: its shards in a per-epoch shuffled order,
  rotated by a per-epoch offset. Global worker ``gw = rank * num_workers + worker`` of ``T``
  owns the contiguous positions ``[gw * N // T, (gw + 1) * N // T)`` of the source's ``N``
  samples (counts from the manifest), so every worker, and every rank, gets its fair share
  within one sample whatever the shard count: one shard of 300 samples gives [150, 150] at
  world size 2. A worker reads only the shards its positions touch; inside a shared shard it
  walks past the others' members by their headers without copying their bytes. 2 ranks x 2
  workers thus see every sample exactly once per epoch;
* ``resampled`` mode instead draws whole shards with replacement, forever;
* several sources are mixed by weight, sample by sample. Without ``resampled`` an epoch is still
  one pass over every source: the weights only shape the interleaving until a source runs out;
* a shuffle buffer of raw (undecoded) samples reorders within a worker;
* each worker forms whole batches, tagged with its logical id and the number of raw samples it
  has pulled from its buffer; at the end of its epoch a batch-less "tail" record reports the raw
  samples and skips that no batch carried (skipped or dropped after its last batch).

The consumer (``ShardLoader``) records, per logical worker, that raw count and which worker
comes next in the DataLoader's round-robin. Restoring replays each worker's stream and skips
the recorded count without decoding, and rotates the worker slots so the round-robin resumes
where it stopped. Corrupt data (bad tar, escaping member names, undecodable or oversized
images, bad JSON, missing caption) is skipped and counted by reason (by the one worker that owns
the sample), never raised; but a stream that skips more than ``max_consecutive_skips`` samples in
a row, or a rank that keeps none of an epoch's samples, stops with a ``DataStreamError`` naming
the main reason, instead of spinning or training on nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
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


class DataStreamError(ValueError):
    """The stream cannot make batches: (nearly) every sample is skipped. The message names the sources,
    the main skip reason and what to check. Raised in a loader worker, torch re-raises it (same type,
    original message) in the main process. A ValueError: entry points report it as a usage error (one
    message, exit code 2), since the cure is in the data or the config."""


@dataclass
class SourceConfig:
    """One shard folder (written by data_prep) and its mixing weight.

    ``weight`` is a mixing proportion only with ``data.resampled: true`` (samples are drawn from the
    sources in these proportions, forever). Without it, every epoch is one pass over every source and
    the weights only shape the interleaving: a heavier source is drawn from more often until it runs
    out, then the rest follow; each sample of each source is still seen exactly once per epoch.
    """

    path: str = "???"
    weight: float = 1.0

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"source weight must be > 0, got {self.weight} for {self.path}")


@dataclass
class DataConfig:
    """The streaming pipeline: which shards, how they are shuffled, batched and decoded.

    An epoch without ``resampled`` is exactly one pass over every sample of every source, split
    fairly (to within one sample) among ranks and workers whatever the shard count; source weights
    then only shape the interleaving (see SourceConfig). With ``resampled``, shards are drawn with
    replacement and the weights are the mixing proportions.
    """

    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 32  # per rank
    num_workers: int = 2  # DataLoader worker processes per rank (0: in the main process)
    resampled: bool = False  # draw shards with replacement forever (mixing big corpora by weight)
    samples_per_epoch: Optional[int] = None  # resampled mode: global samples that make an "epoch"
    shuffle_buffer: int = 1000  # raw samples held per worker for shuffling (0: no shuffle)
    shuffle_shards: bool = True  # reshuffle the shard order (and re-deal the samples) every epoch
    seed: int = 0
    require_text: bool = True  # a sample without .txt is skipped (counted as missing_text)
    drop_last: bool = False  # drop each worker's final partial batch
    verify_sha256: bool = False  # hash every shard before streaming (slow on big corpora)
    # A worker that skips more than this many samples in a row (undecodable, rejected by the task, ...)
    # stops with a DataStreamError naming the main reason, instead of spinning forever in resampled
    # mode. 0: no limit. A rank that keeps none of an epoch's samples always stops with that error.
    max_consecutive_skips: int = 1000
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0 (0: no limit), got {self.max_consecutive_skips}")
        if self.samples_per_epoch is not None and not self.resampled:
            raise ValueError("samples_per_epoch only applies with resampled=true")


# ------------------------------------------------------------------------------------------
# Raw sample iteration


def _raw_samples(path: str, counts: Counter, start: int = 0,
                 stop: Optional[int] = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar's consecutive members into samples ``(key, {ext: bytes})``, counting what is wrong.

    Only the samples at positions ``[start, stop)`` of the shard are yielded (``stop`` None: to the
    end); the members of the others are walked past without copying their data. What is wrong is
    counted only by the reader that owns the position it happens at, so workers sharing a shard
    count each problem once. A sample is yielded once a member of another key begins, so a
    truncated tar loses only the sample it broke inside, never a complete one.
    """
    key, parts, index = None, {}, -1  # index: position of sample ``key`` in the shard

    def owned(i: int) -> bool:
        return i >= start and (stop is None or i < stop)

    def want(name: str) -> bool:  # does this member belong to a sample we keep? (asked before copying it)
        split = split_member_name(name)
        return split is not None and owned(index if split[0] == key else index + 1)

    try:
        for name, data in iter_members(path, want if start or stop is not None else None):
            split = split_member_name(name)
            if split is None:
                if owned(max(index, 0)):
                    counts["unsafe_member_name"] += 1
                continue
            k, ext = split
            if k != key:
                if parts:
                    yield key, parts
                key, parts, index = k, {}, index + 1
                if stop is not None and index >= stop:
                    return
            if data is not None and owned(index):
                parts[ext] = data
    except (TruncatedTar, OSError) as exn:
        cut = split_member_name(exn.member) if getattr(exn, "member", None) else None
        in_next = cut is not None and cut[0] != key  # the break came in the next sample: this one is complete
        if owned(index + 1 if in_next else max(index, 0)):
            counts["truncated_tar"] += 1
            log.warning("shard %s is truncated or corrupt (%s); the rest of it is skipped", path, exn)
        if parts and in_next:
            yield key, parts
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
# When a stream cannot make batches

_HINTS = {
    "masking_failed": "the chat template (chat.template; auto uses the tokenizer's own): the assistant answers "
                      "were not found where the template puts them, so no loss mask could be built",
    "missing_text": "data.require_text: these samples have no .txt caption (instruction shards usually have none: "
                    "set data.require_text=false)",
    "no_conversation": "that these are instruction shards (a 'conversations' list in each sample's .json), "
                       "or chat.template=plain to train on the captions",
    "too_long": "chat.max_length against the image tokens plus the conversation (and chat.overlong)",
    "image_token_mismatch": "chat.image_token against the image placeholders in the conversations",
    "image_too_large": "data.image.max_pixels against the image sizes in the shards",
    "rejected": "the sample_fn, which rejected them",
}
_SHARD_HINT = "the shards themselves: python -m data_prep.inspect FOLDER verifies them member by member"
for _r in ("missing_image", "bad_image", "bad_json", "bad_text", "unsafe_member_name", "truncated_tar",
           "empty_shard", "bad_conversation", "unknown_role", "empty_assistant_turn", "no_assistant_turn"):
    _HINTS[_r] = _SHARD_HINT
_TAR_REASONS = ("unsafe_member_name", "truncated_tar")  # counted per member or shard, not per sample


def _skip_error(what: str, reasons: Counter, folders: list[str], advice: str = "") -> DataStreamError:
    (top, n), *rest = reasons.most_common()
    others = ", ".join(f"{k} ({v})" for k, v in rest) or "none"
    hint = _HINTS.get(top, "the sample_fn and the shards (python -m data_prep.stream reports skips by reason)")
    return DataStreamError(f"data stream: {what}, reading {', '.join(folders)}. Main reason: {top} ({n}); "
                           f"other reasons: {others}. Check {hint}.{advice}")


# ------------------------------------------------------------------------------------------
# The dataset (runs inside each loader worker)


def _spans(lo: int, hi: int, shift: int, n: int) -> list[tuple[int, int]]:
    """Positions ``[lo, hi)`` of a sequence of ``n`` rotated by ``shift``, as ranges of ``[0, n)`` in reading order."""
    if lo >= hi:
        return []
    a, b = lo + shift, hi + shift
    if a >= n:
        return [(a - n, b - n)]
    return [(a, b)] if b <= n else [(a, n), (0, b - n)]


class ShardStream(IterableDataset):
    """Deterministic per-worker stream of batches. See the module docstring."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, tokenize: Optional[Callable] = None,
                 sample_fn: Optional[Callable[[dict], Any]] = None, collate_fn: Optional[Callable] = None):
        if not cfg.sources:
            raise ValueError("data.sources is empty: name at least one shard folder")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenize, self.sample_fn, self.collate_fn = tokenize, sample_fn, collate_fn
        self.transform = MedicalImageTransform(cfg.image)
        self.sources = []  # Manifest per source
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
        if not cfg.resampled and len({s.weight for s in cfg.sources}) > 1:
            log.warning("data.sources have different weights but data.resampled is false: every epoch is one "
                        "pass over every source, the weights only shape the interleaving until a source runs "
                        "out. For mixing proportions set data.resampled=true (and data.samples_per_epoch).")
        self.num_samples = sum(m.num_samples for m in self.sources)
        self.epoch = 0
        self.skip: dict[int, int] = {}  # logical worker -> raw samples to skip (resume)
        self.counts0: dict[int, dict] = {}  # logical worker -> skip counts at the resume point
        self.emitted0: dict[int, int] = {}  # logical worker -> batches already emitted this epoch
        self.rotation = 0  # worker slot s plays logical worker (s + rotation) % W
        self.stop_event = None  # set by the consumer when it stops: a worker still looking for a sample ends

    # -- helpers -------------------------------------------------------------------------
    def _seed(self, *parts) -> int:
        # Not hash(): str hashes are salted per process, and a resumed run is a new process.
        text = repr((self.cfg.seed, self.epoch) + parts).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")

    def _deal(self, src_idx: int, gw: int, total: int) -> list[tuple[str, int, Optional[int]]]:
        """This worker's share of one source's epoch: ``(shard path, start, stop)`` reads, in order.

        The epoch's sequence is the shards in shuffled order, rotated by a random offset (so that even a
        one-shard set is dealt differently every epoch); worker ``gw`` owns positions
        ``[gw * n // total, (gw + 1) * n // total)``. The reader of a shard's last position also takes
        whatever the shard holds beyond its manifest count, so nothing is lost if a count is wrong.
        """
        m = self.sources[src_idx]
        n, shift, order = m.num_samples, 0, list(range(len(m.shards)))
        if self.cfg.shuffle_shards:
            rng = random.Random(self._seed("shards", src_idx))
            rng.shuffle(order)
            shift = rng.randrange(n) if n else 0
        reads = []
        for a, b in _spans(gw * n // total, (gw + 1) * n // total, shift, n):
            off = 0
            for j in order:
                c, path = m.shards[j].num_samples, m.paths[j]
                if c == 0:  # (a manifest that says so): read by the owner of the position it sits at
                    if a <= min(off, n - 1) < b:
                        reads.append((path, 0, None))
                    continue
                lo, hi = max(a, off), min(b, off + c)
                if lo < hi:
                    reads.append((path, lo - off, None if hi == off + c else hi - off))
                off += c
        return reads

    def _shard_iter(self, src_idx: int, gw: int, total: int, counts: Counter) -> Iterator:
        m = self.sources[src_idx]
        if self.cfg.resampled:
            rng = random.Random(self._seed("resample", src_idx, gw))
            empty: set[str] = set()  # shards that held no readable sample (reading is deterministic)
            while True:
                path, got = rng.choice(m.paths), False
                for key, parts in _raw_samples(path, counts):
                    got = True
                    yield src_idx, key, parts
                if not got:
                    empty.add(path)
                    if len(empty) == len(set(m.paths)):  # drawing on would spin forever
                        raise _skip_error(f"none of the {len(empty)} shards of this source holds a readable "
                                          f"sample (worker {gw})", +counts or Counter(empty_shard=len(empty)),
                                          [str(m.folder)])
        for path, start, stop in self._deal(src_idx, gw, total):
            for key, parts in _raw_samples(path, counts, start, stop):
                yield src_idx, key, parts

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
        cfg, stop, bound = self.cfg, self.stop_event, self.cfg.max_consecutive_skips
        limit = self.worker_batches_per_epoch(n_logical)
        emitted = self.emitted0.get(logical, 0)
        if limit is not None and emitted >= limit:
            return
        skip, saved = self.skip.get(logical, 0), dict(self.counts0.get(logical, {}))
        told = (skip, saved)  # what the consumer knows of this worker: raw count, skip counts
        counts: Counter = Counter()
        in_row, row_reasons, row_sources = 0, Counter(), Counter()  # the current run of consecutive skips
        batch, raw, size = [], 0, cfg.image.size
        buf = torch.zeros(cfg.batch_size, 3, size, size)
        for src, key, parts in self._shuffled(self._mixed(gw, total, counts), gw):
            raw += 1
            if raw <= skip:
                if stop is not None and raw % 1024 == 0 and stop.is_set():
                    return
                continue
            if raw == skip + 1 and skip:  # replay done: counts continue from the saved ones
                counts.clear()  # in place: the shard readers hold this object
                counts.update(saved)
            if stop is not None and stop.is_set():  # the consumer has gone: do not look any further
                return
            sample = decode_sample(key, parts, self.transform, cfg, buf[len(batch)])
            if isinstance(sample, dict) and self.sample_fn is not None:
                sample = self.sample_fn(sample)
            if not isinstance(sample, dict):
                buf[len(batch)].zero_()  # the slot is reused: no stale pixels in its padding
                reason = sample if isinstance(sample, str) else "rejected"
                counts[reason] += 1
                if counts[reason] <= 3:
                    log.warning("skipping sample %s: %s", key, reason)
                in_row += 1
                row_reasons[reason] += 1
                row_sources[src] += 1
                if bound and in_row > bound:
                    raise _skip_error(
                        f"{in_row} samples in a row were skipped by worker {logical} of rank {self.rank} "
                        f"(more than data.max_consecutive_skips={bound})", row_reasons,
                        [f"{self.sources[i].folder} ({n})" for i, n in row_sources.most_common()],
                        " If long runs of unusable samples are expected, raise data.max_consecutive_skips "
                        "(0: no limit).")
                continue
            if in_row:
                in_row, row_reasons, row_sources = 0, Counter(), Counter()
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                out = self._finish(batch, buf, logical, raw, counts)
                told = (raw, out["__counts__"])
                yield out
                batch, emitted = [], emitted + 1
                buf = torch.zeros(cfg.batch_size, 3, size, size)
                if limit is not None and emitted >= limit:
                    return
        if skip and raw <= skip:  # nothing after the resume point: the consumer's counts stand
            counts.clear()
            counts.update(saved)
        if batch and not cfg.drop_last:
            yield self._finish(batch, buf, logical, raw, counts)
        elif (raw, dict(counts)) != told:  # skips or dropped samples since the last batch: a tail reports them
            yield self._tag({}, logical, raw, counts, tail=True)

    def _finish(self, samples: list[dict], buf: torch.Tensor, logical: int, raw: int, counts: Counter) -> dict:
        if self.collate_fn:
            out = self.collate_fn(samples)
        else:  # the samples were decoded into buf, unless a sample_fn may have replaced their images
            images = buf[:len(samples)] if self.sample_fn is None else None
            out = default_collate(samples, self.tokenize, images)
        return self._tag(out, logical, raw, counts)

    @staticmethod
    def _tag(out: dict, logical: int, raw: int, counts: Counter, tail: bool = False) -> dict:
        out["__worker__"], out["__raw__"], out["__counts__"], out["__tail__"] = logical, raw, dict(counts), tail
        return out


# ------------------------------------------------------------------------------------------
# The consumer side: a DataLoader that knows its position


def _worker_init(_: int) -> None:
    """Loader workers ignore SIGTERM: Slurm and torchrun signal every process, and a worker that died on it
    would make the main process fail mid-step instead of stopping cleanly (train/trainer.py). A worker
    still ends when the main process shuts it down (stop event, torch's done event) or dies (torch's
    watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _as_is(batch):
    """The workers already collated; the DataLoader's default_convert would walk every meta dict."""
    return batch


class ShardLoader:
    """Iterate batches epoch by epoch; ``state_dict()`` at any batch boundary resumes exactly.

        loader = ShardLoader(cfg, rank, world_size, tokenize=tok)
        loader.load_state_dict(saved)           # optional
        for batch in loader: ...                # one epoch (or samples_per_epoch)
        loader.set_epoch(loader.epoch + 1)

    Interruptions: an exception raised while the loader waits for a batch (say by a SIGTERM handler)
    propagates as is, the worker processes are shut down at once, and ``state_dict()`` stays at the
    last batch boundary (the last batch yielded, plus any batch-less tails since), so a checkpoint
    written then resumes with exactly the batches not yet yielded. Nothing here catches
    ``Exception`` around the wait; note that sample decoding in the main process (``num_workers=0``)
    does, for the many error types of image libraries: an interrupting exception is best derived
    from ``BaseException``, as ``KeyboardInterrupt`` is.
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

    def _record(self, item: dict) -> bool:
        """Advance the position past one worker item; True if it was a tail (no batch to yield)."""
        w, raw, counts, tail = (item.pop(k) for k in ("__worker__", "__raw__", "__counts__", "__tail__"))
        self.raw[w], self.worker_counts[w] = raw, counts
        self.next_worker = (w + 1) % self.num_logical  # a tail takes its turn in the round-robin too
        if not tail:
            self.worker_batches[w] += 1
            self.batches += 1
        return tail

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds.skip = {w: r for w, r in enumerate(self.raw) if r}
        ds.counts0 = {w: c for w, c in enumerate(self.worker_counts)}
        ds.emitted0 = {w: n for w, n in enumerate(self.worker_batches)}
        ds.rotation = self.next_worker
        # A worker still looking for a sample never gets back to torch's loop, where it would notice a
        # shutdown (torch then waits 5 s per worker before killing it): this event ends it at once.
        ds.stop_event = multiprocessing.get_context().Event() if self.cfg.num_workers else None
        loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=self.cfg.num_workers,
                            worker_init_fn=_worker_init if self.cfg.num_workers else None,
                            persistent_workers=False, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if self.cfg.num_workers else None)
        items = iter(loader)
        try:
            for item in items:  # an exception while waiting here leaves the position untouched
                before = self.state_dict()
                try:
                    tail = self._record(item)
                except BaseException:  # interrupted while recording: this batch never reaches the consumer
                    self.load_state_dict(before)
                    raise
                if not tail:
                    yield item
        finally:
            # On an exception, or when the consumer drops this generator: stop the workers now, not
            # whenever the last reference to the iterator happens to go.
            if ds.stop_event is not None:
                ds.stop_event.set()
            shutdown = getattr(items, "_shutdown_workers", None)  # absent with num_workers=0
            if shutdown is not None:
                shutdown()
        skipped = self.skipped
        read = sum(self.raw)
        if self.batches == 0 and skipped and read == sum(v for k, v in skipped.items() if k not in _TAR_REASONS):
            raise _skip_error(f"rank {ds.rank} found no usable sample in epoch {self.epoch} ({read} read, all "
                              f"skipped)", Counter(skipped), [str(m.folder) for m in ds.sources])
