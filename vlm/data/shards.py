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
* each worker forms whole batches, tagged with its logical id, the number of raw samples it has
  pulled from its buffer and where its pipeline is (vlm.data.position); at the end of its epoch a
  batch-less "tail" record reports the raw samples and skips that no batch carried.

The consumer (``ShardLoader``) records, per logical worker, that position, and which worker comes
next in the DataLoader's round-robin. Restoring seeks each reader to its byte offset, re-reads the
shuffle buffer's samples by reference and restores the RNG states, so it costs the buffer, not the
position; it rotates the worker slots so the round-robin resumes where it stopped. Every rank's
positions together can also be redealt onto another world size or worker count
(``ShardLoader.load_state_dicts``).

Corrupt data (a truncated tar or a malformed tar header, escaping member names, links, undecodable or
oversized images, PIL's decompression-bomb bound included, bad JSON, missing caption) is skipped and
counted by reason (by the one worker that owns the sample, vlm.data.position.raw_samples), never
raised; but a stream that skips more than ``max_consecutive_skips`` samples in a row, or a rank that
keeps none of an epoch's samples, stops with a ``DataStreamError`` naming the main reason, instead of
spinning or training on nothing. Skip counts travel with each batch and, for what a worker read after
its last batch (skips, a dropped partial batch), with a batch-less tail at its end of epoch, recorded
before the batch ahead of it is handed on: once the consumer holds an epoch's last batch,
``ShardLoader.skipped`` holds every count of the epoch, whatever the number of workers.
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
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data import position as P
from vlm.data.position import Mixer, PositionError, ResampleReader, ShareReader, ShuffleBuffer
from vlm.data.schema import IMAGE_EXTS, ManifestError, read_manifest, sha256_file
from vlm.data.transforms import ImageConfig, MedicalImageTransform, PILImages

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
# Decoding and collation


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
        except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5000-digit number, nesting 100k deep
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
    except Image.DecompressionBombError:  # PIL's own bound (2 x Image.MAX_IMAGE_PIXELS), above max_pixels
        return "image_too_large"
    except Exception:  # PIL raises many types for truncated/corrupt files
        return "bad_image"
    return {"key": key, "image": images[0], "views": images[1:], "text": text, "meta": meta}


def default_collate(samples: list[dict], tokenize: Optional[Callable] = None,
                    images: Optional[torch.Tensor] = None) -> dict:
    """``images``: the batch tensor the samples were decoded into (no stacking needed)."""
    batch = {
        "keys": [s["key"] for s in samples],
        "images": images if images is not None else torch.stack([s["image"] for s in samples])
        if isinstance(samples[0]["image"], torch.Tensor) else [s["image"] for s in samples],  # image.output: pil
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
    "image_rejected": "the images against the stock VLM's image processor (it refused them: aspect ratio, size)",
}
_SHARD_HINT = "the shards themselves: python -m data_prep.inspect FOLDER verifies them member by member"
for _r in ("missing_image", "bad_image", "bad_json", "bad_text", "unsafe_member_name", "truncated_tar",
           "bad_tar_header", "non_file_member", "empty_shard", "bad_conversation", "unknown_role",
           "empty_assistant_turn", "no_assistant_turn"):
    _HINTS[_r] = _SHARD_HINT
# counted per member or per shard, not per sample
_TAR_REASONS = ("unsafe_member_name", "non_file_member", "truncated_tar", "bad_tar_header")


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
        self.transform = PILImages(cfg.image) if cfg.image.output == "pil" else MedicalImageTransform(cfg.image)
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
        # What the consumer tells the workers (set by ShardLoader.__iter__), per logical worker:
        self.resume: dict[int, dict] = {}  # position to go on from (vlm.data.position), or {"replay": n}
        self.plans: dict[int, dict] = {}  # its share after a redeal (ShardLoader.load_state_dicts)
        self.raw0: dict[int, int] = {}  # raw samples pulled so far this epoch
        self.counts0: dict[int, dict] = {}  # skip counts so far
        self.emitted0: dict[int, int] = {}  # batches already emitted this epoch
        self.rotation = 0  # worker slot s plays logical worker (s + rotation) % W
        self.stop_event = None  # set by the consumer when it stops: a worker still looking for a sample ends

    # -- helpers -------------------------------------------------------------------------
    def _seed(self, *parts) -> int:
        # Not hash(): str hashes are salted per process, and a resumed run is a new process.
        text = repr((self.cfg.seed, self.epoch) + parts).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")

    def _deal(self, src_idx: int, gw: int, total: int) -> list[tuple]:
        """This worker's share of one source's epoch: parts ``(shard, start, stop, 0, 0, 0)`` (see
        vlm.data.position; ``stop`` -1: to the shard's end), in reading order.

        The epoch's sequence is the shards in shuffled order, rotated by a random offset (so that even a
        one-shard set is dealt differently every epoch); worker ``gw`` owns positions
        ``[gw * n // total, (gw + 1) * n // total)``. The reader of a shard's last position also takes
        whatever the shard holds beyond its manifest count, so nothing is lost if a count is wrong.
        """
        m = self.sources[src_idx]
        n, shift, order = m.num_samples, 0, list(range(len(m.shards)))
        if n == 0:  # every shard's count is 0 by the manifest: worker 0 reads them (and counts what is wrong)
            return [(j, 0, -1, 0, 0, 0) for j in order] if gw == 0 else []
        if self.cfg.shuffle_shards:
            rng = random.Random(self._seed("shards", src_idx))
            rng.shuffle(order)
            shift = rng.randrange(n) if n else 0
        reads = []
        for a, b in _spans(gw * n // total, (gw + 1) * n // total, shift, n):
            off = 0
            for j in order:
                c = m.shards[j].num_samples
                if c == 0:  # (a manifest that says so): read by the owner of the position it sits at
                    if a <= min(off, n - 1) < b:
                        reads.append((j, 0, -1, 0, 0, 0))
                    continue
                lo, hi = max(a, off), min(b, off + c)
                if lo < hi:
                    reads.append((j, lo - off, -1 if hi == off + c else hi - off, 0, 0, 0))
                off += c
        return reads

    def _pipeline(self, gw: int, total: int, counts: Counter, plan: Optional[dict] = None,
                  pos: Optional[dict] = None) -> tuple[Iterator, Callable[[], dict]]:
        """This worker's raw samples ``(src, key, parts, ref)``, shuffled, and a function that says where the
        pipeline is (vlm.data.position). ``pos``: go on from that position; ``plan``: read that share (a
        redeal) instead of the epoch's deal, with random streams of its own."""
        tag = () if plan is None else (plan["tag"],)
        paths = [m.paths for m in self.sources]
        readers: list = []
        for s, m in enumerate(self.sources):
            state = pos["readers"][s] if pos is not None else None
            if self.cfg.resampled:
                def fail(n, m=m):  # drawing on would spin forever
                    return _skip_error(f"none of the {n} shards of this source holds a readable sample (worker "
                                       f"{gw})", +counts or Counter(empty_shard=n), [str(m.folder)])

                rng = random.Random(self._seed("resample", s, gw, *tag))
                readers.append(ResampleReader(s, paths[s], rng, counts, fail, state))
            else:
                parts = plan["parts"][s] if plan is not None else self._deal(s, gw, total)
                readers.append(ShareReader(s, paths[s], parts, counts, state))
        mixer = Mixer(readers, [src.weight for src in self.cfg.sources], random.Random(self._seed("mix", gw, *tag)),
                      pos["mix"] if pos is not None else None)
        buffer = ShuffleBuffer(self.cfg.shuffle_buffer, random.Random(self._seed("buffer", gw, *tag)), paths,
                               pos["buffer"] if pos is not None else None)

        def where() -> dict:
            return {"readers": [r.state() for r in readers], "mix": mixer.state(), "buffer": buffer.state()}

        return buffer.shuffled(iter(mixer)), where

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
        plan, pos = self.plans.get(logical), self.resume.get(logical)
        limit = plan["batches"] if plan is not None else self.worker_batches_per_epoch(n_logical)
        emitted = self.emitted0.get(logical, 0)
        if limit is not None and emitted >= limit:
            return
        saved = dict(self.counts0.get(logical, {}))
        skip = pos["replay"] if pos is not None and "replay" in pos else 0  # a position of the old format
        if skip:
            pos = None
        raw = 0 if skip else self.raw0.get(logical, 0)
        counts: Counter = Counter() if skip else Counter(saved)
        told = (skip or raw, saved)  # what the consumer knows of this worker: raw count, skip counts
        in_row, row_reasons, row_sources = 0, Counter(), Counter()  # the current run of consecutive skips
        batch, size = [], cfg.image.size
        pil = cfg.image.output == "pil"  # PIL images for a processor: no batch tensor to decode into
        buf = torch.zeros(cfg.batch_size if not pil else 0, 3, size, size)
        samples, where = self._pipeline(gw, total, counts, plan, pos)
        for src, key, parts, _ in samples:
            raw += 1
            if raw <= skip:  # replaying an old-format position: pulled, not decoded
                if stop is not None and raw % 1024 == 0 and stop.is_set():
                    return
                continue
            if raw == skip + 1 and skip:  # replay done: counts continue from the saved ones
                counts.clear()  # in place: the shard readers hold this object
                counts.update(saved)
            if stop is not None and stop.is_set():  # the consumer has gone: do not look any further
                return
            sample = decode_sample(key, parts, self.transform, cfg, None if pil else buf[len(batch)])
            if isinstance(sample, dict) and self.sample_fn is not None:
                sample = self.sample_fn(sample)
            if not isinstance(sample, dict):
                if not pil:
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
                out = self._finish(batch, buf, logical, raw, counts, where())
                told = (raw, out["__counts__"])
                yield out
                batch, emitted = [], emitted + 1
                buf = torch.zeros(cfg.batch_size if not pil else 0, 3, size, size)
                if limit is not None and emitted >= limit:
                    return
        if skip and raw <= skip:  # nothing after the resume point: the consumer's counts stand
            counts.clear()
            counts.update(saved)
        if batch and not cfg.drop_last:
            yield self._finish(batch, buf, logical, raw, counts, where())
        elif (raw, dict(counts)) != told:  # skips or dropped samples since the last batch: a tail reports them
            yield self._tag({}, logical, raw, counts, where(), tail=True)

    def _finish(self, samples: list[dict], buf: torch.Tensor, logical: int, raw: int, counts: Counter,
                pos: dict) -> dict:
        if self.collate_fn:
            out = self.collate_fn(samples)
        else:  # the samples were decoded into buf, unless a sample_fn may have replaced their images
            images = buf[:len(samples)] if self.sample_fn is None and len(buf) else None
            out = default_collate(samples, self.tokenize, images)
        return self._tag(out, logical, raw, counts, pos)

    @staticmethod
    def _tag(out: dict, logical: int, raw: int, counts: Counter, pos: dict, tail: bool = False) -> dict:
        out["__worker__"], out["__raw__"], out["__counts__"], out["__tail__"] = logical, raw, dict(counts), tail
        out["__pos__"] = pos
        return out


# ------------------------------------------------------------------------------------------
# The consumer side: a DataLoader that knows its position


def _worker_init(_: int) -> None:
    """Loader workers ignore SIGTERM: Slurm and torchrun signal every process, and a worker that died on it
    would make the main process fail mid-step instead of stopping cleanly (train/trainer.py). A worker
    still ends when the main process shuts it down (stop event, torch's done event) or dies: then at once.
    (torch's own watchdog lets a worker return normally, and its exit then waits for the result queue's
    feeder thread, which blocks forever on a full pipe whose only reader left is the worker itself: the
    worker would outlive a SIGKILLed trainer. So the kernel kills it with its parent (Linux), and a thread
    ends it within a second elsewhere.)"""
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="medvlm-parent-watch", daemon=True).start()


def _as_is(batch):
    """The workers already collated; the DataLoader's default_convert would walk every meta dict."""
    return batch


class ShardLoader:
    """Iterate batches epoch by epoch; ``state_dict()`` at any batch boundary resumes exactly.

        loader = ShardLoader(cfg, rank, world_size, tokenize=tok)
        loader.load_state_dict(saved)           # optional; or load_state_dicts(every rank's saved state)
        for batch in loader: ...                # one epoch (or samples_per_epoch)
        loader.set_epoch(loader.epoch + 1)

    Positions (``state_dict()``, JSON, tens of kB per rank): per logical worker, where each source's
    reader is (part, byte offset, sample position), the mixer's and the shuffle buffer's RNG states and
    the buffer's samples as references (source, shard, byte offset, position); see vlm.data.position.
    Resuming seeks there and re-reads the buffered samples: its cost is that of the buffer, whatever the
    position, and the batches that follow are those an uninterrupted run yields (same seed, sources,
    shards, rank, world size, num_workers, shuffle_buffer and shuffle_shards; batch_size, drop_last and
    the decoding settings may change). Positions of the old format (a raw sample count per worker,
    written before version 2) still load: those workers replay their stream up to the count, as before.

    Interruptions: an exception raised while the loader waits for a batch (say by a SIGTERM handler)
    propagates as is, the worker processes are shut down at once, and ``state_dict()`` stays at the
    last batch boundary (the last batch yielded, plus any batch-less tails since), so a checkpoint
    written then resumes with exactly the batches not yet yielded. (Without ``resampled``, a batch is
    handed on once the next item is in (in the main process: near the share's end only), so that the
    tails behind it, the counts of workers that have ended, are recorded first: when the consumer holds
    the epoch's last batch, ``skipped`` is complete. The item looked ahead at stays unrecorded, and an
    interruption meanwhile undoes the batch, not yet yielded.) Nothing here catches ``Exception``
    around the wait; note that sample decoding in the main process (``num_workers=0``) does, for the
    many error types of image libraries: an interrupting exception is best derived from
    ``BaseException``, as ``KeyboardInterrupt`` is.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, **stream_kwargs):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg = cfg
        self.dataset = ShardStream(cfg, rank, world_size, **stream_kwargs)
        self.num_logical = max(1, cfg.num_workers)
        self._fingerprints = [P.fingerprint(m) for m in self.dataset.sources]
        self._json: dict[int, tuple] = {}  # logical worker -> (raw position, its JSON form)
        self._reset_position()

    def _reset_position(self) -> None:
        n = self.num_logical
        self.raw = [0] * n  # raw samples consumed per logical worker
        self.worker_batches = [0] * n  # batches consumed per logical worker
        self.worker_counts: list[dict] = [{} for _ in range(n)]
        self.positions: list[Optional[dict]] = [None] * n  # where each worker is (None: at its share's start)
        self.plans: list[Optional[dict]] = [None] * n  # each worker's share after a redeal (None: the deal)
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

    # -- positions -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's position: plain JSON-able data, some of it tuples (written as arrays), tens of kB."""
        ds, cfg = self.dataset, self.cfg
        return {"version": P.VERSION, "epoch": self.epoch, "rank": ds.rank, "world_size": ds.world_size,
                "num_workers": self.num_logical, "seed": cfg.seed, "resampled": cfg.resampled,
                "shuffle_shards": cfg.shuffle_shards, "shuffle_buffer": cfg.shuffle_buffer,
                "batch_size": cfg.batch_size,
                "sources": [{"path": str(m.folder), "fingerprint": f} for m, f in zip(ds.sources, self._fingerprints)],
                "raw": list(self.raw), "worker_batches": list(self.worker_batches), "next_worker": self.next_worker,
                "batches": self.batches, "counts": [dict(c) for c in self.worker_counts],
                "workers": [P.thaw(self._position_json(w)) for w in range(self.num_logical)],
                "plans": [P.thaw(p) for p in self.plans]}

    def _position_json(self, w: int) -> Optional[dict]:
        """Worker ``w``'s position in JSON form, converted once per position received (state_dict is taken
        every step; about 0.2 ms a worker for a buffer of 1000)."""
        raw = self.positions[w]
        cached = self._json.get(w)
        if cached is None or cached[0] is not raw:
            cached = self._json[w] = (raw, P.position_to_json(raw))
        return cached[1]

    def _check_stream(self, state: dict, what: str) -> None:
        """The settings that decide which samples each position holds must be this run's."""
        cfg = self.cfg
        for key, now in (("seed", cfg.seed), ("resampled", cfg.resampled), ("shuffle_shards", cfg.shuffle_shards)):
            if state.get(key) != now:
                raise PositionError(f"{what} was saved with data.{key}={state.get(key)}, this run has {now}: a "
                                    f"position only means something for the stream it was taken in")
        saved = state.get("sources", [])
        if [s["fingerprint"] for s in saved] != self._fingerprints:
            now = [str(m.folder) for m in self.dataset.sources]
            raise PositionError(f"{what} was saved for other shards: sources {[s['path'] for s in saved]} "
                                f"(fingerprints of their manifests differ from those of {now}); a position "
                                f"holds byte offsets into the very shards it was taken in")

    def load_state_dict(self, state: dict) -> None:
        """Go on exactly from ``state``, this rank's own saved position (see the class docstring)."""
        version = state.get("version", 1)
        if version > P.VERSION:
            raise PositionError(f"data position version {version} is newer than this code ({P.VERSION})")
        if state["num_workers"] != self.num_logical:
            raise PositionError(f"data position was saved with num_workers={state['num_workers']}, this run has "
                                f"{self.num_logical}: exact resume needs the same value (load_state_dicts with "
                                f"every rank's position redeals the epoch's rest instead)")
        if version == 1:  # raw counts: the workers replay up to them
            self.dataset.epoch = state["epoch"]
            self._reset_position()
            self.positions = [{"replay": r} if r else None for r in state["raw"]]
        else:
            ds = self.dataset
            if (state["rank"], state["world_size"]) != (ds.rank, ds.world_size):
                raise PositionError(f"data position was saved by rank {state['rank']} of {state['world_size']}, "
                                    f"this loader is rank {ds.rank} of {ds.world_size}: load_state_dicts with "
                                    f"every rank's position redeals the epoch's rest")
            self._check_stream(state, "data position")
            if state["shuffle_buffer"] != self.cfg.shuffle_buffer:
                raise PositionError(f"data position was saved with data.shuffle_buffer={state['shuffle_buffer']}, "
                                    f"this run has {self.cfg.shuffle_buffer}: exact resume needs the same value "
                                    f"(load_state_dicts redeals the epoch's rest for any value)")
            self.dataset.epoch = state["epoch"]
            self.positions = [P.position_from_json(p) for p in state["workers"]]
            self.plans = [P.freeze_plan(p) for p in state["plans"]]
        self.raw = list(state["raw"])
        self.worker_batches = list(state["worker_batches"])
        self.worker_counts = [dict(c) for c in state["counts"]]
        self.next_worker = state["next_worker"]
        self.batches = state["batches"]

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resume from every rank's saved position (``states[r]``: old rank r's ``state_dict()``), whatever the
        world size and num_workers they were saved with.

        Same world size, num_workers and shuffle_buffer: exactly ``load_state_dict(states[rank])`` (the
        continuation is bit-identical). Otherwise the rest of the saved epoch is redealt:

        * without ``resampled``: what every old worker had not yet handed to the model (the samples in its
          shuffle buffer, the rest of the shard part it was in, its parts not begun) is laid end to end
          per source, in old global worker order, and split like a fresh epoch: new global worker ``g``
          of ``T`` takes positions ``[g * N // T, (g + 1) * N // T)`` of the ``N`` left (by the
          manifests' counts). So, within the epoch, every sample is handed to the model (or skipped and
          counted, or dropped with a worker's last partial batch under ``drop_last``) exactly once,
          before or after the resume; none is repeated, none lost. A worker's new share is read with
          fresh shuffle, mix and buffer streams seeded by (seed, epoch, new worker, the saved positions);
        * with ``resampled``: every new worker starts a fresh resampled stream seeded by (seed, epoch, new
          worker, the saved positions), so its draws are as unbiased as any stream's (shards uniformly,
          sources by weight); the old buffers, random draws themselves, are dropped. With
          ``samples_per_epoch``, the samples the old ranks consumed count against the epoch: the new
          workers make ``ceil(left / (T * batch_size))`` batches each.

        Either way the next epoch starts fresh on the new world size. Skip counts carry over: rank ``r``
        adds up those of the old ranks ``r' % world_size == r`` (so summed over ranks they are kept), and
        ``batches`` becomes the old ranks' total over the new world size, rounded up. Positions of the
        old format (raw counts) redeal nothing: they need the same world size and num_workers.
        """
        ds, cfg = self.dataset, self.cfg
        if not isinstance(states, list) or not states or not all(isinstance(s, dict) for s in states):
            raise PositionError("load_state_dicts wants a non-empty list of every rank's data position")
        old_world, first = len(states), states[0]
        old_workers = first.get("num_workers")
        legacy = any(s.get("version", 1) == 1 for s in states)
        if old_world == ds.world_size and old_workers == self.num_logical and (
                legacy or first.get("shuffle_buffer") == cfg.shuffle_buffer):
            return self.load_state_dict(states[ds.rank])
        if legacy:
            raise PositionError(f"these data positions are of the old format (raw sample counts per worker), "
                                f"which resume only on the world size and num_workers that saved them ({old_world} "
                                f"ranks x {old_workers} workers; this run: {ds.world_size} x {self.num_logical}); "
                                f"resume once with those, save, then change them")
        for r, s in enumerate(states):
            if (s["rank"], s["world_size"]) != (r, old_world):
                raise PositionError(f"data positions: entry {r} was saved by rank {s['rank']} of {s['world_size']}; "
                                    f"load_state_dicts wants every rank's position, indexed by rank")
            if (s["epoch"], s["num_workers"]) != (first["epoch"], old_workers):
                raise PositionError(f"data positions disagree: rank {r} is at epoch {s['epoch']} with "
                                    f"num_workers={s['num_workers']}, rank 0 at epoch {first['epoch']} with "
                                    f"{old_workers}")
            self._check_stream(s, f"data position of rank {r}")
            if s.get("version", 1) > P.VERSION:
                raise PositionError(f"data position version {s['version']} is newer than this code ({P.VERSION})")
        ds.epoch = first["epoch"]
        self._reset_position()
        tag = P.digest(states)
        total, n = ds.world_size * self.num_logical, self.num_logical
        if cfg.resampled:
            left = None
            if cfg.samples_per_epoch is not None:
                used = sum(sum(s["worker_batches"]) * s["batch_size"] for s in states)
                left = -(-max(0, cfg.samples_per_epoch - used) // (total * cfg.batch_size))
            self.plans = [{"tag": tag, "parts": None, "batches": left} for _ in range(n)]
        else:
            shares = [[] for _ in range(n)]
            for src, m in enumerate(ds.sources):
                rest = []
                for r, s in enumerate(states):
                    for w in range(old_workers):
                        pos, plan = s["workers"][w], s["plans"][w]
                        if pos is not None and "replay" in pos:
                            raise PositionError(f"data position of rank {r}, worker {w} is a replay count (the old "
                                                f"format): resume once on {old_world} ranks x {old_workers} "
                                                f"workers, save, then change them")
                        parts = plan["parts"][src] if plan is not None else ds._deal(src, r * old_workers + w,
                                                                                     old_world * old_workers)
                        refs = [ref for ref in P.buffered_refs(pos) if ref[0] == src]
                        rest += P.remainder([tuple(p) for p in parts], pos and pos["readers"][src], refs)
                counts = [sh.num_samples for sh in m.shards]
                for w in range(n):
                    shares[w].append(P.deal(rest, counts, ds.rank * n + w, total))
            self.plans = [P.freeze_plan({"tag": tag, "parts": shares[w], "batches": None}) for w in range(n)]
        mine = [s for r, s in enumerate(states) if r % ds.world_size == ds.rank]
        carried: Counter = Counter()
        for s in mine:
            for c in s["counts"]:
                carried.update(c)
        self.raw[0], self.worker_counts[0] = sum(sum(s["raw"]) for s in mine), dict(carried)
        self.batches = -(-sum(s["batches"] for s in states) // ds.world_size)

    def _record(self, item: dict) -> bool:
        """Advance the position past one worker item; True if it was a tail (no batch to yield)."""
        w, raw, counts, tail, pos = (item.pop(k) for k in ("__worker__", "__raw__", "__counts__", "__tail__",
                                                           "__pos__"))
        self.raw[w], self.worker_counts[w], self.positions[w] = raw, counts, pos
        self.next_worker = (w + 1) % self.num_logical  # a tail takes its turn in the round-robin too
        if not tail:
            self.worker_batches[w] += 1
            self.batches += 1
        return tail

    def _share(self) -> int:
        """Raw samples of this epoch's deal for the one worker of ``num_workers=0``, by the manifests."""
        ds = self.dataset
        return sum(max(0, (p[2] if p[2] >= 0 else m.shards[p[0]].num_samples) - p[1])
                   for s, m in enumerate(ds.sources) for p in ds._deal(s, ds.rank, ds.world_size))

    def _snapshot(self) -> tuple:
        return (list(self.raw), list(self.worker_batches), list(self.worker_counts), list(self.positions),
                self.next_worker, self.batches)

    def _restore(self, snap: tuple) -> None:
        raw, wb, counts, positions, self.next_worker, self.batches = snap
        self.raw, self.worker_batches, self.worker_counts, self.positions = raw, wb, counts, positions

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds.resume = {w: p for w, p in enumerate(self.positions) if p is not None}
        ds.plans = {w: p for w, p in enumerate(self.plans) if p is not None}
        ds.raw0 = dict(enumerate(self.raw))
        ds.counts0 = dict(enumerate(self.worker_counts))
        ds.emitted0 = dict(enumerate(self.worker_batches))
        ds.rotation = self.next_worker
        # A worker still looking for a sample never gets back to torch's loop, where it would notice a
        # shutdown (torch then waits 5 s per worker before killing it): this event ends it at once.
        ds.stop_event = multiprocessing.get_context().Event() if self.cfg.num_workers else None
        loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=self.cfg.num_workers,
                            worker_init_fn=_worker_init if self.cfg.num_workers else None,
                            persistent_workers=False, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if self.cfg.num_workers else None)
        items = iter(loader)
        # A finite epoch: before a batch is handed on, the tails right behind it are recorded (looking one item
        # ahead, held unrecorded), so that once the consumer holds the epoch's last batch every count is in,
        # even if it never asks again. With workers the next item is usually prefetched already; in the main
        # process only when at most a batch of the share is left (a resumed loader still reads only its buffer
        # and the next batch). Never in resampled mode: a stream that keeps looking must hand on what it has.
        cfg = self.cfg
        share = None if cfg.resampled or cfg.num_workers or self.plans[0] is not None else self._share()

        def ahead() -> bool:
            if cfg.resampled:
                return False
            return bool(cfg.num_workers) or share is not None and share - self.raw[0] <= cfg.batch_size

        held = None
        try:
            while True:
                if held is None:  # an exception while waiting here leaves the position untouched
                    item = next(items, None)
                    if item is None:
                        break
                else:
                    item, held = held, None
                before = self._snapshot()
                try:
                    if self._record(item):
                        continue
                    while ahead():
                        nxt = next(items, None)
                        if nxt is None:
                            break
                        if not nxt["__tail__"]:
                            held = nxt
                            break
                        self._record(nxt)
                except BaseException:  # interrupted: this batch (and the tails after it) never reach the consumer
                    self._restore(before)
                    raise
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
