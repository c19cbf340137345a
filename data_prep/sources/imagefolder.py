"""imagefolder: one sub-folder per class (``ROOT/<class>/*.png|jpg|dcm``), as torchvision's ImageFolder.

Each image's caption is written from the class name (--caption-template, default
"{label}", e.g. "a chest x-ray showing {label}"); its label goes to ``meta.labels``.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import SourceError
from data_prep.sources.pairs import image_ref
from data_prep.writer import Record
from vlm.data.schema import sanitize_key

EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")


def add_arguments(p):
    p.add_argument_group("imagefolder").add_argument(
        "--caption-template", default="{label}", help="caption per image; {label} is the class name")


def read(opts):
    root = Path(opts.input)
    if not root.is_dir():
        raise SourceError(f"--input must be a folder of class folders: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SourceError(f"{root} has no class sub-folders")
    if "{label}" not in opts.caption_template:
        raise SourceError("--caption-template must contain {label}")
    items = [(c, p) for c in classes for p in sorted((root / c).rglob("*")) if p.suffix.lower() in EXTS]
    source = opts.source_name or "imagefolder"

    def gen():
        for c, p in items:
            label = c.replace("_", " ")
            meta = {"source": source, "modality": opts.modality or "unknown", "split": opts.split or "train",
                    "labels": [label], "class_index": classes.index(c)}
            key = sanitize_key(f"{source}-{c}-{p.relative_to(root / c).with_suffix('')}")
            yield Record(key, [image_ref(p, opts)], opts.caption_template.format(label=label), meta, str(p))

    return gen(), len(items)
