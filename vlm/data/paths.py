"""Paths that a data file names, kept inside the folder the user named.

Annotation files (captions tables, conversation files, benchmark releases) name their images by paths
relative to an image root; a hostile or careless row (``../../etc/passwd``, an absolute path, a symlink
that leaves the root) must not make us read outside it. data_prep's readers and eval's benchmarks both
resolve row paths with ``resolve_inside``.
"""
from __future__ import annotations

import functools
import os
import stat
from collections import deque
from pathlib import Path

MAX_SYMLINK_HOPS = 40  # as the kernel's limit: more is a loop


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def resolve_inside(root, rel, allow_outside: bool = False) -> Path | None:
    """The real path (every symlink resolved) of ``rel`` under ``root``, or None when it leaves the root.

    ``rel`` is a row's image path: relative (``..`` allowed while it stays inside), or absolute (accepted
    when it names a file inside the root). Symlinks are followed one component at a time and each step is
    checked before anything is looked at: no path outside the root (other than the root as named and its
    parent folders, which realpath(root) walked already) is ever stat'ed or opened; an absolute path that
    goes through a symlinked root (``/data/images/x.png`` with /data/images a link) is inside. A loop of more than
    ``MAX_SYMLINK_HOPS`` links counts as leaving. With ``allow_outside`` (data_prep.shards'
    ``--allow-outside-root``) the path is joined as given (``root / rel``; an absolute ``rel`` stands alone)
    and not checked.
    """
    rel = os.fspath(rel)
    if allow_outside:
        return Path(root) / rel
    if "\x00" in rel:
        return None
    given, base = os.path.abspath(root), _real_root(os.fspath(root))
    cur = "/" if rel.startswith("/") else base
    parts, hops = deque(rel.split("/")), 0
    while parts:
        name = parts.popleft()
        if name in ("", "."):
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        cand = os.path.join(cur, name)
        if not _within(cand, base):
            if _within(base, cand):  # a parent folder of the (real) root: a real folder, no link
                cur = cand
                continue
            if not _within(given, cand):  # else the root as the user named it (or a parent): may be a link
                return None
        try:
            st = os.lstat(cand)
        except OSError:  # absent (the loader counts it missing) or unreadable: nothing more to resolve here
            cur = cand
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                return None
            target = os.readlink(cand)
            parts.extendleft(reversed(target.split("/")))
            if target.startswith("/"):
                cur = "/"
            continue
        cur = cand
    return Path(cur) if _within(cur, base) else None
