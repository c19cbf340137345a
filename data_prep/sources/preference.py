"""preference: image-grounded preference pairs for DPO-style tuning (JSONL, or a JSON list).

Record::

    {"id"?: str | int,
     "image": "rel/path.jpg" | "images": ["a.jpg", "b.jpg"],    (either key; a path or a list of paths)
     "prompt": "..." | "conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...],
     "chosen": "...", "rejected": "..."}

``prompt`` is one user turn; ``conversations`` is a multi-turn prompt in LLaVA's turn format that ends
with the human (user) turn the two responses answer. Exactly one of the two is given, and exactly one of
``image`` / ``images``. Other keys (modality, split, domain, the annotator's notes, ...) are kept in the
metadata, as the llava reader keeps them.

A sample: the first image primary, the others as views (``view1.png``, ...; ``meta.num_images``), exactly
as llava; ``.txt`` is the chosen response; ``.json`` holds ``source``, ``modality``, ``split``,
``image_names`` (as the record names them), ``conversations`` (the prompt as LLaVA turns; when no turn
holds an ``<image>`` placeholder, one ``<image>\\n`` per image is put before the first human turn's text),
``chosen`` and ``rejected`` (as given, not stripped). Keys are ``<source>-<id>``: the record's id, or its
position (0-based) when it has none.

Skips, each counted by reason and named ``line N`` (JSONL) / ``record N`` (JSON, 0-based) with ``(id ...)``
once the id is usable; no detail quotes a path:

- ``bad_row``: not an object (or not JSON), an id that is not a string or number, a field of the wrong
  type (``prompt``, ``chosen``, ``rejected``, ``modality``, ``split`` not a string; an image field holding
  something other than paths), both ``image`` and ``images``, both ``prompt`` and ``conversations``;
- ``bad_conversation``: no prompt at all, a blank prompt, turns that are not ``{"from", "value"}`` objects
  with a known role and a string value, a conversation that does not end with a non-blank human turn, an
  empty answer turn inside it;
- ``missing_response``: no (or a null) ``chosen`` or ``rejected``;
- ``empty_response``: ``chosen`` or ``rejected`` blank;
- ``identical_pair``: ``chosen`` equals ``rejected`` once both are stripped (nothing to learn from);
- ``text_only``: no image;
- ``image_token_mismatch``: ``<image>`` placeholders in the prompt whose count differs from the number of
  images, or a placeholder in an answer turn, in ``chosen`` or in ``rejected``;
- ``outside_root``: an image path that leaves ``--image-root`` (default: the input file's folder);
- and, from the writer, the image reasons every format has (``missing_image``, ``bad_image``, ...).

Checks run in that order: a record is counted once, under its first failing check.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.sources import (BadField, SourceError, each_row, file_ref, image_root, json_records, path_list,
                               record_id, record_label, resolve_inside, text_field, type_name)
from data_prep.sources.dicom import dicom_options
from data_prep.sources.llava import ROLES
from data_prep.writer import Record, Rejected
from vlm.data.schema import sanitize_key

IMAGE = "<image>"  # LLaVA's placeholder, the default chat.image_token (vlm.data.chat.IMAGE_TOKEN)
HUMAN, ANSWER = ("human", "user"), ("gpt", "assistant")
CONSUMED = ("id", "image", "images", "prompt", "conversations", "chosen", "rejected")


def _given(r: dict, key: str) -> bool:
    """A key counts as given unless absent, null, "" or []."""
    return r.get(key) not in (None, "", [])


class _Skip(Exception):
    """One record's skip: ``reason`` and a detail without path text."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _check_types(r: dict) -> list[str]:
    """Every field's type, before anything else is judged (``BadField``); returns the image paths ([] for none)."""
    for key in ("prompt", "chosen", "rejected", "modality", "split"):
        if r.get(key) is not None and not isinstance(r[key], str):
            raise BadField(f"{key} is {type_name(r[key])}, not a string")
    if r.get("prompt") is not None and r.get("conversations") is not None:
        raise BadField("prompt and conversations are both given; use one")
    if _given(r, "image") and _given(r, "images"):
        raise BadField("image and images are both given; use one")
    key = "images" if _given(r, "images") else "image"
    return path_list(r[key], key) if _given(r, key) else []


def _prompt(r: dict) -> list[dict]:
    """The prompt as LLaVA turns (copies: the record is not changed), or ``_Skip("bad_conversation")``."""
    if r.get("conversations") is None:
        if r.get("prompt") is None:
            raise _Skip("bad_conversation", "no prompt or conversations")
        if not r["prompt"].strip():
            raise _Skip("bad_conversation", "blank prompt")
        return [{"from": "human", "value": r["prompt"]}]
    conv = r["conversations"]
    if not isinstance(conv, list) or not conv:
        raise _Skip("bad_conversation", "no turns" if isinstance(conv, list)
                    else f"conversations is {type_name(conv)}, not a list of turns")
    for i, t in enumerate(conv):
        if not (isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str)):
            raise _Skip("bad_conversation", f"turn {i} is not an object with a known from and a string value")
        if t["from"] in ANSWER and not t["value"].strip():
            raise _Skip("bad_conversation", f"turn {i} is an empty answer")
    if conv[-1]["from"] not in HUMAN or not conv[-1]["value"].strip():
        raise _Skip("bad_conversation", "the last turn is not a human turn with text")
    return [dict(t) for t in conv]


def _responses(r: dict) -> tuple[str, str]:
    """(chosen, rejected) as given (their types are checked already), or a ``_Skip``."""
    for key in ("chosen", "rejected"):
        if r.get(key) is None:
            raise _Skip("missing_response", f"no {key}")
    chosen, rejected = r["chosen"], r["rejected"]
    for key, v in (("chosen", chosen), ("rejected", rejected)):
        if not v.strip():
            raise _Skip("empty_response", f"{key} is blank")
    if chosen.strip() == rejected.strip():
        raise _Skip("identical_pair")
    return chosen, rejected


def _place_images(conv: list[dict], chosen: str, rejected: str, n: int) -> list[dict]:
    """``conv`` with its image placeholders checked against ``n`` images: none at all -> one ``<image>\\n``
    per image before the first human turn's text; otherwise exactly ``n``, none in an answer."""
    for i, t in enumerate(conv):
        if t["from"] in ANSWER and IMAGE in t["value"]:
            raise _Skip("image_token_mismatch", f"turn {i}: an image placeholder in an answer turn")
    for key, v in (("chosen", chosen), ("rejected", rejected)):
        if IMAGE in v:
            raise _Skip("image_token_mismatch", f"an image placeholder in {key}")
    found = sum(t["value"].count(IMAGE) for t in conv)
    if found == 0:
        first = next(i for i, t in enumerate(conv) if t["from"] in HUMAN)  # _prompt: the last turn is human
        conv[first]["value"] = (IMAGE + "\n") * n + conv[first]["value"]
    elif found != n:
        raise _Skip("image_token_mismatch", f"{found} placeholder(s) for {n} image(s)")
    return conv


def read(opts):
    rows = json_records(opts.input, "a preference file is JSONL or a JSON list of records")
    if rows and not any(isinstance(r, dict) and ("chosen" in r or "rejected" in r) for _, r in rows[:100]):
        raise SourceError(f"{opts.input}: no 'chosen' or 'rejected' key in the first records; is this a preference "
                          "file?")
    root = image_root(opts, Path(opts.input).parent)
    dcm = dicom_options(opts)  # validates --window before anything is written (.dcm images)
    source = opts.source_name or "preference"

    def row_item(label, where, i, r):
        rid = record_id(where, i, r)
        if isinstance(rid, Rejected):
            return rid
        try:
            images = _check_types(r)
            modality, split = text_field(r, "modality"), text_field(r, "split")
            conv = _prompt(r)
            chosen, rejected = _responses(r)
            if not images:
                raise _Skip("text_only")
            conv = _place_images(conv, chosen, rejected, len(images))
        except BadField as e:
            return Rejected("bad_row", label, str(e))
        except _Skip as e:
            return Rejected(e.reason, label, e.detail)
        paths = [resolve_inside(root, x, opts) for x in images]
        if any(p is None for p in paths):
            return Rejected("outside_root", label)
        meta = {k: v for k, v in r.items() if k not in CONSUMED}
        meta.update({"source": source, "modality": modality or opts.modality or "unknown",
                     "split": split or opts.split or "train", "image_names": images, "conversations": conv,
                     "chosen": chosen, "rejected": rejected})
        return Record(sanitize_key(f"{source}-{rid}"), [file_ref(p, x, opts, dcm) for p, x in zip(paths, images)],
                      chosen, meta, label)

    # one record's unforeseen exception is its error skip (each_row), named as its other skips are
    labelled = ((record_label(where, i, r), where, i, r) for i, (where, r) in enumerate(rows))
    return each_row(labelled, row_item), len(rows)
