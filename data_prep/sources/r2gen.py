"""r2gen: report generation sets in R2Gen's annotation.json layout (IU X-Ray, MIMIC-CXR).

``{"train": [...], "val": [...], "test": [...]}``, records ``{"id", "report", "image_path": [...]}``
(MIMIC-CXR records also carry study_id / subject_id). One sample per study; its views become
``.png``/``.jpg``, ``.view1.*``, ... Images are relative to --image-root (default: ``images/``
beside the annotation, R2Gen's layout) and must stay inside it (``outside_root`` otherwise).
--split selects splits (default: all). An id that is not a string or number, a report that is not a
string, or an image_path that holds anything but paths is ``bad_row``.

Keys are ``<source>-<id>`` with the annotation's own id (IU X-Ray's ``CXR2384_IM-0942``, MIMIC-CXR's
dicom_id): these are the releases' published, de-identified record ids that predictions are joined on
(``eval.report``), never built from image paths, so they are kept as given. MIMIC-CXR's image paths
(``p10/p10000032/s5.../...jpg``) hold its subject and study ids: they stay in ``meta.image_names``
beside ``subject_id``/``study_id`` (the same published research ids), and never enter a key or a
skip detail (rows are named ``train[3] id ...``). An unforeseen exception while handling a record is
that record's ``error`` skip.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import (BadField, SourceError, each_row, file_ref, load_json, path_list, resolve_inside,
                               type_name)
from data_prep.writer import Record, Rejected
from vlm.data.schema import sanitize_key

SPLITS = ("train", "val", "test")


def read(opts):
    ann = load_json(opts.input, "--input")
    if not isinstance(ann, dict) or not any(s in ann for s in SPLITS):
        raise SourceError(f"{opts.input}: expected R2Gen's layout {{'train': [...], 'val': [...], 'test': [...]}}")
    wanted = [s for s in SPLITS if s in ann] if opts.split in (None, "all") else opts.split.split(",")
    for s in wanted:
        if s not in ann:
            raise SourceError(f"{opts.input}: no split {s!r}; it has {[k for k in ann]}")
        if not isinstance(ann[s], list):
            raise SourceError(f"{opts.input}: split {s!r} is {type_name(ann[s])}, not a list of records")
    default_root = Path(opts.input).parent / "images"
    root = Path(opts.image_root) if opts.image_root else default_root
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root} (set --image-root)")
    source = opts.source_name or "r2gen"
    rows = [(s, i, r) for s in wanted for i, r in enumerate(ann[s])]

    def label_of(split, i, r):  # "train[3] id CXR2384_IM-0942"
        rid = r.get("id") if isinstance(r, dict) else None
        return f"{split}[{i}]" + (f" id {str(rid)[:80]}" if isinstance(rid, (str, int)) else "")

    def row_item(label, split, r):
        if not isinstance(r, dict) or "id" not in r:
            return Rejected("bad_row", label, "no id" if isinstance(r, dict) else f"{type_name(r)}, not an object")
        rid = r["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            return Rejected("bad_row", label, f"id is {type_name(rid)}, not a string")
        report, paths = r.get("report"), r.get("image_path")
        if report is not None and not isinstance(report, str):
            return Rejected("bad_row", label, f"report is {type_name(report)}, not a string")
        if not report or not report.strip():
            return Rejected("missing_text", label)
        if paths is None or paths == "" or paths == []:
            return Rejected("missing_image_path", label)
        try:
            paths = path_list(paths, "image_path")
        except BadField as e:
            return Rejected("bad_row", label, str(e))
        resolved = [resolve_inside(root, p, opts) for p in paths]
        if any(p is None for p in resolved):
            return Rejected("outside_root", label)
        meta = {"source": source, "modality": opts.modality or "chest x-ray",
                "split": split, "id": rid, "image_names": paths}
        meta.update({k: r[k] for k in ("study_id", "subject_id") if k in r})
        refs = [file_ref(p, rel, opts) for p, rel in zip(resolved, paths)]
        return Record(sanitize_key(f"{source}-{rid}"), refs, report.strip(), meta, label)

    # one record's unforeseen exception is its error skip (each_row), named by split, position and id
    return each_row(((label_of(s, i, r), s, r) for s, i, r in rows), row_item), len(rows)
