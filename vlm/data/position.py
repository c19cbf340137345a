"""Stream positions: where a loader worker is, precisely enough to continue without replaying, and the
redeal of an epoch's remainder onto another world size or worker count.

A worker's pipeline (vlm.data.shards.ShardStream) is, per source, a *reader*, then a *mixer* of the
sources, then a *shuffle buffer*. Each piece says where it is in a few numbers (``state()``), taken at
every batch the worker yields and recorded by the consumer (ShardLoader) for the batches it hands on:

* an epoch reader walks a list of *parts* ``(shard, start, stop, off, pos0, quiet)``: the samples at
  positions ``[start, stop)`` of a shard (``stop`` -1: to the shard's end), read by walking from byte
  ``off`` where position ``pos0`` begins (0, 0: the shard's start); ``quiet`` parts hold samples read
  (and their problems counted) before, so a re-read counts nothing. Its state is ``[i, off, pos]``:
  part ``i`` goes on at byte ``off``, the first header of the sample at position ``pos`` (``off`` -1:
  part ``i`` from its own beginning). A shard's position is its count of consecutive key groups, as
  the manifest counts them;
* a resampled reader: its RNG state, the shard it is in and the same ``(off, pos)`` cursor;
* the mixer: its RNG state and the sources not yet exhausted;
* the buffer: its RNG state and its samples as references ``(source, shard, off, pos)``, re-read by
  seeking on resume (never their bytes).

RNG states are those of Python's ``random.Random`` (Mersenne Twister, 625 words, about 3.4 kB of
base64 each), so the stream is drawn exactly as before positions existed (positions of the old
format, raw counts, still replay exactly) and the order of an epoch does not depend on whether it was
ever interrupted.

What is guaranteed (ShardLoader.load_state_dict / load_state_dicts):

* same world size, num_workers and shuffle_buffer: the batches after the resume are those of an
  uninterrupted run, skip counts included; resuming reads the buffered samples and the next batch's,
  never the samples before the position, so its cost does not grow with the position. Seed, sources
  (their manifests), shuffle_shards and resampled must be the same (PositionError otherwise);
* another world size or num_workers, without resampled: the epoch's remainder (every old worker's
  buffered samples, the rest of the shard part it was in, its parts not begun) is split among the new
  global workers as a fresh epoch is, so every sample of the epoch reaches the model exactly once,
  before or after (or is skipped and counted once, or dropped with a worker's last partial batch under
  drop_last, as in any epoch). A new share that begins inside a shard part walks that part's headers
  from the part's start (no data copied): at most one shard's headers;
* another world size or num_workers, resampled: fresh streams seeded by the saved positions, drawn
  as any stream is (no sample or source favoured); samples_per_epoch counts the samples consumed.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import struct
from array import array
from collections import Counter
from typing import Any, Callable, Iterator, Optional

from vlm.data.schema import split_member_name
from vlm.data.tario import NOT_A_FILE, TruncatedTar, iter_entries, open_tar

log = logging.getLogger(__name__)

VERSION = 2  # of the per-rank position written by ShardLoader.state_dict (1: raw counts, replayed)
REF = 4  # ints per buffered reference: source, shard, byte offset, position


class PositionError(ValueError):
    """A saved data position that cannot be resumed here; the message says why and what to do."""


# ------------------------------------------------------------------------------------------
# Reading samples from a byte offset


def raw_samples(path, counts: Counter, start: int = 0, stop: Optional[int] = None, off: int = 0,
                pos0: int = 0) -> Iterator[tuple[str, dict[str, bytes], int, int, Optional[int]]]:
    """Group a tar's consecutive members into samples ``(key, {ext: bytes}, pos, at, nxt)``, counting what
    is wrong.

    ``path``: the shard's path, or its map from ``open_tar``. Reading starts at byte ``off``, the first
    header of the sample at position ``pos0`` (0, 0: the shard's start). Only the samples at positions
    ``[start, stop)`` (``stop`` None: to the end) are yielded; the members of the others are walked past
    without copying their data. What is wrong is counted only by the reader that owns the position it
    happens at, so readers sharing a shard count each problem once. ``pos`` is the sample's position,
    ``at`` the byte offset of its first header, ``nxt`` that of the member that began the next sample
    (None: the shard ended or broke after it). A sample is yielded once a member of another key begins,
    so a truncated tar loses only the sample it broke inside, never a complete one: a break (a cut or a
    malformed header, counted once under its ``reason``: truncated_tar, bad_tar_header; vlm.data.tario)
    keeps the sample in progress when the broken header names a member of another sample. Members with
    unsafe names and members that are not files (links, devices) are left out and counted
    (``unsafe_member_name``, ``non_file_member``), as an unreadable shard is (``truncated_tar``).
    """
    key, parts, index, at = None, {}, pos0 - 1, off  # index: position of sample ``key``

    def owned(i: int) -> bool:
        return i >= start and (stop is None or i < stop)

    def want(name: str) -> bool:  # does this member belong to a sample we keep? (asked before copying it)
        split = split_member_name(name)
        return split is not None and owned(index if split[0] == key else index + 1)

    try:
        for moff, name, data in iter_entries(path, want if start > pos0 or stop is not None else None, off):
            split = split_member_name(name)
            if split is None or data is NOT_A_FILE:
                if owned(max(index, 0)):
                    counts["unsafe_member_name" if split is None else "non_file_member"] += 1
                continue
            k, ext = split
            if k != key:
                if parts:
                    yield key, parts, index, at, moff
                key, parts, index, at = k, {}, index + 1, moff
                if stop is not None and index >= stop:
                    return
            if data is not None and owned(index):
                parts[ext] = data
    except (TruncatedTar, OSError) as exn:
        cut = split_member_name(exn.member) if getattr(exn, "member", None) else None
        # the break came in the next sample (or at a member boundary, keep): the one in progress is kept
        in_next = getattr(exn, "keep", False) or (cut is not None and cut[0] != key)
        if owned(index + 1 if in_next else max(index, 0)):
            counts[getattr(exn, "reason", "truncated_tar")] += 1
            log.warning("shard %s is truncated or corrupt (%s); the rest of it is skipped", path, exn)
        if parts and in_next:
            yield key, parts, index, at, None
        return
    if parts:
        yield key, parts, index, at, None


def read_refs(paths: list[list[str]], refs: list[tuple[int, int, int, int]]) -> list[tuple]:
    """Re-read buffered samples by seeking to them: items ``(src, key, parts, ref)`` in the order of ``refs``.
    Each shard is mapped once; nothing is counted (the samples were counted when first read)."""
    by_shard: dict[tuple[int, int], list[int]] = {}
    for i, ref in enumerate(refs):
        by_shard.setdefault((ref[0], ref[1]), []).append(i)
    out: list = [None] * len(refs)
    for (src, shard), idx in by_shard.items():
        path = paths[src][shard]
        try:
            mm = open_tar(path)
        except (TruncatedTar, OSError) as e:
            raise PositionError(f"data position: cannot re-read the buffered samples of {path}: {e}") from None
        with mm:
            for i in sorted(idx, key=lambda i: refs[i][2]):  # in file order
                _, _, at, pos = refs[i]
                got = next(raw_samples(mm, Counter(), pos, pos + 1, at, pos), None)
                if got is None:
                    raise PositionError(f"data position: {path} holds no sample at byte {at} any more (position "
                                        f"{pos}); were the shards rewritten after the checkpoint?")
                out[i] = (src, got[0], got[1], tuple(refs[i]))
    return out


# ------------------------------------------------------------------------------------------
# The pipeline's pieces, each able to say where it is


class ShareReader:
    """One worker's parts of one source for one epoch (module docstring), read in order."""

    def __init__(self, src: int, paths: list[str], parts: list, counts: Counter, state=None):
        self.src, self.paths, self.parts, self.counts = src, paths, [tuple(p) for p in parts], counts
        self.i, self.off, self.pos = state if state is not None else (0, -1, 0)

    def state(self) -> list:
        return [self.i, self.off, self.pos]

    def __iter__(self) -> Iterator[tuple]:
        quiet = Counter()  # re-reads of samples counted before
        while self.i < len(self.parts):
            i = self.i
            shard, start, stop, off, pos0, q = self.parts[i]
            if self.off >= 0:
                off, pos0, start = self.off, self.pos, max(start, self.pos)
            end = None if stop < 0 else stop
            got = False
            for key, data, pos, at, nxt in raw_samples(self.paths[shard], quiet if q else self.counts,
                                                       start, end, off, pos0):
                got = True
                if nxt is None or (end is not None and pos + 1 >= end):
                    self.i, self.off, self.pos = i + 1, -1, 0  # set before the yield: a snapshot then is exact
                else:
                    self.off, self.pos = nxt, pos + 1
                yield self.src, key, data, (self.src, shard, at, pos)
            if q and not got:
                raise PositionError(f"data position: {self.paths[shard]} holds no sample at byte {off} any more "
                                    f"(position {pos0}); were the shards rewritten after the checkpoint?")
            if self.i == i:
                self.i, self.off, self.pos = i + 1, -1, 0


class ResampleReader:
    """Resampled mode: whole shards of one source drawn with replacement, forever. ``fail(n)`` builds the
    error raised when none of the ``n`` shards holds a readable sample (drawing on would spin)."""

    def __init__(self, src: int, paths: list[str], rng: random.Random, counts: Counter,
                 fail: Callable[[int], Exception], state=None):
        self.src, self.paths, self.rng, self.counts, self.fail = src, paths, rng, counts, fail
        self.cur: Optional[tuple[int, int, int]] = None  # (shard, off, pos) being read
        self.empty: set[int] = set()  # shards that held no readable sample (reading is deterministic)
        if state is not None:
            rng.setstate(state[0])
            self.cur = tuple(state[1]) if state[1] is not None else None
            self.empty = set(state[2])

    def state(self) -> list:
        return [self.rng.getstate(), self.cur, sorted(self.empty)]

    def __iter__(self) -> Iterator[tuple]:
        n = len(self.paths)
        while n:
            got = self.cur is not None  # resumed inside a shard: it held samples already
            if self.cur is None:
                self.cur = (self.rng.choice(range(n)), 0, 0)  # the same draw as choice(paths)
            shard, off, pos0 = self.cur
            for key, data, pos, at, nxt in raw_samples(self.paths[shard], self.counts, pos0, None, off, pos0):
                got = True
                self.cur = None if nxt is None else (shard, nxt, pos + 1)
                yield self.src, key, data, (self.src, shard, at, pos)
            self.cur = None
            if not got:
                self.empty.add(shard)
                if len(self.empty) == n:
                    raise self.fail(n)


class Mixer:
    """Sources interleaved by weight, sample by sample, until every one is exhausted."""

    def __init__(self, readers: list, weights: list[float], rng: random.Random, state=None):
        self.readers, self.weights, self.rng = readers, weights, rng
        self.live = list(range(len(readers)))
        if state is not None:
            rng.setstate(state[0])
            self.live = list(state[1])

    def state(self) -> Optional[list]:
        return None if len(self.readers) == 1 else [self.rng.getstate(), list(self.live)]

    def __iter__(self) -> Iterator[tuple]:
        iters = [iter(r) for r in self.readers]
        if len(iters) == 1:
            yield from iters[0]
            return
        while self.live:
            i = self.rng.choices(self.live, weights=[self.weights[j] for j in self.live])[0]
            try:
                item = next(iters[i])
            except StopIteration:
                self.live.remove(i)
                continue
            yield item


class ShuffleBuffer:
    """``size`` raw samples reordered at random; the samples' references are kept beside them (an int64
    array, 4 per sample) so that a snapshot is one copy, not a walk over the buffer."""

    def __init__(self, size: int, rng: random.Random, paths: list[list[str]], state=None):
        self.size, self.rng = size, rng
        self.items: list = []
        self.refs = array("q")
        self.drain, self.k = False, 0  # draining: the input is exhausted, items[k:] remain
        if state is not None and size > 1:
            rng_state, self.drain, raw = state
            if rng_state is not None:
                rng.setstate(rng_state)
            flat = array("q")
            flat.frombytes(raw)
            refs = [tuple(flat[i:i + REF]) for i in range(0, len(flat), REF)]
            self.items, self.refs = read_refs(paths, refs), flat

    def state(self) -> Optional[list]:
        if self.size <= 1:
            return None
        return [None if self.drain else self.rng.getstate(), self.drain, self.refs[REF * self.k:].tobytes()]

    def shuffled(self, it: Iterator[tuple]) -> Iterator[tuple]:
        size = self.size
        if size <= 1:
            yield from it
            return
        buf, refs, rng = self.items, self.refs, self.rng
        if not self.drain:
            for item in it:
                if len(buf) < size:
                    buf.append(item)
                    refs.extend(item[3])
                    continue
                j = rng.randrange(size)
                buf[j], item = item, buf[j]
                refs[REF * j:REF * j + REF] = array("q", buf[j][3])
                yield item
            rng.shuffle(buf)
            self.refs = array("q", [x for b in buf for x in b[3]])
            self.drain = True
        while self.k < len(buf):
            item, buf[self.k] = buf[self.k], None
            self.k += 1
            yield item


# ------------------------------------------------------------------------------------------
# JSON forms (the worker sends plain tuples; the consumer writes these only when asked for a state)


def rng_to_json(state) -> str:
    version, words, gauss = state
    if version != 3 or gauss is not None or len(words) != 625:
        raise ValueError(f"unexpected random.Random state (version {version}, {len(words)} words)")
    return base64.b64encode(struct.pack("<625I", *words)).decode()


def rng_from_json(text: str):
    return 3, struct.unpack("<625I", base64.b64decode(text)), None


def position_to_json(pos: Optional[dict]) -> Optional[dict]:
    """A worker's raw snapshot -> its JSON form (None: the worker has not started its share)."""
    if pos is None or "replay" in pos:
        return pos
    readers = []
    for r in pos["readers"]:
        if len(r) == 3 and isinstance(r[0], tuple):  # resampled: [rng state, cursor, empty]
            readers.append({"rng": rng_to_json(r[0]), "cur": list(r[1]) if r[1] else None, "empty": list(r[2])})
        else:
            readers.append(list(r))
    mix = pos["mix"] and {"rng": rng_to_json(pos["mix"][0]), "live": list(pos["mix"][1])}
    buf = pos["buffer"]
    if buf is not None:
        flat = array("q")
        flat.frombytes(buf[2])
        flat = flat.tolist()
        buf = {"rng": buf[0] and rng_to_json(buf[0]), "drain": buf[1],
               "refs": tuple(tuple(flat[i:i + REF]) for i in range(0, len(flat), REF))}
    return {"readers": readers, "mix": mix, "buffer": buf}


def thaw(obj: Any) -> Any:
    """A copy of a JSON form's dicts and lists; tuples (immutable: buffered references, plan parts) are
    shared, so that a position converted once can be handed out many times cheaply and safely."""
    if isinstance(obj, dict):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [thaw(v) for v in obj]
    return obj


def freeze_plan(plan: Optional[dict]) -> Optional[dict]:
    """A worker's share after a redeal ``{"tag", "parts": per source a list of parts, "batches"}``, its
    parts as tuples."""
    if plan is None:
        return None
    parts = plan["parts"] and [tuple(tuple(int(x) for x in p) for p in src) for src in plan["parts"]]
    return {"tag": str(plan["tag"]), "parts": parts, "batches": plan["batches"]}


def position_from_json(js: Optional[dict]) -> Optional[dict]:
    if js is None or "replay" in js:
        return js
    readers = []
    for r in js["readers"]:
        if isinstance(r, dict):
            readers.append([rng_from_json(r["rng"]), tuple(r["cur"]) if r["cur"] else None, list(r["empty"])])
        else:
            readers.append(list(r))
    mix = js["mix"] and [rng_from_json(js["mix"]["rng"]), list(js["mix"]["live"])]
    buf = js["buffer"]
    if buf is not None:
        refs = [int(x) for ref in buf["refs"] for x in ref]
        buf = [buf["rng"] and rng_from_json(buf["rng"]), bool(buf["drain"]), array("q", refs).tobytes()]
    return {"readers": readers, "mix": mix, "buffer": buf}


def buffered_refs(js: Optional[dict]) -> list[list[int]]:
    """The references a worker's (JSON) position holds in its buffer, in buffer order."""
    return [] if js is None or js.get("buffer") is None else [list(r) for r in js["buffer"]["refs"]]


def fingerprint(manifest) -> str:
    """What a position's byte offsets depend on: a source's shards, their order, counts and sizes."""
    text = json.dumps([[s.name, s.num_samples, s.bytes] for s in manifest.shards]).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


# ------------------------------------------------------------------------------------------
# The remainder of an epoch, and its redeal


def remainder(parts: list, reader: Optional[list], refs: list[list[int]]) -> list[tuple]:
    """What one worker has left of one source: its buffered samples (one quiet part each, in buffer
    order), then the rest of the part it is in, then its parts not begun."""
    out = [(shard, pos, pos + 1, at, pos, 1) for _, shard, at, pos in refs]
    i, off, pos = reader if reader is not None else (0, -1, 0)
    if i < len(parts):
        shard, start, stop, poff, ppos, q = parts[i]
        out.append((shard, max(start, pos), stop, off, pos, q) if off >= 0 else tuple(parts[i]))
        out.extend(tuple(p) for p in parts[i + 1:])
    return out


def deal(parts: list[tuple], shard_counts: list[int], gw: int, total: int) -> list[tuple]:
    """Global worker ``gw`` of ``total``'s contiguous share ``[gw * N // total, (gw + 1) * N // total)`` of
    the positions of ``parts`` (``N``: their sizes by the manifest), parts cut at the share's bounds. A cut
    part keeps its walking origin (the part after the cut walks past the positions before it, headers
    only). A part of size 0 by the manifest (one whose shard may hold more than its count says) goes to
    the owner of the position it sits at, as in a fresh epoch, so that nothing is lost."""

    def size(p):
        return max(0, (p[2] if p[2] >= 0 else shard_counts[p[0]]) - p[1])

    n = sum(size(p) for p in parts)
    lo, hi = gw * n // total, (gw + 1) * n // total
    out, base = [], 0
    for p in parts:
        c = size(p)
        if c == 0:
            if (lo <= min(base, n - 1) < hi) if n else gw == 0:
                out.append(p)
            continue
        a, b = max(lo, base), min(hi, base + c)
        if a < b:
            shard, start, stop, off, pos0, q = p
            out.append((shard, start + a - base, stop if b == base + c else start + b - base, off, pos0, q))
        base += c
    return out
