"""slake: SLAKE's official release: train.json / validate.json (or validation.json) / test.json
and ``imgs/<img_name>`` (img_name like ``xmlab102/source.jpg``). One sample per image; its
questions become a multi-turn conversation and ``meta.qa`` (qid, answer_type, content_type, ...).
--lang en (default), zh or all; --split defaults to the file's own name.

Image names must stay inside the image root (``outside_root`` otherwise). A record that is not an
object, has no q_lang (when a language is chosen), or whose question, answer or img_name has the
wrong type is ``bad_row``; a repeated question of the same image is ``duplicate_row``. Keys are
``slake-<img_name>`` (``xmlab102_source``): SLAKE's own public image ids, kept as released.
Records are named ``record N`` (0-based position in the file); an unforeseen exception while handling a
record (or building its image's sample) is that record's ``error`` skip (``data_prep.sources.vqa_records``).
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import (BadRow, SourceError, file_ref, image_root, load_json, resolve_inside, text_field,
                               vqa_records)

QA_KEYS = ("qid", "question", "answer", "answer_type", "content_type", "base_type", "q_lang", "location",
           "modality")
REQUIRED = {"img_name", "question", "answer"}


def add_arguments(p):
    p.add_argument_group("slake").add_argument("--lang", default="en", choices=["en", "zh", "all"],
                                               help="question language (default: en, as papers report)")


def _str(v):
    return v if isinstance(v, str) else None


def read(opts):
    data = load_json(opts.input, "--input")
    if not isinstance(data, list) or (data and not any(isinstance(r, dict) and REQUIRED <= set(r) for r in data[:100])):
        raise SourceError(f"{opts.input}: expected SLAKE's list of records with img_name, question, answer")
    lang = getattr(opts, "lang", "en")
    rows = [(f"record {i}", BadRow(f"record {i}", "no q_lang") if isinstance(r, dict) and lang != "all"
             and r.get("q_lang") is None else r)
            for i, r in enumerate(data) if lang == "all" or not isinstance(r, dict) or r.get("q_lang") in (lang, None)]
    root = image_root(opts, Path(opts.input).parent / "imgs")
    name = Path(opts.input).stem
    split = opts.split or {"validate": "val", "validation": "val", "test": "test"}.get(name, "train")
    src = opts.source_name or "slake"

    def ref(r):
        path = resolve_inside(root, r["img_name"], opts)
        return file_ref(path, r["img_name"], opts) if path is not None else None

    return vqa_records(
        rows, source=src, qa_keys=QA_KEYS, image_id=lambda r: text_field(r, "img_name"), make_ref=ref,
        meta_of=lambda r: {"source": src, "modality": _str(r.get("modality")) or opts.modality or "unknown",
                           "split": split, "location": r.get("location"), "img_id": r.get("img_id")})
