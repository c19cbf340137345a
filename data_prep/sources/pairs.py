"""pairs: a CSV/TSV/JSONL/JSON table of image path + caption (+ optional metadata, concepts).

Columns: image (or image_path, filepath, path, file), caption (or text, report, title),
optional modality, split, labels (JSON list or ';'-separated), concepts (JSON list); any other
column is kept in the metadata. Paths are relative to --image-root (default: the table's folder).
Images may be PNG/JPEG or DICOM (.dcm, decoded with the dicom reader's PHI-safe path).
"""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.sources import image_root, load_table, pick_column
from data_prep.writer import ImageRef, Record, Rejected, load_image_file
from vlm.data.schema import sanitize_key

IMAGE_COLS = ("image", "image_path", "filepath", "path", "file", "img")
TEXT_COLS = ("caption", "text", "report", "title", "caption_text")


def add_arguments(p):
    g = p.add_argument_group("pairs")
    g.add_argument("--image-column", help="image path column (default: first of %s)" % ", ".join(IMAGE_COLS))
    g.add_argument("--text-column", help="caption column (default: first of %s)" % ", ".join(TEXT_COLS))


def _list(value):
    if value in (None, ""):
        return None
    if isinstance(value, list):
        return value
    s = str(value).strip()
    if s.startswith("["):
        return json.loads(s)
    return [v.strip() for v in s.split(";") if v.strip()]


def image_ref(path: Path, opts) -> ImageRef:
    if path.suffix.lower() == ".dcm":
        from data_prep.sources.dicom import load_dicom_frame, dicom_options
        return ImageRef(load_dicom_frame, (str(path), 0, dicom_options(opts)))
    return ImageRef(load_image_file, (str(path), opts.max_pixels))


def read(opts):
    cols, rows = load_table(opts.input)
    icol = pick_column(cols, IMAGE_COLS, opts.input, "image path", getattr(opts, "image_column", None))
    tcol = pick_column(cols, TEXT_COLS, opts.input, "caption", getattr(opts, "text_column", None))
    root = image_root(opts, Path(opts.input).parent)
    known = {icol, tcol, "modality", "split", "labels", "concepts", "source"}

    def gen():
        for i, row in enumerate(rows):
            label = f"{Path(opts.input).name} row {i + 1}"
            if "__bad__" in row:
                yield Rejected("bad_row", f"{Path(opts.input).name} {row['__bad__']}")
                continue
            rel, text = row.get(icol), row.get(tcol)
            if not rel:
                yield Rejected("missing_image_path", label)
                continue
            if text is None or not str(text).strip():
                yield Rejected("missing_text", label)
                continue
            try:
                labels, concepts = _list(row.get("labels")), _list(row.get("concepts"))
            except json.JSONDecodeError as e:
                yield Rejected("bad_row", label, f"labels/concepts not JSON: {e}")
                continue
            meta = {"source": row.get("source") or opts.source_name or "pairs",
                    "modality": row.get("modality") or opts.modality or "unknown",
                    "split": row.get("split") or opts.split or "train"}
            if labels:
                meta["labels"] = labels
            if concepts:
                meta["concepts"] = concepts
            meta.update({k: v for k, v in row.items() if k not in known and v not in (None, "")})
            key = f"{meta['source']}-{sanitize_key(str(Path(str(rel)).with_suffix('')))}"
            yield Record(sanitize_key(key), [image_ref(root / str(rel), opts)], str(text).strip(), meta, label)

    return gen(), len(rows)
