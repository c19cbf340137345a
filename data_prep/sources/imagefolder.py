"""imagefolder: one sub-folder per class (``ROOT/<class>/*.png|jpg|dcm``), as torchvision's ImageFolder.

Each image's caption is written from the class name (--caption-template, default
"{label}", e.g. "a chest x-ray showing {label}"); its label goes to ``meta.labels``.

Symlinks (class folders, sub-folders, files) are followed while they stay inside ROOT; one that
leaves it is refused and counted as ``outside_root`` without looking at its target (unless
--allow-outside-root), and a folder reached twice through links is read once.

Privacy: image folders of medical data are named after patients and record numbers, so keys are
``<source>-<keyed hash of the path under ROOT>`` (``data_prep.keys.hashed_key``) and the summary names
a failing image as ``class <name> file <n>`` (its position in the class's sorted listing), never by
its path; refused top-level links are ``entry <n>`` of ROOT's sorted listing.

Failures, one entry at a time: a folder that cannot be listed (unreadable, a path longer than the
system allows) is one ``error`` skip named ``class <name> folder <n>`` (the same position count), an
entry that cannot be looked at or an image whose sample cannot be built one ``error`` skip named as
above; the walk goes on with the rest. The walk is iterative, so folders of any depth are read.
"""
from __future__ import annotations

import os
from pathlib import Path

from data_prep.keys import hashed_key
from data_prep.sources import SourceError, check_key_secret, each_row, file_ref, guard, resolve_inside
from data_prep.writer import Record, Rejected

EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")


def add_arguments(p):
    p.add_argument_group("imagefolder").add_argument(
        "--caption-template", default="{label}", help="caption per image; {label} is the class name")


def _entries(folder) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _kind(root: Path, sub: str, e: os.DirEntry, opts) -> tuple[str, Path | None]:
    """What the entry ``e`` (``sub`` under ROOT) is: ("dir", real path), ("image", real path), ("outside",
    None) for a link that leaves ROOT, or ("other", None)."""
    if e.is_symlink():
        real = resolve_inside(root, sub, opts)
        if real is None:
            return "outside", None
        return ("dir", real) if real.is_dir() else ("image" if Path(e.name).suffix.lower() in EXTS else "other", real)
    if e.is_dir():
        return "dir", Path(e.path)
    return ("image", resolve_inside(root, sub, opts)) if Path(e.name).suffix.lower() in EXTS else ("other", None)


def _files(root: Path, cls: str, real: Path, opts, seen: set[str]):
    """``(what, path under ROOT, resolved)`` for every image below the class folder ``cls`` (resolved to
    ``real``), in sorted order, depth first (iterative: any depth). ``what`` is "file" (resolved: its path,
    or None when it leaves ROOT), "error" for an entry that could not be looked at, or "folder" for a
    folder that could not be listed (resolved: a ``Rejected`` saying why). ``seen`` holds the real folders
    read so far, so a folder reached again through a link (or a link loop) is read once."""
    stack: list[tuple[str, str, object]] = []  # (path under ROOT, real path, its sorted entries) per open folder

    def enter(rel: str, folder: Path, key: str):  # None, or the Rejected that says why it cannot be listed
        got = guard("", _entries, folder)
        if isinstance(got, Rejected):
            return got
        stack.append((rel, key, iter(got)))
        return None

    if (failed := enter(cls, real, os.path.realpath(real))) is not None:
        yield "folder", cls, failed
    while stack:
        rel, parent, it = stack[-1]
        e = next(it, None)
        if e is None:
            stack.pop()
            continue
        sub = f"{rel}/{e.name}"
        got = guard("", _kind, root, sub, e, opts)
        if isinstance(got, Rejected):
            yield "error", sub, got
            continue
        kind, target = got
        if kind == "dir":
            # a real folder's sub-folder (no link) is real as joined: realpath per level would be quadratic
            key = os.path.realpath(target) if e.is_symlink() else os.path.join(parent, e.name)
            if key not in seen:
                seen.add(key)
                if (failed := enter(sub, target, key)) is not None:
                    yield "folder", sub, failed
        elif kind in ("image", "outside"):
            yield "file", sub, target


def read(opts):
    root = Path(opts.input)
    if not root.is_dir():
        raise SourceError(f"--input must be a folder of class folders: {root}")
    if "{label}" not in opts.caption_template:
        raise SourceError("--caption-template must contain {label}")
    check_key_secret(opts)
    try:
        top = _entries(root)
    except OSError as e:
        raise SourceError(f"{root}: cannot list the folder ({e.strerror or type(e).__name__})") from None
    classes, items = [], []  # items: (label, class index, class, path under ROOT, resolved | None | Rejected)
    for n, e in enumerate(top, 1):
        got = guard(f"entry {n}", _kind, root, e.name, e, opts)
        if isinstance(got, Rejected) or got[0] == "outside":
            items.append((f"entry {n}", -1, "", e.name, got if isinstance(got, Rejected) else None))
        elif got[0] == "dir":
            classes.append((e.name, got[1]))
    if not classes:
        raise SourceError(f"{root} has no class sub-folders")
    seen = {os.path.realpath(real) for _, real in classes}
    for index, (c, real) in enumerate(classes):
        for j, (what, sub, target) in enumerate(_files(root, c, real, opts, seen), 1):
            items.append((f"class {c} {'folder' if what == 'folder' else 'file'} {j}", index, c, sub, target))
    source = opts.source_name or "imagefolder"

    def item(where, index, c, sub, real):
        if isinstance(real, Rejected):  # an entry or folder we could not look at: its error skip
            return Rejected(real.reason, where, real.detail)
        if real is None:
            return Rejected("outside_root", where)
        label = c.replace("_", " ")
        meta = {"source": source, "modality": opts.modality or "unknown", "split": opts.split or "train",
                "labels": [label], "class_index": index}
        return Record(hashed_key(source, sub, opts), [file_ref(real, sub, opts)],
                      opts.caption_template.format(label=label), meta, where)

    # one image's unforeseen exception is its error skip (each_row), named by class and position
    return each_row(items, item), len(items)
