"""A fast, strict tar member reader for shards (POSIX ustar, GNU long names, PAX paths).

The stdlib ``tarfile`` costs ~0.1 ms per member in Python object churn; shards hold millions of
small members, so we parse the 512-byte headers of a memory-mapped file directly. Anything the
parser does not accept (bad checksum, a member running past the end of the file) raises
``TruncatedTar``; callers count it and keep the members already read.
"""
from __future__ import annotations

import mmap
from typing import Callable, Iterator, Optional

BLOCK = 512
REGULAR = (b"0", b"\x00", b"7")


class TruncatedTar(ValueError):
    def __init__(self, msg: str, member: str | None = None):
        super().__init__(msg)
        self.member = member  # the member whose data was cut off, when its header was readable


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\x00", 1)[0].strip()
    return int(s, 8) if s else 0


def _pax_path(body: bytes) -> str | None:
    i, path = 0, None
    while i < len(body):
        sp = body.index(b" ", i)
        length = int(body[i:sp])
        key, _, value = body[sp + 1:i + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        i += length
    return path


def iter_members(path: str, want: Optional[Callable[[str], bool]] = None,
                 start: int = 0) -> Iterator[tuple[str, Optional[bytes]]]:
    """Yield ``(name, data)`` for the regular files of a tar, in order (from byte ``start``; see iter_entries).

    ``want(name)`` is asked just before a member's data would be copied out of the map; when it says
    False the member comes as ``(name, None)``. Walking past a member then costs only its header, which
    is what lets several workers share one shard cheaply (each keeps its own samples).
    """
    for _, name, data in iter_entries(path, want, start):
        yield name, data


def open_tar(path: str) -> mmap.mmap:
    """The tar memory-mapped (read-only), for several ``iter_entries`` walks from different offsets."""
    with open(path, "rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise TruncatedTar("empty file") from None


def iter_entries(source: str | mmap.mmap, want: Optional[Callable[[str], bool]] = None,
                 start: int = 0) -> Iterator[tuple[int, str, Optional[bytes]]]:
    """``(offset, name, data)`` per regular file, as iter_members, with the byte offset of the member's
    first header (its GNU long-name or PAX header when it has one). ``start``: begin at that byte, which
    must be such an offset (a resumed reader seeks there instead of walking the members before it).
    ``source``: a path, or a map from ``open_tar`` (left open)."""
    if isinstance(source, mmap.mmap):
        yield from _walk(source, want, start)
        return
    mm = open_tar(source)
    with mm:
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        yield from _walk(mm, want, start)


def _walk(mm: mmap.mmap, want: Optional[Callable[[str], bool]],
          start: int) -> Iterator[tuple[int, str, Optional[bytes]]]:
    n, off, longname, paxname = len(mm), start, None, None
    if off < 0 or off % BLOCK:
        raise TruncatedTar(f"start offset {off} is not a header boundary")
    first = off  # where the current member's headers began
    while True:
        if off + BLOCK > n:
            if off == n:
                return  # no end-of-archive blocks; accept as tarfile does
            raise TruncatedTar(f"partial header at byte {off}")
        hdr = mm[off:off + BLOCK]
        if hdr == b"\x00" * BLOCK:
            return
        try:
            chksum = _octal(hdr[148:156])
            size = _octal(hdr[124:136])
        except ValueError:
            raise TruncatedTar(f"unreadable header at byte {off}") from None
        if chksum != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
            raise TruncatedTar(f"bad header checksum at byte {off}")
        typ = hdr[156:157]
        begin = off + BLOCK
        end = begin + size
        name = hdr[0:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\x00", 1)[0]
            if prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
        if end > n:
            raise TruncatedTar(f"member at byte {off} runs past the end of the file",
                               (paxname or longname or name) if typ in REGULAR else None)
        off = begin + (size + BLOCK - 1) // BLOCK * BLOCK  # always > the header's own offset: no spin
        if typ == b"L":
            longname = mm[begin:end].split(b"\x00", 1)[0].decode("utf-8", "replace")
            continue
        if typ == b"x":
            paxname = _pax_path(mm[begin:end])
            continue
        if typ not in REGULAR:
            longname = paxname = None
            first = off
            continue
        name = paxname or longname or name
        longname = paxname = None
        at, first = first, off
        yield at, name, (mm[begin:end] if want is None or want(name) else None)
