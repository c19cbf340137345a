"""Fuzz: seeded random mutations of real shards (data_prep's writer, with short keys and with PAX names; a GNU
long-name shard as tarfile writes it), each read by the real reader path, must end within a time bound with
counts that add up.

Mutations: byte flips (mostly in headers), cuts, inserted and deleted blocks, crafted PAX headers (record
soup: lengths 0, negative, huge, not numbers, missing spaces and newlines, random bytes), header fields
overwritten with garbage under a recomputed checksum (so the garbage gets past the checksum). For each
mutated shard (beside a clean one):

* the direct walk (vlm.data.position.raw_samples, what data_prep.inspect and every loader worker run) ends
  within the bound, raises nothing, and breaks at most once (truncated_tar + bad_tar_header <= 1);
* ``ShardLoader`` with 0 workers ends within the bound, raises nothing, and its counts add up exactly: raw
  samples read = the walk's samples + the clean shard's; its tar counts = the walk's; yielded + per-sample
  skips = raw samples read; every key yielded is one the walk found;
* a handful are read again with 2 workers, and with 2 ranks: the same keys and the same counts.

A last loop feeds the tar reader random headers with valid checksums (random sizes, types, PAX bodies):
every walk ends, with members or a TruncatedTar / BadTarHeader, never another exception.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_prep.writer import ShardWriter
from vlm.data.position import raw_samples
from vlm.data.schema import Manifest, ShardInfo, sha256_file
from vlm.data.shards import DataConfig, DataStreamError, ShardLoader, SourceConfig
from vlm.data.tario import TruncatedTar, iter_entries
from vlm.data.transforms import ImageConfig

from .test_hostile_shards import END, bounded, header, pad, pax, record, sample

DEADLINE = 10.0  # seconds for one read (a healthy one: milliseconds)
N = 20  # mutations per (format, kind): 3 x 6 x 20 = 360 shards
TAR_REASONS = ("unsafe_member_name", "non_file_member", "truncated_tar", "bad_tar_header")
CLEAN = sample("t0000") + sample("t0001") + END


def png(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("L", (8, 8), bytes(rng.randrange(256) for _ in range(64))).save(buf, format="PNG")
    return buf.getvalue()


def members(rng: random.Random, i: int) -> dict[str, bytes]:
    return {"json": json.dumps({"source": "fuzz", "modality": "ct", "split": "train", "i": i}).encode(),
            "png": png(rng), "txt": f"caption {i} ".encode() * rng.randint(1, 60)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, bytes]:
    """Three real shards of 10 samples: data_prep's writer with short keys (plain ustar headers) and with keys
    over 100 characters (a PAX header before every member), and a GNU long-name shard (tarfile, in the
    writer's member order)."""
    rng, out = random.Random(7), {}
    for name, prefix in (("ustar", "f"), ("pax", "k" * 110)):
        folder = tmp_path_factory.mktemp("fuzz-base") / name
        folder.mkdir()
        w = ShardWriter(folder, shard_size=100)
        for i in range(10):
            w.write(f"{prefix}{i:04d}", members(rng, i))
        w.finish({})
        out[name] = (folder / "shard-000000.tar").read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(10):
            for ext, data in sorted(members(rng, i).items(), key=lambda kv: (kv[0] != "json", kv[0])):
                info = tarfile.TarInfo(f"{'deep/' * 22}f{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out["gnu"] = buf.getvalue()
    assert out["pax"].count(b"././@PaxHeader") == 30 and out["gnu"].count(b"././@LongLink") == 30
    return out


def header_offsets(data: bytes) -> list[int]:
    """Every header's offset in a valid tar (extended headers included)."""
    offs, off = [], 0
    while off + 512 <= len(data) and data[off:off + 512] != b"\x00" * 512:
        offs.append(off)
        size = int(data[off + 124:off + 136].split(b"\x00")[0].strip() or b"0", 8)
        off += 512 + (size + 511) // 512 * 512
    return offs


# --- mutations: each returns the mutated bytes and what it did (for a failure message) ---------------------


def soup(rng: random.Random) -> bytes:
    """PAX records, well-formed or not."""
    pieces = []
    for _ in range(rng.randint(1, 4)):
        value = rng.choice([b"f0003.json", b"../x.png", bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))])
        pieces.append(rng.choice([
            lambda: record(rng.choice([b"path", b"size", b"mtime", b"comment", b"linkpath"]), value),
            lambda: record(b"size", str(rng.choice([0, 1, 511, 10**9, 2**70])).encode()),
            lambda: b"%d path=%s\n" % (rng.choice([0, 1, 2, 3, 5, -1, -20, 99, 10**6]), value),
            lambda: b"%s path=%s\n" % (rng.choice([b"abc", b"", b"1e3", b"0x10", b"+7", b" 9"]), value),
            lambda: b"12path=%s\n" % value,
            lambda: record(b"path", value)[:-1],
            lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))),
            lambda: b"\x00" * rng.randint(1, 30),
        ])())
    return b"".join(pieces)


def garbage_field(rng: random.Random, width: int) -> bytes:
    value = rng.choice([
        b"-1000", b"-1", b"77777777777", b"99999999999", b"+17", b"0_17", b" ", b"", b"\xff" * width,
        b"\x80" + rng.randbytes(width - 1), b"\x81" + rng.randbytes(width - 1), b"%o" % rng.randrange(8 ** 8),
        rng.randbytes(width), b"%d" % rng.randrange(10 ** 6),
    ])
    return value.ljust(width, b"\x00")[:width]


def rechecksum(d: bytearray, off: int) -> None:
    d[off + 148:off + 156] = b" " * 8
    d[off + 148:off + 156] = b"%06o\x00 " % sum(d[off:off + 512])


def mutate(kind: str, rng: random.Random, data: bytes, heads: list[int]) -> tuple[bytes, str]:
    d = bytearray(data)
    if kind == "flip":
        spots = []
        for _ in range(rng.randint(1, 8)):
            pos = rng.choice(heads) + rng.randrange(512) if rng.random() < 0.7 else rng.randrange(len(d))
            d[pos] = rng.randrange(256) if rng.random() < 0.5 else d[pos] ^ (1 << rng.randrange(8))
            spots.append(pos)
        return bytes(d), f"bytes changed at {spots}"
    if kind == "cut":
        at = rng.randrange(len(d)) if rng.random() < 0.6 else rng.randrange(len(d) // 512) * 512
        return bytes(d[:at]), f"cut at {at}"
    if kind == "insert":
        at = rng.choice(heads) if rng.random() < 0.7 else rng.randrange(len(d) // 512) * 512
        blob = rng.choice([b"\x00" * 512, rng.randbytes(512), bytes(d[rng.choice(heads):][:512]),
                           header("f0009.png", rng.randrange(10 ** 6)), bytes(rng.randbytes(rng.randint(1, 600)))])
        return bytes(d[:at]) + blob + bytes(d[at:]), f"{len(blob)} bytes inserted at {at}"
    if kind == "delete":
        at = rng.choice(heads) if rng.random() < 0.7 else rng.randrange(len(d))
        n = 512 * rng.randint(1, 3) if rng.random() < 0.6 else rng.randint(1, 700)
        return bytes(d[:at]) + bytes(d[at + n:]), f"{n} bytes deleted at {at}"
    if kind == "pax":
        at, body = rng.choice(heads), soup(rng)
        size = len(body) if rng.random() < 0.8 else rng.choice([0, len(body) + 512, 2 ** 21])
        return bytes(d[:at]) + pax(body, size) + bytes(d[at:]), f"PAX header {body!r} (size {size}) at {at}"
    if kind == "field":
        at = rng.choice(heads)
        what = rng.choice(["size", "chksum", "typ", "name", "prefix", "magic"])
        span = {"size": (124, 12), "chksum": (148, 8), "typ": (156, 1), "name": (0, 100), "prefix": (345, 155),
                "magic": (257, 8)}[what]
        if what == "typ":
            value = rng.choice([b"1", b"2", b"3", b"5", b"6", b"7", b"K", b"L", b"g", b"x", b"S", b"Z", b"\x00"])
        elif what in ("name", "prefix"):
            value = rng.choice([b"../../etc/passwd", b"/abs/x.png", b"f0001.png", rng.randbytes(span[1]), b""])
        else:
            value = garbage_field(rng, span[1])
        d[at + span[0]:at + span[0] + span[1]] = value.ljust(span[1], b"\x00")[:span[1]]
        if what != "chksum":
            rechecksum(d, at)
        return bytes(d), f"{what} of the header at {at} set to {value!r}"
    raise ValueError(kind)


# --- one mutated shard, read every way -------------------------------------------------------------------------


def write(folder: Path, data: bytes) -> None:
    folder.mkdir(exist_ok=True)
    infos = []
    for i, blob in enumerate((data, CLEAN)):
        p = folder / f"shard-{i:06d}.tar"
        p.write_bytes(blob)
        infos.append(ShardInfo(p.name, 10 if i == 0 else 2, len(blob), sha256_file(p)))
    Manifest(folder, 12, infos).write()


def walk(path: Path) -> tuple[list[str], Counter]:
    counts: Counter = Counter()
    return [key for key, *_ in raw_samples(str(path), counts)], counts


def load(folder: Path, workers: int = 0, rank: int = 0, world: int = 1) -> tuple[list[str], dict, int]:
    cfg = DataConfig(sources=[SourceConfig(str(folder))], batch_size=4, num_workers=workers, shuffle_buffer=8,
                     image=ImageConfig(size=16, max_pixels=1_000_000))
    loader = ShardLoader(cfg, rank=rank, world_size=world)
    got: list[str] = []
    try:
        for batch in loader:
            got += batch["keys"]
    except DataStreamError as e:  # a rank whose share held nothing usable: the designed, counted error
        assert world > 1 and not got and "found no usable sample" in str(e), str(e)
    return got, loader.skipped, sum(loader.raw)


def check(folder: Path, data: bytes, what: str, workers: bool) -> None:
    write(folder, data)
    (found, tar_counts), _ = bounded(lambda: walk(folder / "shard-000000.tar"), f"walk of {what}", DEADLINE)
    assert tar_counts["truncated_tar"] + tar_counts["bad_tar_header"] <= 1, what
    (got, skipped, raw), _ = bounded(lambda: load(folder), f"loader (0 workers) on {what}", DEADLINE)
    assert raw == len(found) + 2, what
    assert {k: v for k, v in skipped.items() if k in TAR_REASONS} == +tar_counts, what
    per_sample = sum(v for k, v in skipped.items() if k not in TAR_REASONS)
    assert len(got) + per_sample == raw, what
    assert Counter(got) <= Counter(found + ["t0000", "t0001"]), what
    if workers:
        (got2, skipped2, raw2), _ = bounded(lambda: load(folder, workers=2), f"loader (2 workers) on {what}", DEADLINE)
        assert (sorted(got2), skipped2, raw2) == (sorted(got), skipped, raw), what
        total, keys, raws = Counter(), [], 0
        for r in range(2):
            (g, s, n), _ = bounded(lambda: load(folder, rank=r, world=2), f"rank {r} of 2 on {what}", DEADLINE)
            keys, raws = keys + g, raws + n
            total.update(s)
        assert (sorted(keys), dict(total), raws) == (sorted(got), skipped, raw), what


KINDS = ["flip", "cut", "insert", "delete", "pax", "field"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["ustar", "pax", "gnu"])
def test_mutated_shards_end_with_counts_that_add_up(tmp_path, drill, bases, fmt, kind):
    seed = 1000 * KINDS.index(kind) + {"ustar": 1, "pax": 2, "gnu": 3}[fmt]
    rng, base = random.Random(seed), bases[fmt]
    heads = header_offsets(base)
    t0 = time.monotonic()
    with drill.input(f"fuzz: {N} {kind} mutations of a {fmt} shard (seed {seed})"):
        for i in range(N):
            data, what = mutate(kind, rng, base, heads)
            check(tmp_path / "f", data, f"seed {seed} mutation {i} ({what})", workers=fmt == "ustar" and i < 2)
        assert time.monotonic() - t0 < 60  # the whole loop; each read has its own bound above


def random_archive(rng: random.Random) -> bytes:
    """1-6 headers with valid checksums and random fields, random data, maybe PAX soup; maybe no end."""
    out = b""
    for _ in range(rng.randint(1, 6)):
        typ = rng.choice([b"0", b"\x00", b"7", b"1", b"2", b"5", b"K", b"L", b"g", b"x", b"S", b"Z"])
        body = soup(rng) if typ in (b"x", b"g") else rng.randbytes(rng.randint(0, 1200))
        size_field = rng.choice([None, None, garbage_field(rng, 12)])
        h = bytearray(header(rng.choice(["a.png", "a.txt", "../b.png", "c/d.json", ""]), len(body), typ,
                             size_field=size_field, prefix=rng.choice([b"", b"p", b"../.."])))
        if rng.random() < 0.2:
            h[rng.randrange(512)] = rng.randrange(256)
            rechecksum(h, 0)
        out += bytes(h) + (pad(body) if rng.random() < 0.8 else body)
    return out + rng.choice([END, b"", b"\x00" * 300])


def test_random_headers_never_hang_the_reader(tmp_path, drill):
    rng = random.Random(12)
    p = tmp_path / "r.tar"
    with drill.input("fuzz: 400 archives of random headers with valid checksums (seed 12)"):
        outcomes: Counter = Counter()
        for i in range(400):
            p.write_bytes(random_archive(rng))

            def run():
                try:
                    return "members", len(list(iter_entries(str(p))))
                except TruncatedTar as e:  # or its subclass BadTarHeader
                    return type(e).__name__, 0

            (outcome, _), _ = bounded(run, f"random archive {i}", DEADLINE)
            outcomes[outcome] += 1
        assert sum(outcomes.values()) == 400 and set(outcomes) <= {"members", "TruncatedTar", "BadTarHeader"}
        assert min(outcomes.values()) > 20  # all three outcomes are exercised
