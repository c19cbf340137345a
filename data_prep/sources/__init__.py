"""One reader per input format. Each module defines ``add_arguments(parser)`` (optional) and
``read(opts) -> (records, total)``: it validates its input eagerly (raising ``SourceError``
before anything is written) and returns an iterator of ``Record``/``Rejected`` plus, when
known, how many rows it will yield.
"""
from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

FORMATS = ("pairs", "llava", "r2gen", "slake", "vqa_rad", "pathvqa", "imagefolder", "dicom", "nifti")


class SourceError(ValueError):
    """Input that cannot be read at all: a missing file, a wrong layout, missing columns."""


def get_reader(fmt: str):
    if fmt not in FORMATS:
        raise SourceError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return importlib.import_module(f"data_prep.sources.{fmt}")


def require_file(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{what} not found: {p}")
    return p


def load_json(path, what: str):
    from vlm.data.formats import FormatError, load_json_file

    try:
        return load_json_file(path, what)
    except FormatError as e:
        raise SourceError(str(e)) from None


def load_table(path) -> tuple[list[str], list[dict]]:
    """CSV/TSV or JSONL rows -> (columns, rows). JSONL lines that do not parse become {'__bad__': line}."""
    p = require_file(path, "--input")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        rows, cols = [], []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                row = {"__bad__": f"line {i + 1}"}
            for k in row:
                if k not in cols and k != "__bad__":
                    cols.append(k)
            rows.append(row)
        return cols, rows
    if p.suffix.lower() == ".json":
        data = load_json(p, "--input")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SourceError(f"{p}: expected a JSON list of objects")
        cols = list(dict.fromkeys(k for r in data for k in r))
        return cols, data
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delim)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def pick_column(cols: list[str], candidates: tuple[str, ...], path, what: str, given: str | None = None) -> str:
    if given:
        if given not in cols:
            raise SourceError(f"{path}: column {given!r} ({what}) not found; columns are {cols}")
        return given
    for c in candidates:
        if c in cols:
            return c
    raise SourceError(f"{path}: no {what} column (looked for {', '.join(candidates)}); columns are {cols}")


def image_root(opts, default: Path) -> Path:
    root = Path(opts.image_root) if opts.image_root else default
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root} (set --image-root)")
    return root


def vqa_conversations(qas: list[dict]) -> list[dict]:
    """QA pairs of one image -> a LLaVA conversation, the image token on the first turn."""
    conv = []
    for i, qa in enumerate(qas):
        q = str(qa["question"]).strip()
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": str(qa["answer"]).strip()})
    return conv


def vqa_records(rows: list[dict], *, source: str, image_id, make_ref, meta_of, qa_keys: tuple[str, ...]):
    """Group VQA rows by image: one sample per image, its questions as a multi-turn conversation.

    ``image_id(row)`` names the image (None: the row is rejected), ``make_ref(row)`` loads it,
    ``meta_of(row)`` gives the sample metadata (source, modality, split, ...); ``qa_keys`` are the
    row fields kept per question in ``meta["qa"]``.
    """
    from data_prep.writer import Record, Rejected
    from vlm.data.schema import sanitize_key

    groups: dict[str, list[int]] = {}
    rejected = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not str(r.get("question", "")).strip() or r.get("answer") in (None, ""):
            rejected.append(Rejected("bad_row", f"row {i}", "no question or answer"))
            continue
        img = image_id(r)
        if img is None:
            rejected.append(Rejected("missing_image_path", f"row {i}"))
            continue
        groups.setdefault(img, []).append(i)

    def gen():
        yield from rejected
        for img, idx in groups.items():
            first = rows[idx[0]]
            qas = [{k: rows[i][k] for k in qa_keys if k in rows[i]} for i in idx]
            for qa, i in zip(qas, idx):
                qa["answer"] = str(rows[i]["answer"]).strip()
            meta = meta_of(first) | {"qa": qas, "conversations": vqa_conversations(qas), "image_name": img}
            key = sanitize_key(f"{source}-{Path(img).with_suffix('') if '.' in Path(img).name else img}")
            yield Record(key, [make_ref(first)], None, meta, f"image {img}")

    return gen(), len(groups) + len(rejected)


def read_parquet_rows(path):
    from vlm.data.formats import FormatError
    from vlm.data.formats import read_parquet_rows as read

    try:
        return read(path)
    except FormatError as e:
        raise SourceError(str(e)) from None


def parquet_vqa_records(opts, source: str, modality: str, qa_keys: tuple[str, ...]):
    """A Hugging Face VQA parquet release (VQA-RAD, PathVQA): rows of the splits --split names
    (all by default), grouped by image content (the release has no image names)."""
    import hashlib

    from data_prep.writer import ImageRef, load_image_bytes
    from vlm.data.formats import parquet_image

    wanted = None if opts.split in (None, "all") else set(opts.split.split(","))
    rows = []
    for split, part in read_parquet_rows(opts.input):
        if wanted and split not in wanted:
            continue
        for r in part:  # qid: the row's index within its split (vlm.data.formats)
            r["split"] = split
            rows.append(r)

    def image_id(r):
        data = parquet_image(r)
        return f"{r['split']}-{hashlib.blake2b(data, digest_size=8).hexdigest()}" if data else None

    return vqa_records(rows, source=source, qa_keys=qa_keys, image_id=image_id,
                       make_ref=lambda r: ImageRef(load_image_bytes, (parquet_image(r), opts.max_pixels)),
                       meta_of=lambda r: {"source": source, "modality": modality, "split": r["split"]})
