"""A fast, strict tar member reader for shards (POSIX ustar, GNU long names, PAX paths and sizes).

The stdlib ``tarfile`` costs ~0.1 ms per member in Python object churn; shards hold millions of
small members, so we parse the 512-byte headers of a memory-mapped file directly.

Shards come from anywhere, so the walk is total: on ANY byte sequence it yields members and then
returns or raises, never loops. Every header moves the walk forward by at least one 512-byte block
(sizes are parsed strictly: octal digits or GNU base-256, never negative), and a PAX header's records
are parsed only when one is present, each record advancing by its own validated length. What is
wrong stops the walk with an exception that callers count by its ``reason`` (keeping the members
already read):

* ``TruncatedTar`` (``truncated_tar``): the file ends early: empty, a partial header, a member
  whose data runs past the end (also what a huge declared size looks like), no end-of-archive
  blocks (a tar cut at a header boundary; tarfile reads it silently);
* ``BadTarHeader`` (``bad_tar_header``): a header that is wrong in itself: bad checksum, a size or
  checksum field that is not a number (or negative), a malformed PAX record (length 0, not
  decimal, negative, without its space, past the header's end, no ``key=value``, not ending in a
  newline, a ``path`` that is not UTF-8, a ``size`` that is not a number), a PAX or GNU long-name
  header above ``MAX_META`` bytes.

An exception's ``member`` is the name the broken or cut header gives its member, when it has one (for
a broken PAX or long-name header: the name in the intact header after it, that member's own): a
caller grouping members into samples keeps the sample in progress when that name shows the break
came in the next sample. A name read from a header whose checksum failed may itself be damaged; the
sample kept is then checked by the decoder like any other (missing parts are counted there). When
the tar ends at a member boundary (no end-of-archive blocks, or only part of them) every member
read is whole, and ``keep`` is set: the sample in progress is kept, the decoder judges it. Members
other than regular files are never yielded as files: directories and the metadata headers are walked
past; ``iter_entries`` yields links, devices and FIFOs with the data ``NOT_A_FILE`` (so that they can be
counted), ``iter_members`` leaves them out.
"""
from __future__ import annotations

import mmap
from typing import Callable, Iterator, Optional

BLOCK = 512
ZEROS = b"\x00" * BLOCK
REGULAR = (b"0", b"\x00", b"7")
META = (b"L", b"x", b"K", b"g")  # GNU long name / long link name, PAX extended / global headers
NOT_SPECIAL = (b"5", *META)  # directories and metadata: walked past, not counted
MAX_META = 1 << 20  # bytes of one PAX or GNU long-name header; anything longer is refused


class NotAFile:
    """The data of a link, device or FIFO member in ``iter_entries``."""

    def __repr__(self) -> str:
        return "NOT_A_FILE"


NOT_A_FILE = NotAFile()


class TruncatedTar(ValueError):
    """The tar ends early (counted as ``truncated_tar``)."""

    reason = "truncated_tar"

    def __init__(self, msg: str, member: str | None = None, keep: bool = False):
        super().__init__(msg)
        self.member = member  # the name the cut (or broken) header gives its member, when it has one
        self.keep = keep  # the tar ends at a member boundary: every member read is whole


class BadTarHeader(TruncatedTar):
    """A header that is malformed in itself (counted as ``bad_tar_header``)."""

    reason = "bad_tar_header"


def _octal(field: bytes) -> int:
    """A numeric header field: octal digits (spaces and a NUL around them) or GNU base-256. ValueError
    for anything else, negative numbers included (``int()`` alone would take '-1', '+7', '1_0')."""
    if field[0] & 0x80:
        if field[0] != 0x80:  # 0xff: a negative base-256 number; other high bytes are not numbers
            raise ValueError("negative or invalid base-256 number")
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\x00", 1)[0].strip()
    if not s:
        return 0
    if not s.isdigit():
        raise ValueError("not an octal number")
    return int(s, 8)  # ValueError on 8 or 9


def _pax(body: bytes) -> tuple[Optional[str], Optional[int]]:
    """The ``path`` and ``size`` records of a PAX extended header. Records are ``"<len> <key>=<value>\\n"``,
    ``len`` counting the whole record; ValueError saying what is malformed. NUL padding after the last
    record ends the header (some writers leave it)."""
    i, n, path, size = 0, len(body), None, None
    while i < n:
        if body[i] == 0:
            break
        sp = body.find(b" ", i, i + 21)
        if sp < 0:
            raise ValueError("a record without its length and space")
        digits = body[i:sp]
        if not digits.isdigit():
            raise ValueError(f"record length {digits[:20]!r} is not a decimal number")
        stop = i + int(digits)
        if stop < sp + 4:  # the length, a space, a key of one byte, '=', the newline at least: 0 never advances
            raise ValueError(f"record length {int(digits)} is shorter than the record itself")
        if stop > n:
            raise ValueError(f"record length {int(digits)} runs past the end of the header")
        if body[stop - 1] != 0x0A:
            raise ValueError("a record that does not end with a newline")
        key, eq, value = body[sp + 1:stop - 1].partition(b"=")
        if not eq or not key:
            raise ValueError("a record without key=value")
        if key == b"path":
            try:
                path = value.decode("utf-8") or None
            except UnicodeDecodeError:
                raise ValueError("a path that is not UTF-8") from None
        elif key == b"size":
            if not value.isdigit() or len(value) > 20:
                raise ValueError(f"size {value[:20]!r} is not a decimal number")
            size = int(value)
        i = stop  # > i: every record advances
    return path, size


def _name_of(hdr: bytes) -> Optional[str]:
    """The member name a (possibly broken) header gives, for deciding where a break came; None for the
    metadata headers, whose target member is unknown."""
    if hdr[156:157] in META:
        return None
    name = hdr[0:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
    if hdr[257:262] == b"ustar":
        prefix = hdr[345:500].split(b"\x00", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "replace") + "/" + name
    return name


def _next_name(mm: mmap.mmap, off: int) -> Optional[str]:
    """The name in the intact header at ``off`` (the member a broken PAX or long-name header was for), if any."""
    hdr = mm[off:off + BLOCK]
    if len(hdr) < BLOCK:
        return None
    try:
        if _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
            return None
    except ValueError:
        return None
    return _name_of(hdr)


def iter_members(path: str, want: Optional[Callable[[str], bool]] = None,
                 start: int = 0) -> Iterator[tuple[str, Optional[bytes]]]:
    """Yield ``(name, data)`` for the regular files of a tar, in order (from byte ``start``; see iter_entries).

    ``want(name)`` is asked just before a member's data would be copied out of the map; when it says
    False the member comes as ``(name, None)``. Walking past a member then costs only its header, which
    is what lets several workers share one shard cheaply (each keeps its own samples).
    """
    for _, name, data in iter_entries(path, want, start):
        if data is not NOT_A_FILE:
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
    ``source``: a path, or a map from ``open_tar`` (left open). Links, devices and FIFOs come too, with
    the data ``NOT_A_FILE`` (and without asking ``want``); directories and metadata headers never do."""
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
    n, off, longname, paxname, paxsize = len(mm), start, None, None, None
    if off < 0 or off % BLOCK:
        raise TruncatedTar(f"start offset {off} is not a header boundary")
    first = off  # where the current member's headers began
    while True:
        if off + BLOCK > n:
            rest = mm[off:n]
            if not rest.strip(b"\x00"):  # at a member boundary: the end-of-archive blocks are missing or cut
                raise TruncatedTar(f"the tar ends at byte {n} without its end-of-archive blocks", keep=True)
            raise TruncatedTar(f"partial header at byte {off}",
                               _name_of(rest.ljust(BLOCK, b"\x00")) if len(rest) >= 100 else None)
        hdr = mm[off:off + BLOCK]
        if hdr == ZEROS:
            return
        try:
            chksum = _octal(hdr[148:156])
            size = _octal(hdr[124:136])
        except ValueError:
            raise BadTarHeader(f"unreadable header at byte {off}", _name_of(hdr)) from None
        if chksum != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
            raise BadTarHeader(f"bad header checksum at byte {off}", _name_of(hdr))
        typ = hdr[156:157]
        if paxsize is not None and typ not in META:  # a PAX size record overrides the next member's size
            size, paxsize = paxsize, None
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
        off = begin + (size + BLOCK - 1) // BLOCK * BLOCK  # size >= 0: always > the header's own offset
        if typ == b"L" or typ == b"x":
            if size > MAX_META:
                raise BadTarHeader(f"{'PAX' if typ == b'x' else 'long-name'} header at byte {begin - BLOCK} "
                                   f"declares {size} bytes (more than {MAX_META})", _next_name(mm, off))
            if typ == b"L":
                longname = mm[begin:end].split(b"\x00", 1)[0].decode("utf-8", "replace")
            else:
                try:
                    paxname, paxsize = _pax(mm[begin:end])
                except ValueError as e:
                    raise BadTarHeader(f"bad PAX header at byte {begin - BLOCK}: {e}", _next_name(mm, off)) from None
            continue
        if typ not in REGULAR or (typ == b"\x00" and name.endswith("/")):  # (old tars: a directory)
            if typ not in NOT_SPECIAL and typ != b"\x00":
                yield first, paxname or longname or name, NOT_A_FILE
            if typ not in META:
                longname = paxname = paxsize = None
                first = off
            continue
        name = paxname or longname or name
        longname = paxname = None
        at, first = first, off
        yield at, name, (mm[begin:end] if want is None or want(name) else None)
