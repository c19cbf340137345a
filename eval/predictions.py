"""Prediction files: JSONL, one ``{"<id key>": ..., "text": "..."}`` a line (LLaVA's answer files).

Ids are matched as strings, so ``1`` and ``"1"`` are the same question. Missing, duplicated or
unknown ids are an error that lists them, unless missing ones are allowed (scored as wrong).
"""
from __future__ import annotations

import json
from pathlib import Path


class PredictionError(ValueError):
    pass


def _listing(ids, limit: int = 20) -> str:
    ids = list(ids)
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def read_predictions(path: str | Path, id_key: str, known_ids: list, allow_missing: bool = False
                     ) -> tuple[dict[str, str], list[str]]:
    """-> ({id: text}, missing ids). Raises PredictionError naming the file and the bad ids."""
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"--predictions not found: {path}")
    preds: dict[str, str] = {}
    dups: list[str] = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a BOM is fine
    except UnicodeDecodeError as e:
        at = raw[:e.start].count(b"\n") + 1
        raise PredictionError(f"{path}:{at}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028/U+0085: splitlines() would cut
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PredictionError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or id_key not in rec or "text" not in rec:
            raise PredictionError(f"{path}:{n}: each line needs {id_key!r} and 'text'")
        key = str(rec[id_key])
        if key in preds:
            dups.append(key)
        preds[key] = "" if rec["text"] is None else str(rec["text"])
    known = [str(i) for i in known_ids]
    known_set = set(known)
    unknown = [k for k in preds if k not in known_set]
    missing = [k for k in known if k not in preds]
    problems = []
    if dups:
        problems.append(f"duplicated ids: {_listing(dups)}")
    if unknown:
        problems.append(f"ids not in the benchmark: {_listing(unknown)}")
    if missing and not allow_missing:
        problems.append(f"missing ids: {_listing(missing)} (pass --allow-missing to score them as wrong)")
    if problems:
        raise PredictionError(f"{path}: " + "; ".join(problems))
    return preds, missing


def format_stats(raw: list[str]) -> dict:
    """How the raw outputs state their answers (vlm.grpo.answer_format): ``format_rate`` (any form but plain) and
    ``answer_formats`` (counts per form)."""
    from vlm.grpo import answer_format

    formats = [answer_format(r) for r in raw]
    return {"format_rate": sum(f != "plain" for f in formats) / max(1, len(formats)),
            "answer_formats": {f: formats.count(f) for f in sorted(set(formats))}}


def write_scored(args, result: dict, table: str, markdown, t0: float, missing) -> dict:
    """The score commands' common end: the missing-prediction warning, then OUT (JSON, with the predictions file
    and the seconds taken), OUT's stem + .questions.csv (``table``) and + .md (``markdown(result)``), atomically."""
    import json
    import logging
    import time
    from pathlib import Path

    from vlm.utils import atomic_write_text

    if missing:
        logging.getLogger("eval.vqa").warning("%d questions had no prediction and were scored as wrong", len(missing))
    result["predictions"] = str(args.predictions)
    result["seconds"] = round(time.time() - t0, 3)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".questions.csv"), table)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    return result
