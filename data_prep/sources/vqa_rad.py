"""vqa_rad: VQA-RAD as released: ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``, or
the Hugging Face parquet (a file or folder; split from the file name).

Official JSON: test = phrase_type test_freeform + test_para (451 questions), the rest train.
--split train|test|all (default all). Parquet rows get qid = their index within the split.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import SourceError, load_json, parquet_vqa_records, vqa_records
from vlm.data.formats import vqa_rad_split
from data_prep.writer import ImageRef, load_image_file

QA_KEYS = ("qid", "question", "answer", "answer_type", "question_type", "phrase_type", "image_organ")


def read(opts):
    src = opts.source_name or "vqa_rad"
    wanted = None if opts.split in (None, "all") else set(opts.split.split(","))
    if str(opts.input).endswith(".parquet") or Path(opts.input).is_dir():
        return parquet_vqa_records(opts, src, opts.modality or "radiology", QA_KEYS)
    data = load_json(opts.input, "--input")
    if not isinstance(data, list) or (data and not {"image_name", "question", "answer", "phrase_type"} <= set(data[0])):
        raise SourceError(f"{opts.input}: expected VQA-RAD's list of records with image_name, question, answer, "
                          "phrase_type")
    root = Path(opts.image_root) if opts.image_root else Path(opts.input).parent / "VQA_RAD Image Folder"
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root} (set --image-root)")
    rows = [r for r in data if not wanted or vqa_rad_split(r) in wanted]
    return vqa_records(
        rows, source=src, qa_keys=QA_KEYS,
        # one image can be asked about in both splits: keep them as separate samples
        image_id=lambda r: f"{vqa_rad_split(r)}-{Path(r['image_name']).stem}" if r.get("image_name") else None,
        make_ref=lambda r: ImageRef(load_image_file, (str(root / r["image_name"]), opts.max_pixels)),
        meta_of=lambda r: {"source": src, "modality": opts.modality or "radiology", "organ": r.get("image_organ"),
                           "split": vqa_rad_split(r)})
