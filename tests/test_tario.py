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
