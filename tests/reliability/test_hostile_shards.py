"""Hostile shards: every malformed form a tar can take, read by the real loader (vlm.data.shards.ShardLoader)
with 0 and 2 workers, each asserting the exact samples yielded and the exact skips by reason, within a
time bound (a reader that stops advancing fails its case instead of hanging the suite).

Each shard is written byte by byte (``header``), so any field can be wrong: traversal names, links,
huge and negative sizes, cuts at several points, zero bytes, a decompression bomb, every malformed PAX
record, bad header checksums, bad image / text / json. The base shard holds samples s0000..s0005
(members json, png, txt as data_prep's writer orders them); every folder also holds a clean shard (t0000,
t0001), as a real corpus would. ``python -m data_prep.stream`` and ``python -m data_prep.inspect`` on
hostile folders end with their counts too.
"""
from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml
from PIL import Image

from vlm.data.schema import Manifest, ShardInfo, sha256_file
from vlm.data.shards import DataConfig, DataStreamError, ShardLoader, SourceConfig
from vlm.data.transforms import ImageConfig

DEADLINE = 30.0  # seconds for one read; a healthy one takes well under a second
MAX_META = 1 << 20  # vlm.data.tario.MAX_META: the largest PAX or GNU long-name header read


def bounded(fn: Callable, what: str, seconds: float = DEADLINE):
    """``fn()`` in a thread: its result, its exception re-raised, or a failure if it does not end in time."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            out["error"] = e

    t = threading.Thread(target=run, name=f"bounded {what}", daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"{what}: did not end within {seconds:.0f} s (a reader that does not advance)")
    if "error" in out:
        raise out["error"]
    return out["value"], time.monotonic() - t0


# --- tar bytes, header by header ------------------------------------------------------------------------


def header(name, size: int, typ: bytes = b"0", *, size_field: Optional[bytes] = None, prefix: bytes = b"",
           linkname: bytes = b"", chksum: Optional[bytes] = None) -> bytes:
    """One ustar header with a correct checksum unless ``chksum`` (the raw 8-byte field) is given."""
    h = bytearray(512)
    nm = name.encode() if isinstance(name, str) else name
    h[0:len(nm[:100])] = nm[:100]
    h[100:108] = b"0000444\x00"
    h[108:116] = h[116:124] = b"0000000\x00"
    h[124:136] = (size_field if size_field is not None else b"%011o\x00" % size).ljust(12, b"\x00")[:12]
    h[136:148] = b"00000000000\x00"
    h[156:157] = typ
    h[157:157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b" " * 8
    h[148:156] = chksum if chksum is not None else b"%06o\x00 " % sum(h)
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 512)


def member(name, data: bytes = b"", typ: bytes = b"0", **kw) -> bytes:
    return header(name, len(data), typ, **kw) + pad(data)


def pax(records: bytes, size: Optional[int] = None) -> bytes:
    """A PAX extended header holding ``records`` verbatim."""
    return header("././@PaxHeader", len(records) if size is None else size, b"x") + pad(records)


def record(key: bytes, value: bytes) -> bytes:
    """A well-formed PAX record (its length counts itself)."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


END = b"\x00" * 1024


def png(w: int = 8, h: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 90).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A PNG of ``w`` x ``h`` pixels in about 60 bytes: the header says so, the data is one empty row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


PNG = png()
JSON = json.dumps({"source": "hostile", "modality": "ct", "split": "train"}).encode()


def caption(key: str) -> bytes:
    return (f"caption of {key}. " * 60).encode()  # ~1.2 kB: three blocks, so a cut can fall between them


def sample(key: str, **parts) -> bytes:
    """A sample's members in the writer's order (json first); ``parts`` replace or drop (None) members."""
    members = {"json": JSON, "png": PNG, "txt": caption(key)}
    members.update(parts)
    order = sorted(members, key=lambda e: (e != "json", e))
    return b"".join(member(f"{key}.{e}", members[e]) for e in order if members[e] is not None)


def keys(a: int, b: int) -> list[str]:
    return [f"s{i:04d}" for i in range(a, b)]


def body(a: int, b: int) -> bytes:
    return b"".join(sample(k) for k in keys(a, b))


SAMPLE_BYTES = len(sample("s0000"))
ALL = keys(0, 6)
FIRST3 = keys(0, 3)
CLEAN = ["t0000", "t0001"]


def write_folder(folder: Path, shards: list[tuple[bytes, int]]) -> Path:
    """Shards as raw bytes with their manifest counts, plus the clean shard."""
    folder.mkdir(parents=True)
    infos = []
    for i, (data, count) in enumerate(shards + [(sample("t0000") + sample("t0001") + END, 2)]):
        path = folder / f"shard-{i:06d}.tar"
        path.write_bytes(data)
        infos.append(ShardInfo(path.name, count, len(data), sha256_file(path)))
    Manifest(folder, sum(s.num_samples for s in infos), infos).write()
    return folder


def config(folder: Path, workers: int, **kw) -> DataConfig:
    kw.setdefault("image", ImageConfig(size=16, max_pixels=1_000_000))
    return DataConfig(sources=[SourceConfig(str(folder))], batch_size=4, num_workers=workers, **kw)


def read(folder: Path, workers: int, what: str, **kw) -> tuple[list[str], dict, ShardLoader]:
    loader = ShardLoader(config(folder, workers, **kw))
    got, _ = bounded(lambda: [k for batch in loader for k in batch["keys"]], what)
    return got, loader.skipped, loader


# --- the matrix ------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    shard: Callable[[], bytes]  # the hostile shard's bytes (built lazily)
    keys: list[str]  # what the hostile shard yields (the clean shard's always follow)
    skipped: dict  # exact skips by reason
    count: int = 6  # what the manifest says the hostile shard holds
    kind: str = "input"  # drill record: input | hole
    cfg: dict = field(default_factory=dict)


def before3(*chunks: bytes) -> Callable[[], bytes]:
    """Samples 0-2, then ``chunks`` where sample 3 would begin, then samples 3-5 and the end blocks."""
    return lambda: body(0, 3) + b"".join(chunks) + body(3, 6) + END


def broken3(first: bytes) -> Callable[[], bytes]:
    """Samples 0-2, then sample 3 whose first header is ``first`` (broken), then the rest."""
    return lambda: body(0, 3) + first + pad(JSON) + member("s0003.png", PNG) + member("s0003.txt", caption("s0003")) \
        + body(4, 6) + END


def cut(offset: Callable[[bytes], int]) -> Callable[[], bytes]:
    def make() -> bytes:
        full = body(0, 6) + END
        return full[:offset(full)]
    return make


PNG3 = 3 * SAMPLE_BYTES + 512 + len(pad(JSON))  # offset of s0003.png's header
TXT3 = PNG3 + 512 + len(pad(PNG))  # offset of s0003.txt's header
HDR = b"s0003.json"  # the member a broken first header of sample 3 names
BAD_HEADER = {"bad_tar_header": 1}
CUT = {"truncated_tar": 1}
UNSAFE = {"unsafe_member_name": 1}


def pax_case(name: str, records: bytes, size: Optional[int] = None) -> Case:
    """A malformed PAX header right before sample 3's first member: samples 0-2 (complete) are kept."""
    return Case(f"PAX: {name}", before3(pax(records, size)), FIRST3, BAD_HEADER)


CASES = [
    # names that try to leave the shard's namespace: the member is left out and counted, the rest is read
    Case("traversal name ../", before3(member("../evil.png", PNG)), ALL, UNSAFE, kind="hole"),
    Case("traversal name a/../../", before3(member("a/../../evil.png", PNG)), ALL, UNSAFE, kind="hole"),
    Case("absolute name", before3(member("/etc/evil.png", PNG)), ALL, UNSAFE, kind="hole"),
    Case("backslash name", before3(member("..\\evil.png", PNG)), ALL, UNSAFE, kind="hole"),
    Case("ustar prefix ../..", before3(member("evil.png", PNG, prefix=b"../..")), ALL, UNSAFE, kind="hole"),
    Case("GNU long name traversal", before3(member("././@LongLink", b"../" * 40 + b"evil.png\x00", b"L"),
                                            member("evil.png", PNG)), ALL, UNSAFE, kind="hole"),
    Case("PAX path traversal", before3(pax(record(b"path", b"../../evil.png")), member("evil.png", PNG)), ALL,
         UNSAFE, kind="hole"),
    # links and other non-files: never read, counted; their sample then lacks the member
    Case("symlink member", before3(sample("s0100", png=None), member("s0100.png", typ=b"2", linkname=b"/etc/passwd")),
         ALL, {"non_file_member": 1, "missing_image": 1}, count=7, kind="hole"),
    Case("hardlink member", before3(member("s0100.png", typ=b"1", linkname=b"s0000.png"), sample("s0100", png=None)),
         ALL, {"non_file_member": 1, "missing_image": 1}, count=7, kind="hole"),
    Case("device and fifo members", before3(member("dev.png", typ=b"3"), member("fifo.png", typ=b"6")), ALL,
         {"non_file_member": 2}),
    Case("unknown member type", before3(member("odd.png", PNG, typ=b"Z")), ALL, {"non_file_member": 1}),
    # sizes: past the end is a cut; negative or not a number is a bad header (a negative size made the
    # old reader walk backwards forever)
    Case("huge octal size", broken3(header(HDR, 0, size_field=b"77777777777\x00")), FIRST3, CUT),
    Case("huge base-256 size", broken3(header(HDR, 0, size_field=b"\x80" + (1 << 80).to_bytes(11, "big"))),
         FIRST3, CUT),
    Case("negative octal size", broken3(header(HDR, 0, size_field=b"-0000001000\x00")), FIRST3, BAD_HEADER),
    Case("negative base-256 size", broken3(header(HDR, 0, size_field=b"\xff" * 12)), FIRST3, BAD_HEADER),
    Case("signed octal size", broken3(header(HDR, 0, size_field=b"+0000000017\x00")), FIRST3, BAD_HEADER),
    Case("size not octal", broken3(header(HDR, 0, size_field=b"00000000099\x00")), FIRST3, BAD_HEADER),
    Case("size with underscores", broken3(header(HDR, 0, size_field=b"0_0_0_1_7\x00")), FIRST3, BAD_HEADER),
    # cuts: the sample cut is lost (counted once), every complete one before it is kept
    Case("cut inside the first header", cut(lambda full: 300), [], CUT),
    Case("cut inside a header", cut(lambda full: PNG3 + 300), FIRST3, CUT),
    Case("cut inside member data", cut(lambda full: TXT3 + 512 + 100), FIRST3, CUT),
    Case("cut at a block boundary inside data", cut(lambda full: TXT3 + 1024), FIRST3, CUT),
    Case("cut at a sample boundary", cut(lambda full: 4 * SAMPLE_BYTES), keys(0, 4), CUT),
    Case("cut inside the end blocks", cut(lambda full: 6 * SAMPLE_BYTES + 300), ALL, CUT),
    Case("zero-byte shard", lambda: b"", [], CUT),
    Case("zero-byte shard, manifest 0", lambda: b"", [], CUT, count=0),
    # a decompression bomb: a 10^10-pixel PNG in 60 bytes (PIL's own bound), and one above max_pixels
    Case("PNG bomb 100000x100000", before3(sample("s0100", png=bomb_png(100_000, 100_000))), ALL,
         {"image_too_large": 1}, count=7),
    Case("PNG above max_pixels", before3(sample("s0100", png=bomb_png(2000, 2000))), ALL,
         {"image_too_large": 1}, count=7),
    # every malformed PAX record form (the old reader looped forever on length 0, raised on the others)
    pax_case("length 0", b"0 path=s0003.json\n"),
    pax_case("length not a number", b"abc path=s0003.json\n"),
    pax_case("negative length", b"-19 path=s0003.json\n"),
    pax_case("no space after the length", b"19path=s0003.json\n"),
    pax_case("length past the record's end", b"99 path=s0003.json\n"),
    pax_case("length shorter than the record", b"3 path=s0003.json\n"),
    pax_case("no key=value", b"9 pathxy\n"),
    pax_case("no newline", b"19 path=s0003.jsonX"),
    pax_case("path not UTF-8", record(b"path", b"s0003\xff\xfe.json")),
    pax_case("size not a number", record(b"size", b"12x")),
    pax_case("header above MAX_META", record(b"comment", b"x" * (MAX_META + 10))),
    Case("PAX: declared size past the end of the file", before3(pax(record(b"path", b"s0003.json"), size=10**6)),
         keys(0, 2), CUT),
    Case("GNU long name above MAX_META", before3(member("././@LongLink", b"s0003.json".ljust(MAX_META + 10, b"\x00"),
                                                       b"L")), FIRST3, BAD_HEADER),
    # bad header checksums: what was read before is kept; a sample broken inside is lost (counted once)
    Case("bad checksum: first member", lambda: header("s0000.json", len(JSON), chksum=b"0000000\x00") + pad(JSON)
         + body(1, 6) + END, [], BAD_HEADER),
    Case("bad checksum: inside a sample", lambda: body(0, 2) + member("s0002.json", JSON)
         + header("s0002.png", len(PNG), chksum=b"0000001\x00") + pad(PNG) + body(3, 6) + END, keys(0, 2), BAD_HEADER),
    Case("bad checksum: right after a complete sample", broken3(header(HDR, len(JSON), chksum=b"0000001\x00")),
         FIRST3, BAD_HEADER),
    Case("bad checksum: garbled header", broken3(b"\x07" * 512), keys(0, 2), BAD_HEADER),
    Case("checksum not a number", broken3(header(HDR, len(JSON), chksum=b"zzzzzz\x00 ")), FIRST3, BAD_HEADER),
    # bad contents: one skip each, by reason
    Case("bad image bytes", before3(sample("s0100", png=b"\x89PNG\r\n\x1a\n" + b"junk" * 30)), ALL,
         {"bad_image": 1}, count=7),
    Case("truncated image", before3(sample("s0100", png=png(64, 64)[:60])), ALL, {"bad_image": 1}, count=7),
    Case("text not UTF-8", before3(sample("s0100", txt=b"caption \xff\xfe\xfd")), ALL, {"bad_text": 1}, count=7),
    Case("json syntax", before3(sample("s0100", json=b"{not json")), ALL, {"bad_json": 1}, count=7),
    Case("json not an object", before3(sample("s0100", json=b"[1, 2]")), ALL, {"bad_json": 1}, count=7),
    Case("json not UTF-8", before3(sample("s0100", json=b'{"a": "\xff"}')), ALL, {"bad_json": 1}, count=7),
    Case("json nested 100000 deep", before3(sample("s0100", json=b"[" * 100_000 + b"]" * 100_000)), ALL,
         {"bad_json": 1}, count=7),
    Case("json 5000-digit number", before3(sample("s0100", json=b'{"n": ' + b"9" * 5000 + b"}")), ALL,
         {"bad_json": 1}, count=7),
    Case("no image", before3(sample("s0100", png=None)), ALL, {"missing_image": 1}, count=7),
    Case("no text", before3(sample("s0100", txt=None)), ALL, {"missing_text": 1}, count=7),
]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_shard(tmp_path, drill, case, workers):
    record_case = drill.hole if case.kind == "hole" else drill.input
    with record_case(f"hostile shard: {case.name} ({workers} workers)"):
        folder = write_folder(tmp_path / "f", [(case.shard(), case.count)])
        got, skipped, loader = read(folder, workers, case.name, **case.cfg)
        assert sorted(got) == sorted(case.keys + CLEAN)
        assert skipped == case.skipped
        per_sample = sum(v for k, v in skipped.items() if k not in ("unsafe_member_name", "non_file_member",
                                                                  "truncated_tar", "bad_tar_header"))
        assert sum(loader.raw) == len(got) + per_sample  # every sample read is yielded or counted


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("count", [0, 6])
def test_zero_byte_only_shard_is_a_clear_error_with_its_count(tmp_path, drill, workers, count):
    """A source whose only shard is empty: the loader says so (the old one yielded nothing, counted nothing)."""
    with drill.input(f"zero-byte only shard, manifest {count} ({workers} workers)"):
        folder = tmp_path / "z"
        folder.mkdir()
        (folder / "shard-000000.tar").write_bytes(b"")
        Manifest(folder, count, [ShardInfo("shard-000000.tar", count, 0, sha256_file(folder / "shard-000000.tar"))]
                 ).write()
        loader = ShardLoader(config(folder, workers))
        with pytest.raises(DataStreamError, match=r"found no usable sample in epoch 0 \(0 read, all skipped\).*"
                                                  r"Main reason: truncated_tar \(1\)"):
            bounded(lambda: [k for b in loader for k in b["keys"]], "zero-byte only shard")
        assert loader.skipped == {"truncated_tar": 1}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_counts_are_complete_once_the_last_batch_is_in(tmp_path, drill, workers, drop_last):
    """Bad samples after the last full batch, a shard of bad ones only, a zero-byte shard: every skip is in
    ``loader.skipped`` as soon as the consumer holds the epoch's last batch, whatever the worker count and
    even if it never asks again (the old loader reported them only once asked past the last batch: {} here)."""
    with drill.input(f"skips after the last full batch, a zero-byte shard ({workers} workers, drop_last={drop_last})"):
        bad = b"".join(sample(f"b{i:04d}", png=b"junk") for i in range(3))
        folder = write_folder(tmp_path / "f", [(body(0, 6) + bad + END, 9), (sample("c0000", json=b"{") + END, 1),
                                               (b"", 3)])
        expected = {"bad_image": 3, "bad_json": 1, "truncated_tar": 1}

        def epoch(stop_after: int):
            loader = ShardLoader(config(folder, workers, shuffle_buffer=0, drop_last=drop_last))
            it, got, batches = iter(loader), [], 0
            for batch in it:
                got, batches = got + batch["keys"], batches + 1
                if batches == stop_after:
                    break
            return got, batches, loader.skipped, sum(loader.raw)  # (the iterator is left open when stopped)

        (whole, n, skipped, raw), _ = bounded(lambda: epoch(0), "a whole epoch")
        assert skipped == expected and raw == 12
        if drop_last:  # each worker's last partial batch is dropped (its samples counted as read)
            assert len(whole) % 4 == 0 and set(whole) <= set(keys(0, 6) + CLEAN)
        else:
            assert sorted(whole) == sorted(keys(0, 6) + CLEAN)
        (got, _, counts, raw), _ = bounded(lambda: epoch(n), "up to the last batch")
        assert counts == expected and raw == 12 and sorted(got) == sorted(whole)


# --- the CLIs on hostile folders ------------------------------------------------------------------------------


def hostile_folder(root: Path) -> Path:
    """One shard of each break (PAX length 0, bad checksum after sample 2, negative size), a traversal name and
    a symlink, a bad image."""
    return write_folder(root, [
        (before3(pax(b"0 path=s0003.json\n"))(), 6),
        (broken3(header(HDR, len(JSON), chksum=b"0000001\x00"))(), 6),
        (broken3(header(HDR, 0, size_field=b"-0000001000\x00"))(), 6),
        (before3(member("../evil.png", PNG), member("lnk.png", typ=b"2", linkname=b"/etc/passwd"),
                 sample("s0100", png=b"junk"))(), 7),
    ])


HOSTILE_SKIPS = {"bad_tar_header": 3, "unsafe_member_name": 1, "non_file_member": 1, "bad_image": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_cli_reports_the_counts(tmp_path, drill, capsys, workers):
    from data_prep.stream import main

    with drill.input(f"data_prep.stream on a hostile folder ({workers} workers)"):
        folder = hostile_folder(tmp_path / "h")
        cfg = tmp_path / "data.yaml"
        cfg.write_text(yaml.safe_dump({"sources": [{"path": str(folder)}], "num_workers": workers, "batch_size": 4,
                                       "image": {"size": 16}}))
        rc, _ = bounded(lambda: main(["--config", str(cfg), "--json"]), "data_prep.stream")
        report = json.loads(capsys.readouterr().out)
        assert rc == 0
        assert report["skipped"] == HOSTILE_SKIPS
        assert report["samples"] == 3 + 3 + 3 + 6 + 2 and report["read"] == report["samples"] + 1


def test_stream_cli_all_skipped_is_a_counted_failure(tmp_path, drill, capsys):
    from data_prep.stream import main

    with drill.input("data_prep.stream on a folder with no usable sample"):
        folder = tmp_path / "z"
        folder.mkdir()
        data = pax(b"0 path=s0000.json\n") + body(0, 2) + END
        (folder / "shard-000000.tar").write_bytes(data)
        Manifest(folder, 2, [ShardInfo("shard-000000.tar", 2, len(data), sha256_file(folder / "shard-000000.tar"))]
                 ).write()
        cfg = tmp_path / "data.yaml"
        cfg.write_text(yaml.safe_dump({"sources": [{"path": str(folder)}], "num_workers": 0, "image": {"size": 16}}))
        rc, _ = bounded(lambda: main(["--config", str(cfg), "--json"]), "data_prep.stream")
        report = json.loads(capsys.readouterr().out)
        assert rc == 1 and report["skipped"] == {"bad_tar_header": 1} and report["samples"] == 0
        assert "Main reason: bad_tar_header (1)" in report["error"]


def test_inspect_cli_reports_the_counts(tmp_path, drill, capsys):
    from data_prep.inspect import main

    with drill.input("data_prep.inspect on a hostile folder"):
        folder = hostile_folder(tmp_path / "h")
        rc, _ = bounded(lambda: main([str(folder), "--json"]), "data_prep.inspect")
        report = json.loads(capsys.readouterr().out)
        assert rc == 1
        # inspect does not decode images: the bad one is a sample like any other
        assert report["skipped"] == {"bad_tar_header": 3, "unsafe_member_name": 1, "non_file_member": 1}
        assert report["num_samples"] == 3 + 3 + 3 + 7 + 2
        assert "shard-000000.tar: bad_tar_header (1) after 3 samples" in report["problems"]
        assert "shard-000003.tar: non_file_member (1) after 7 samples" in report["problems"]
        assert "shard-000000.tar: 3 samples, manifest says 6" in report["problems"]


def test_inspect_cli_bad_json_and_surrogates(tmp_path, drill, capsys):
    """Bad json no longer ends a shard's scan; a lone surrogate in a json string prints escaped."""
    from data_prep.inspect import main

    with drill.input("data_prep.inspect on bad json and a lone surrogate"):
        odd = json.dumps({"source": "\ud800", "modality": "ct", "split": "train", "concepts": 3}).encode()
        data = sample("s0000", json=b"[" * 100_000) + sample("s0001", json=b"{") + sample("s0002", json=odd) + END
        folder = write_folder(tmp_path / "j", [(data, 3)])
        rc, _ = bounded(lambda: main([str(folder), "--json"]), "data_prep.inspect --json")
        report = json.loads(capsys.readouterr().out)
        assert rc == 1 and report["skipped"] == {"bad_json": 2} and report["num_samples"] == 5
        assert report["problems"] == [f"shard-000000.tar: sample s000{i}: bad_json" for i in (0, 1)]
        rc, _ = bounded(lambda: main([str(folder)]), "data_prep.inspect")
        text = capsys.readouterr().out
        assert rc == 1 and "  source     hostile: 2, \\ud800: 1\n" in text and "FAILED: 2 problem(s)" in text
