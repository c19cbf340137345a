"""r2gen: report generation sets in R2Gen's annotation.json layout (IU X-Ray, MIMIC-CXR).

``{"train": [...], "val": [...], "test": [...]}``, records ``{"id", "report", "image_path": [...]}``
(MIMIC-CXR records also carry study_id / subject_id). One sample per study; its views become
``.png``/``.jpg``, ``.view1.*``, ... Images are relative to --image-root (default: ``images/``
beside the annotation, R2Gen's layout). --split selects splits (default: all).
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import SourceError, load_json
from data_prep.writer import ImageRef, Record, Rejected, load_image_file
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
    default_root = Path(opts.input).parent / "images"
    root = Path(opts.image_root) if opts.image_root else default_root
    if not root.is_dir():
        raise SourceError(f"image folder not found: {root} (set --image-root)")
    source = opts.source_name or "r2gen"
    rows = [(s, r) for s in wanted for r in ann[s]]

    def gen():
        for i, (split, r) in enumerate(rows):
            label = f"{split}[{i}] id {r.get('id') if isinstance(r, dict) else '?'}"
            if not isinstance(r, dict) or "id" not in r:
                yield Rejected("bad_row", label)
                continue
            report, paths = r.get("report"), r.get("image_path")
            if not isinstance(report, str) or not report.strip():
                yield Rejected("missing_text", label)
                continue
            if not paths:
                yield Rejected("missing_image_path", label)
                continue
            paths = paths if isinstance(paths, list) else [paths]
            meta = {"source": source, "modality": opts.modality or "chest x-ray",
                    "split": split, "id": r["id"], "image_names": paths}
            meta.update({k: r[k] for k in ("study_id", "subject_id") if k in r})
            refs = [ImageRef(load_image_file, (str(root / p), opts.max_pixels)) for p in paths]
            yield Record(sanitize_key(f"{source}-{r['id']}"), refs, report.strip(), meta, label)

    return gen(), len(rows)
