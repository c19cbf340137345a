"""Readers of the official benchmark and data set formats, shared by data_prep (to shard them)
and eval (to score against them), so both wings agree on splits and question ids.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

# VQA-RAD's official file: test = these phrase types (451 questions), the rest is train (1,797).
VQA_RAD_FILE = "VQA_RAD Dataset Public.json"
VQA_RAD_TEST_PHRASES = frozenset({"test_freeform", "test_para"})
YES_NO = frozenset({"yes", "no"})


class FormatError(ValueError):
    """An input file that does not have the layout its format promises."""


def vqa_rad_split(record: dict) -> str:
    return "test" if record.get("phrase_type") in VQA_RAD_TEST_PHRASES else "train"


def load_json_file(path, what: str = "file"):
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is accepted")


def load_plain_pickle(path) -> object:
    """Unpickle lists, dicts, strings and numbers only: a pickle naming any class or function is refused."""
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"file not found: {p}")
    try:
        return _PlainUnpickler(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise FormatError(f"{p}: not a plain-data pickle ({e})") from None


def parquet_split_name(path: Path) -> str:
    split = path.name.split("-")[0].split(".")[0]
    return {"validation": "val", "valid": "val"}.get(split, split)


def read_parquet_rows(path) -> list[tuple[str, list[dict]]]:
    """A parquet file or a folder of them (Hugging Face layout) -> [(split, rows)], in file-name order.

    Each row of a split gets ``qid`` = its index within that split (files concatenated in order):
    the question id both data_prep and eval use for these releases, which carry none.
    """
    p = Path(path)
    files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    if not files or not files[0].is_file():
        raise FormatError(f"no parquet files at {p}")
    by_split: dict[str, list[dict]] = {}
    for f in files:
        rows = read_parquet_file(f)
        part = by_split.setdefault(parquet_split_name(f), [])
        for r in rows:
            r["qid"] = len(part)
            part.append(r)
    return list(by_split.items())


def read_parquet_file(path) -> list[dict]:
    """One parquet file's rows; a file pyarrow cannot read is a FormatError naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise FormatError(f"{path}: cannot read parquet ({e})") from None


def parquet_image(row: dict, column: str = "image"):
    """The image bytes of a Hugging Face parquet row's image column ({'bytes', 'path'}, or bare bytes)."""
    img = row.get(column)
    if isinstance(img, dict):
        return img.get("bytes")
    return img if isinstance(img, (bytes, bytearray)) else None


def answer_type(record: dict, answer: str) -> str:
    """OPEN or CLOSED: the data set's own field where it has one, else yes/no answers are closed."""
    t = str(record.get("answer_type") or "").strip().upper()
    if t in ("OPEN", "CLOSED"):
        return t
    return "CLOSED" if str(answer).strip().lower() in YES_NO else "OPEN"
