"""llava: LLaVA / LLaVA-Med conversation files (JSON list or JSONL).

Record: {"id", "image": "rel/path.jpg" (or a list of paths), "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}; LLaVA-Med's extra keys (domain,
type, fig_caption, ...) are kept in the metadata. The text of a sample is its first answer.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import SourceError, image_root, load_json, load_table
from data_prep.sources.pairs import image_ref
from data_prep.writer import Record, Rejected
from vlm.data.schema import sanitize_key

ROLES = {"human", "gpt", "user", "assistant", "system"}


def _records(path) -> list:
    if str(path).endswith((".jsonl", ".ndjson")):
        return load_table(path)[1]
    data = load_json(path, "--input")
    if not isinstance(data, list):
        raise SourceError(f"{path}: a LLaVA file is a JSON list of records")
    return data


def read(opts):
    rows = _records(opts.input)
    if rows and not any(isinstance(r, dict) and "conversations" in r for r in rows[:100]):
        raise SourceError(f"{opts.input}: no 'conversations' key in the first records; is this a LLaVA file?")
    root = image_root(opts, Path(opts.input).parent)

    def gen():
        for i, r in enumerate(rows):
            label = f"record {i} (id {r.get('id')})" if isinstance(r, dict) else f"record {i}"
            if not isinstance(r, dict) or "__bad__" in r:
                yield Rejected("bad_row", label)
                continue
            conv = r.get("conversations")
            if not isinstance(conv, list) or not conv or not all(
                    isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str) for t in conv):
                yield Rejected("bad_conversation", label)
                continue
            images = r.get("image")
            if not images:
                yield Rejected("text_only", label)
                continue
            images = images if isinstance(images, list) else [images]
            meta = {k: v for k, v in r.items() if k not in ("image", "conversations", "id")}
            meta.update({"source": opts.source_name or "llava", "modality": r.get("modality") or opts.modality or "unknown",
                         "split": r.get("split") or opts.split or "train", "conversations": conv,
                         "image_names": [str(x) for x in images]})
            answer = next((t["value"] for t in conv if t["from"] in ("gpt", "assistant")), None)
            key = sanitize_key(f"{meta['source']}-{r.get('id', i)}")
            refs = [image_ref(root / str(x), opts) for x in images]
            yield Record(key, refs, answer, meta, label)

    return gen(), len(rows)
