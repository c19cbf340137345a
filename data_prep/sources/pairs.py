"""pairs: a CSV/TSV/JSONL/JSON table of image path + caption (+ optional metadata, concepts).

Columns: image (or image_path, filepath, path, file), caption (or text, report, title),
optional modality, split, source, labels (JSON list or ';'-separated), concepts (JSON list of
objects or names); any other column is kept in the metadata. Paths are relative to --image-root
(default: the table's folder) and must stay inside it (``outside_root`` otherwise, see
``data_prep.sources``). Images may be PNG/JPEG or DICOM (.dcm, decoded with the dicom reader's
PHI-safe path). Tables are UTF-8 (a BOM is fine); CSV fields may be up to 16 MiB.

Privacy: a pairs table is usually a user's own data, whose paths may hold patient names and record
numbers, so a sample's key is ``<source>-<keyed hash of the row's image path>``
(``data_prep.keys.hashed_key``: the secret stays in ``OUT/.key_secret`` or ``--key-secret``), and the
summary names failing rows by the table's line only, never by path (an unforeseen exception while
handling a row is that row's ``error`` skip). The same path on two rows gives two samples (the second
key gets a ``-1`` suffix, counted as ``renamed_keys``; ``--dedup`` drops equal pixels).
"""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.keys import hashed_key
from data_prep.sources import (MAX_FIELD_CHARS, BadField, BadRow, check_key_secret, each_row, file_ref, image_root,
                               load_table, pick_column, resolve_inside, text_field, type_name)
from data_prep.writer import Record, Rejected

IMAGE_COLS = ("image", "image_path", "filepath", "path", "file", "img")
TEXT_COLS = ("caption", "text", "report", "title", "caption_text")


def add_arguments(p):
    g = p.add_argument_group("pairs", "a CSV/TSV/JSONL/JSON table in UTF-8 (a BOM is fine); CSV fields hold up "
                             f"to {MAX_FIELD_CHARS // (1 << 20)} MiB, a row with a longer one is skipped as bad_row")
    g.add_argument("--image-column", help="image path column (default: first of %s)" % ", ".join(IMAGE_COLS))
    g.add_argument("--text-column", help="caption column (default: first of %s)" % ", ".join(TEXT_COLS))


def _list(value, key: str, item_types: tuple):
    """A labels/concepts cell: a JSON list (a list already in JSON inputs) or ';'-separated names."""
    if value in (None, ""):
        return None
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except (ValueError, RecursionError):
                raise BadField(f"{key} is not a valid JSON list") from None
        else:
            return [v.strip() for v in s.split(";") if v.strip()] or None
    if not isinstance(value, list):
        raise BadField(f"{key} is {type_name(value)}, not a list")
    for v in value:
        if not isinstance(v, item_types):
            raise BadField(f"{key} holds {type_name(v)}")
    return value


def read(opts):
    cols, rows = load_table(opts.input)
    icol = pick_column(cols, IMAGE_COLS, opts.input, "image path", getattr(opts, "image_column", None))
    tcol = pick_column(cols, TEXT_COLS, opts.input, "caption", getattr(opts, "text_column", None))
    root = image_root(opts, Path(opts.input).parent)
    name = Path(opts.input).name
    known = {icol, tcol, "modality", "split", "labels", "concepts", "source"}
    check_key_secret(opts)
    dcm = None
    if any(isinstance(r, dict) and str(r.get(icol) or "").lower().endswith(".dcm") for _, r in rows):
        from data_prep.sources.dicom import dicom_options
        dcm = dicom_options(opts)  # validates --window before anything is written

    def row_item(label, row):
        if isinstance(row, BadRow):
            return Rejected("bad_row", label, row.detail)
        try:
            rel, text = text_field(row, icol), text_field(row, tcol)
            if rel is None:
                return Rejected("missing_image_path", label)
            if text is None:
                return Rejected("missing_text", label)
            labels = _list(row.get("labels"), "labels", (str,))
            concepts = _list(row.get("concepts"), "concepts", (str, dict))
            meta = {"source": text_field(row, "source") or opts.source_name or "pairs",
                    "modality": text_field(row, "modality") or opts.modality or "unknown",
                    "split": text_field(row, "split") or opts.split or "train"}
        except BadField as e:
            return Rejected("bad_row", label, str(e))
        path = resolve_inside(root, rel, opts)
        if path is None:
            return Rejected("outside_root", label)
        if labels:
            meta["labels"] = labels
        if concepts:
            meta["concepts"] = concepts
        meta.update({k: v for k, v in row.items() if k not in known and v not in (None, "")})
        key = hashed_key(meta["source"], rel, opts)
        return Record(key, [file_ref(path, rel, opts, dcm)], text.strip(), meta, label)

    # one row's unforeseen exception is its error skip (each_row), named by the table's line
    return each_row(((f"{name} {line}", row) for line, row in rows), row_item), len(rows)
