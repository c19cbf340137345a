"""pathvqa: PathVQA as the Hugging Face parquet (file or folder) or the original release's
``qas/<split>/<split>_qa.pkl`` with images in ``images/<split>/<image>.jpg``.

The pkl is read with a restricted unpickler that accepts only plain lists, dicts, strings and
numbers: a pickle that names any class or function is refused, never executed. Image names must stay
inside the image folder (``outside_root`` otherwise); a record whose image, question or answer has the
wrong type is ``bad_row``. Keys are ``pathvqa-<image>`` (``pathvqa-test_0001``): the release's public
image ids. Records are named ``record N`` (0-based position in the pkl; parquet: ``<split> row <qid>``);
an unforeseen exception while handling a record (or building its image's sample) is that record's
``error`` skip.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import (SourceError, file_ref, parquet_vqa_records, resolve_inside, text_field, type_name,
                               vqa_records)
from vlm.data.formats import FormatError, load_plain_pickle as _load_plain_pickle

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
    if not isinstance(data, list) or (data and not any(isinstance(r, dict) for r in data[:100])):
        raise SourceError(f"{p}: expected a list of {{'image', 'question', 'answer'}} records, "
                          f"found {type_name(data) if not isinstance(data, list) else 'no records'}")
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

    def ref(r):
        name = text_field(r, "image", numbers=True)
        rel = name if Path(name).suffix else name + ".jpg"
        path = resolve_inside(root, rel, opts)
        return file_ref(path, rel, opts) if path is not None else None

    return vqa_records([(f"record {i}", r) for i, r in enumerate(data)], source=src, qa_keys=QA_KEYS,
                       image_id=lambda r: text_field(r, "image", numbers=True), make_ref=ref,
                       meta_of=lambda r: {"source": src, "modality": "histopathology", "split": split})
