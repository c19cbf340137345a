"""llava: LLaVA / LLaVA-Med conversation files (JSON list or JSONL).

Record: {"id", "image": "rel/path.jpg" (or a list of paths), "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}; LLaVA-Med's extra keys (domain,
type, fig_caption, ...) are kept in the metadata. The text of a sample is its first answer.
Image paths are relative to --image-root (default: the file's folder) and must stay inside it
(``outside_root`` otherwise); a record whose id is not a string or number, or whose image field
holds something other than paths, is ``bad_row``.

Keys are ``<source>-<id>``: the record's own id (LLaVA-Med's figure ids, or the record's position when
it has none), never derived from the image path; the image paths are kept in ``meta.image_names`` as
the release names them. Failing records are named ``record N`` (JSON, 0-based) or ``line N`` (JSONL),
with ``(id ...)`` once the id is known to be usable; an unforeseen exception while handling a record is
that record's ``error`` skip.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import (BadField, SourceError, each_row, file_ref, image_root, json_records, path_list,
                               record_id, record_label, resolve_inside, text_field)
from data_prep.sources.dicom import dicom_options
from data_prep.writer import Record, Rejected
from vlm.data.schema import sanitize_key

ROLES = {"human", "gpt", "user", "assistant", "system"}


def read(opts):
    rows = json_records(opts.input, "a LLaVA file is a JSON list of records")
    if rows and not any(isinstance(r, dict) and "conversations" in r for _, r in rows[:100]):
        raise SourceError(f"{opts.input}: no 'conversations' key in the first records; is this a LLaVA file?")
    root = image_root(opts, Path(opts.input).parent)
    dcm = dicom_options(opts)  # validates --window before anything is written (.dcm images)

    def row_item(label, where, i, r):
        rid = record_id(where, i, r)
        if isinstance(rid, Rejected):
            return rid
        conv = r.get("conversations")
        if not isinstance(conv, list) or not conv or not all(
                isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str) for t in conv):
            return Rejected("bad_conversation", label)
        images = r.get("image")
        if images is None or images == "" or images == []:
            return Rejected("text_only", label)
        try:
            images = path_list(images, "image")
            modality, split = text_field(r, "modality"), text_field(r, "split")
        except BadField as e:
            return Rejected("bad_row", label, str(e))
        paths = [resolve_inside(root, x, opts) for x in images]
        if any(p is None for p in paths):
            return Rejected("outside_root", label)
        meta = {k: v for k, v in r.items() if k not in ("image", "conversations", "id")}
        meta.update({"source": opts.source_name or "llava", "modality": modality or opts.modality or "unknown",
                     "split": split or opts.split or "train", "conversations": conv,
                     "image_names": images})
        answer = next((t["value"] for t in conv if t["from"] in ("gpt", "assistant")), None)
        key = sanitize_key(f"{meta['source']}-{rid}")
        return Record(key, [file_ref(p, x, opts, dcm) for p, x in zip(paths, images)], answer, meta, label)

    # one record's unforeseen exception is its error skip (each_row), named as its other skips are
    labelled = ((record_label(where, i, r), where, i, r) for i, (where, r) in enumerate(rows))
    return each_row(labelled, row_item), len(rows)
