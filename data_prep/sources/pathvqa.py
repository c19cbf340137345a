"""pathvqa: PathVQA as the Hugging Face parquet (file or folder) or the original release's
``qas/<split>/<split>_qa.pkl`` with images in ``images/<split>/<image>.jpg``.

The pkl is read with a restricted unpickler that accepts only plain lists, dicts, strings and
numbers: a pickle that names any class or function is refused, never executed.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import SourceError, parquet_vqa_records, vqa_records
from vlm.data.formats import FormatError, load_plain_pickle as _load_plain_pickle
from data_prep.writer import ImageRef, load_image_file

QA_KEYS = ("qid", "question", "answer", "answer_type")


def load_plain_pickle(path) -> object:
    try:
        return _load_plain_pickle(path)
    except FormatError as e:
        raise SourceError(str(e)) from None


def read(opts):
    src = opts.source_name or "pathvqa"
    p = Path(opts.input)
    if p.suffix == ".parquet" or p.is_dir():
        return parquet_vqa_records(opts, src, "histopathology", QA_KEYS)
    data = load_plain_pickle(p)
    if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
        raise SourceError(f"{p}: expected a list of {{'image', 'question', 'answer'}} records")
    split = p.stem.split("_")[0]
    split = {"validation": "val"}.get(split, split)
    root = Path(opts.image_root) if opts.image_root else p.parent.parent.parent / "images" / split
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root} (set --image-root)")
    for i, r in enumerate(data):
        if isinstance(r, dict):
            r.setdefault("qid", i)
            if "image" not in r and "img_id" in r:
                r["image"] = r["img_id"]

    def path_of(r):
        name = str(r["image"])
        return root / (name if Path(name).suffix else name + ".jpg")

    return vqa_records(data, source=src, qa_keys=QA_KEYS,
                       image_id=lambda r: str(r["image"]) if r.get("image") else None,
                       make_ref=lambda r: ImageRef(load_image_file, (str(path_of(r)), opts.max_pixels)),
                       meta_of=lambda r: {"source": src, "modality": "histopathology", "split": split})
