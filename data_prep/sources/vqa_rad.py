"""vqa_rad: VQA-RAD as released: ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``, or
the Hugging Face parquet (a file or folder; split from the file name).

Official JSON: test = phrase_type test_freeform + test_para (451 questions), the rest train.
--split train|test|all (default all). Parquet rows get qid = their index within the split.

Image names must stay inside the image folder (``outside_root`` otherwise); a record that is not an
object, or whose question, answer (a string or number) or image_name has the wrong type is ``bad_row``;
a repeated question of the same image is ``duplicate_row``. Keys are ``vqa_rad-<split>-<image stem>``
(``vqa_rad-test-synpic1``): the release's public image names, kept as released. Records are named
``record N`` (0-based position in the file; parquet: ``<split> row <qid>``); an unforeseen exception
while handling a record (or building its image's sample) is that record's ``error`` skip.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import (BadRow, SourceError, file_ref, load_json, parquet_vqa_records, resolve_inside,
                               text_field, type_name, vqa_records)
from vlm.data.formats import vqa_rad_split

QA_KEYS = ("qid", "question", "answer", "answer_type", "question_type", "phrase_type", "image_organ")
REQUIRED = {"image_name", "question", "answer", "phrase_type"}


def read(opts):
    src = opts.source_name or "vqa_rad"
    wanted = None if opts.split in (None, "all") else set(opts.split.split(","))
    if str(opts.input).endswith(".parquet") or Path(opts.input).is_dir():
        return parquet_vqa_records(opts, src, opts.modality or "radiology", QA_KEYS)
    data = load_json(opts.input, "--input")
    if not isinstance(data, list) or (data and not any(isinstance(r, dict) and REQUIRED <= set(r) for r in data[:100])):
        raise SourceError(f"{opts.input}: expected VQA-RAD's list of records with image_name, question, answer, "
                          "phrase_type")
    root = Path(opts.image_root) if opts.image_root else Path(opts.input).parent / "VQA_RAD Image Folder"
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root} (set --image-root)")
    rows = []
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            r = BadRow(f"record {i}", f"{type_name(r)}, not an object")
        elif not isinstance(r.get("phrase_type"), (str, type(None))):  # the split is read from it
            r = BadRow(f"record {i}", f"phrase_type is {type_name(r['phrase_type'])}, not a string")
        elif wanted and vqa_rad_split(r) not in wanted:
            continue
        rows.append((f"record {i}", r))

    def image_id(r):  # one image can be asked about in both splits: keep them as separate samples
        name = text_field(r, "image_name")
        return f"{vqa_rad_split(r)}-{Path(name).with_suffix('')}" if name else None

    def ref(r):
        path = resolve_inside(root, r["image_name"], opts)
        return file_ref(path, r["image_name"], opts) if path is not None else None

    organ = lambda r: r.get("image_organ") if isinstance(r.get("image_organ"), str) else None  # noqa: E731
    return vqa_records(
        rows, source=src, qa_keys=QA_KEYS, image_id=image_id, make_ref=ref,
        meta_of=lambda r: {"source": src, "modality": opts.modality or "radiology", "organ": organ(r),
                           "split": vqa_rad_split(r)})
