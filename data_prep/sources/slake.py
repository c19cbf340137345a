"""slake: SLAKE's official release: train.json / validate.json (or validation.json) / test.json
and ``imgs/<img_name>`` (img_name like ``xmlab102/source.jpg``). One sample per image; its
questions become a multi-turn conversation and ``meta.qa`` (qid, answer_type, content_type, ...).
--lang en (default), zh or all; --split defaults to the file's own name.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import SourceError, image_root, load_json, vqa_records
from data_prep.writer import ImageRef, load_image_file

QA_KEYS = ("qid", "question", "answer", "answer_type", "content_type", "base_type", "q_lang", "location",
           "modality")


def add_arguments(p):
    p.add_argument_group("slake").add_argument("--lang", default="en", choices=["en", "zh", "all"],
                                               help="question language (default: en, as papers report)")


def read(opts):
    data = load_json(opts.input, "--input")
    if not isinstance(data, list) or (data and not {"img_name", "question", "answer"} <= set(data[0])):
        raise SourceError(f"{opts.input}: expected SLAKE's list of records with img_name, question, answer")
    lang = getattr(opts, "lang", "en")
    rows = [r for r in data if lang == "all" or r.get("q_lang") == lang]
    root = image_root(opts, Path(opts.input).parent / "imgs")
    name = Path(opts.input).stem
    split = opts.split or {"validate": "val", "validation": "val", "test": "test"}.get(name, "train")

    return vqa_records(
        rows, source=opts.source_name or "slake", qa_keys=QA_KEYS,
        image_id=lambda r: r.get("img_name") or None,
        make_ref=lambda r: ImageRef(load_image_file, (str(root / r["img_name"]), opts.max_pixels)),
        meta_of=lambda r: {"source": opts.source_name or "slake", "modality": r.get("modality") or opts.modality or "unknown",
                           "split": split, "location": r.get("location"), "img_id": r.get("img_id")})
