"""The fast tar reader agrees with the stdlib on every header flavour and refuses corrupt ones."""
import io
import tarfile

import pytest

from vlm.data.tario import TruncatedTar, iter_members


def build(path, fmt, names):
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = f"payload {i} {name}".encode() * (i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_matches_tarfile(tmp_path, fmt):
    long = "deep/" * 30 + "k.png"  # > 100 chars: GNU long name or PAX path (ustar splits with a prefix)
    names = ["a.txt", "a.png", "sub/b.json", "ünï.txt" if fmt != tarfile.USTAR_FORMAT else "u.txt"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append(long)
    p = tmp_path / "x.tar"
    build(p, fmt, names)
    with tarfile.open(p) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert [(n, bytes(d)) for n, d in iter_members(str(p))] == expected


def test_truncated_and_garbage(tmp_path):
    p = tmp_path / "x.tar"
    build(p, tarfile.USTAR_FORMAT, ["a.txt", "b.txt"])
    data = p.read_bytes()
    p.write_bytes(data[:512 + 10])
    with pytest.raises(TruncatedTar) as e:
        list(iter_members(str(p)))
    assert e.value.member == "a.txt"
    p.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(TruncatedTar, match="checksum|unreadable header"):
        list(iter_members(str(p)))
    p.write_bytes(b"")
    with pytest.raises(TruncatedTar):
        list(iter_members(str(p)))


def test_unwanted_members_are_walked_past_without_their_data(tmp_path):
    p = tmp_path / "x.tar"
    build(p, tarfile.GNU_FORMAT, ["a.txt", "b.png", "deep/" * 30 + "c.txt"])
    asked = []

    def want(name):
        asked.append(name)
        return name.endswith(".txt")

    got = list(iter_members(str(p), want))
    assert [n for n, _ in got] == asked == [n for n, _ in iter_members(str(p))]
    assert [d is None for _, d in got] == [False, True, False]
    assert bytes(got[2][1]) == dict(iter_members(str(p)))[got[2][0]]


def _header(name: str, size: int, typ: bytes = b"0", size_field: bytes | None = None) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[124:136] = (size_field if size_field is not None else b"%011o\x00" % size).ljust(12, b"\x00")
    h[156:157], h[257:265] = typ, b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def test_pax_size_record_and_links_as_tarfile_reads_them(tmp_path):
    """A PAX ``size`` record overrides the header's size (tarfile does the same); links come from iter_entries
    as NOT_A_FILE (to be counted), never from iter_members."""
    from vlm.data.tario import NOT_A_FILE, iter_entries

    recs = b"10 size=5\n"
    data = (_header("././@PaxHeader", len(recs), b"x") + recs.ljust(512, b"\x00")
            + _header("a.txt", 0) + b"hello".ljust(512, b"\x00")
            + _header("l.png", 0, b"2") + _header("b.txt", 2) + b"ok".ljust(512, b"\x00") + b"\x00" * 1024)
    p = tmp_path / "x.tar"
    p.write_bytes(data)
    with tarfile.open(p) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert [(n, bytes(d)) for n, d in iter_members(str(p))] == expected == [("a.txt", b"hello"), ("b.txt", b"ok")]
    assert [(n, d is NOT_A_FILE) for _, n, d in iter_entries(str(p))] == [("a.txt", False), ("l.png", True),
                                                                         ("b.txt", False)]


@pytest.mark.parametrize("field,reason", [(b"-0000001000", "bad_tar_header"), (b"+0000000017", "bad_tar_header"),
                                          (b"0_17", "bad_tar_header"), (b"00000000099", "bad_tar_header"),
                                          (b"\xff" * 12, "bad_tar_header"), (b"77777777777", "truncated_tar"),
                                          (b"\x80" + (1 << 80).to_bytes(11, "big"), "truncated_tar")])
def test_sizes_are_parsed_strictly(tmp_path, field, reason):
    """A negative size once walked the reader backwards forever; int() also took signs and underscores."""
    p = tmp_path / "x.tar"
    p.write_bytes(_header("a.txt", 0, size_field=field) + b"\x00" * 2048)
    with pytest.raises(TruncatedTar) as e:
        list(iter_members(str(p)))
    assert e.value.reason == reason and e.value.member == "a.txt"


@pytest.mark.parametrize("records", [b"0 path=a.txt\n", b"abc path=a.txt\n", b"-5 path=a.txt\n", b"path=a.txt\n",
                                     b"99 path=a.txt\n", b"9 pathxy\n", b"14 path=a.txtX", b"14 path=\xff.txt\n",
                                     b"11 size=1x\n"])
def test_malformed_pax_records_are_bad_headers(tmp_path, records):
    """Each malformed form ends the walk with BadTarHeader naming the member it was for (never a loop, never a
    bare ValueError); the member before it is kept."""
    from vlm.data.tario import BadTarHeader

    p = tmp_path / "x.tar"
    p.write_bytes(_header("a.png", 2) + b"ok".ljust(512, b"\x00") + _header("././@PaxHeader", len(records), b"x")
                  + records.ljust(512, b"\x00") + _header("b.txt", 2) + b"ok".ljust(512, b"\x00") + b"\x00" * 1024)
    got = []
    with pytest.raises(BadTarHeader, match="bad PAX header at byte 1024") as e:
        for name, _ in iter_members(str(p)):
            got.append(name)
    assert got == ["a.png"] and e.value.member == "b.txt" and e.value.reason == "bad_tar_header"


def test_a_tar_without_its_end_blocks_is_counted_and_keeps_what_it_read(tmp_path):
    """Cut at a member boundary (no end-of-archive blocks, or part of them): every member read is whole and kept,
    and the cut is reported (tarfile reads such a tar silently)."""
    p = tmp_path / "x.tar"
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.txt", "b.txt"):
            info = tarfile.TarInfo(name)
            info.size = 700
            tar.addfile(info, io.BytesIO(b"x" * 700))
    end = 2 * (512 + 1024)
    data = p.read_bytes()
    for cut in (end, end + 300):
        p.write_bytes(data[:cut])
        got = []
        with pytest.raises(TruncatedTar, match="without its end-of-archive blocks") as e:
            for name, _ in iter_members(str(p)):
                got.append(name)
        assert got == ["a.txt", "b.txt"] and e.value.keep and e.value.reason == "truncated_tar"
