"""Report preference pairs for DPO (train.preference), from sampled or reference reports.

    # sample-and-rank: N reports per study, scored against the reference, best vs worst
    python -m eval.report generate --checkpoint runs/sft --benchmark iu_xray --annotation data/iu_xray/annotation.json \\
        --split train --num-samples 8 --temperature 0.9 --out samples.jsonl
    python -m data_prep.preference_from_samples --annotation data/iu_xray/annotation.json --split train \\
        --samples samples.jsonl --rank-by rouge_l --out pairs.jsonl

    # report factuality: rejected = a report as it is, chosen = the same without its prior-exam sentences and
    # the sentences stating findings the reference does not have (the reference reports if --samples is omitted)
    python -m data_prep.preference_from_samples --annotation data/iu_xray/annotation.json --split train \\
        --edit --out pairs.jsonl

    # then, as for any preference file
    python -m data_prep.shards --format preference --input pairs.jsonl --image-root data/iu_xray/images --out shards/pairs

The annotation is R2Gen's layout (``{"train": [...], ...}`` of ``{"id", "report", "image_path"}``); a pair's
image is the study's first view (the one eval.report generate reports on), relative to the annotation's
``images/`` folder. Samples: JSONL of ``{"id", "text"}``, several lines per study, or ids ``ID#k`` (what
``eval.report generate --num-samples`` writes). ``--rank-by``: bleu_4 | rouge_l | cider (R2Gen's cleaning,
pycocoevalcap, per report) | factuality (fewest hallucinated findings + prior-exam sentences,
vlm/factuality.py); a study whose best and worst samples differ by less than ``--min-margin`` gives no pair.
``--edit``: vlm.factuality.remove_unsupported. Everything left out is counted by reason (sample rows:
bad_row, empty_sample, duplicate_sample; studies: unknown_study, fewer_than_two_samples, margin_below_min,
nothing_to_remove, nothing_left_after_edit); the output is written atomically, and a ``.stats.json`` beside
it holds the counts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from data_prep.sources import BadRow, SourceError, json_records, load_json, record_label, type_name
from vlm.utils import atomic_write_text, cli, setup_logging

log = logging.getLogger("data_prep.preference_from_samples")

DEFAULT_PROMPT = "Write the radiology report for this chest x-ray."  # configs/eval/prompts.yaml's report prompt


def load_studies(path, split: str) -> dict[str, dict]:
    """R2Gen annotation -> {id: {"report", "image"}} of one split; a malformed record is an error naming it."""
    ann = load_json(path, "--annotation")
    if not isinstance(ann, dict) or not isinstance(ann.get(split), list):
        raise SourceError(f"{path}: expected R2Gen's layout with a list under {split!r}")
    out = {}
    for i, r in enumerate(ann[split]):
        where = f"{path}: {split}[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("id"), (str, int)) or isinstance(r.get("id"), bool):
            raise SourceError(f"{where}: not a record with a string id")
        report, images = r.get("report"), r.get("image_path")
        if not isinstance(report, str) or not report.strip():
            raise SourceError(f"{where} (id {r['id']}): no report")
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            raise SourceError(f"{where} (id {r['id']}): image_path is {type_name(images)}, not a list of paths")
        out[str(r["id"])] = {"report": report, "image": images[0]}
    return out


def load_samples(path) -> tuple[dict[str, list[str]], Counter]:
    """Samples JSONL -> {study id: [texts, in file order, duplicates dropped]}, and the rows skipped by reason."""
    samples: dict[str, list[str]] = {}
    skipped: Counter = Counter()
    for i, (where, r) in enumerate(json_records(path, 'JSONL of {"id", "text"}', "--samples")):
        rid = r.get("id") if isinstance(r, dict) else None
        if isinstance(r, BadRow) or not isinstance(r, dict) or isinstance(rid, bool) or \
                not isinstance(rid, (str, int)) or not isinstance(r.get("text"), str):
            skipped["bad_row"] += 1
            why = r.detail if isinstance(r, BadRow) else 'not an {"id": string or number, "text": string} object'
            log.warning("%s: %s: %s, skipped", path, record_label(where, i, r), why)
            continue
        sid = str(rid).split("#")[0]
        texts = samples.setdefault(sid, [])
        if not r["text"].strip():
            skipped["empty_sample"] += 1
        elif r["text"] in texts:
            skipped["duplicate_sample"] += 1
        else:
            texts.append(r["text"])
    return samples, skipped


def rank_pairs(studies: dict, samples: dict[str, list[str]], metric: str, min_margin: float,
               counts: Counter) -> list[dict]:
    from vlm.report_metrics import per_report_scores

    keyed = {f"{sid}#{k}": (sid, t) for sid, texts in samples.items() if sid in studies for k, t in enumerate(texts)}
    scores = per_report_scores({key: studies[sid]["report"] for key, (sid, _) in keyed.items()},
                               {key: t for key, (_, t) in keyed.items()}, metric) if keyed else {}
    pairs = []
    for sid, texts in samples.items():
        if sid not in studies:
            counts["unknown_study"] += 1
            continue
        if len(texts) < 2:
            counts["fewer_than_two_samples"] += 1
            continue
        ranked = sorted(range(len(texts)), key=lambda k: -scores[f"{sid}#{k}"])  # stable: ties keep file order
        best, worst = ranked[0], ranked[-1]
        margin = scores[f"{sid}#{best}"] - scores[f"{sid}#{worst}"]
        if margin < min_margin or margin <= 0:
            counts["margin_below_min"] += 1
            continue
        pairs.append({"id": sid, "image": studies[sid]["image"], "chosen": texts[best], "rejected": texts[worst],
                      "metric": metric, "chosen_score": scores[f"{sid}#{best}"],
                      "rejected_score": scores[f"{sid}#{worst}"]})
    return pairs


def edit_pairs(studies: dict, samples: dict[str, list[str]] | None, counts: Counter) -> list[dict]:
    from vlm.factuality import remove_unsupported

    pairs = []
    source = samples if samples is not None else {sid: [s["report"]] for sid, s in studies.items()}
    for sid, texts in source.items():
        if sid not in studies:
            counts["unknown_study"] += 1
            continue
        for text in texts:
            chosen = remove_unsupported(text, studies[sid]["report"] if samples is not None else None)
            if not chosen.strip():
                counts["nothing_left_after_edit"] += 1
            elif " ".join(chosen.split()) == " ".join(text.split()):
                counts["nothing_to_remove"] += 1
            else:
                pairs.append({"id": sid, "image": studies[sid]["image"], "chosen": chosen, "rejected": text,
                              "edit": "factuality"})
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.preference_from_samples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotation", required=True, help="R2Gen's annotation.json (references and image paths)")
    p.add_argument("--split", default="train", help="the split the pairs come from (default train)")
    p.add_argument("--samples", help='JSONL of {"id", "text"}: sampled reports (several per study)')
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank-by", choices=("bleu_4", "rouge_l", "cider", "factuality"),
                     help="sample-and-rank: best vs worst sample of each study by this metric (needs --samples)")
    how.add_argument("--edit", action="store_true",
                     help="factuality edits: chosen = the report without prior-exam sentences and unsupported findings")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="--rank-by: least score difference between best and worst for a pair (default: any)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the instruction of every pair (default: {DEFAULT_PROMPT!r}, "
                                                           "the eval prompt of configs/eval/prompts.yaml)")
    p.add_argument("--out", required=True, help="pairs JSONL (data_prep.shards --format preference reads it)")
    return p


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.rank_by and not args.samples:
        raise ValueError("--rank-by ranks sampled reports: give --samples (eval.report generate --num-samples N)")
    studies = load_studies(args.annotation, args.split)
    counts: Counter = Counter()
    samples = None
    if args.samples:
        samples, skipped = load_samples(args.samples)
        counts.update(skipped)
    pairs = (rank_pairs(studies, samples, args.rank_by, args.min_margin, counts) if args.rank_by
             else edit_pairs(studies, samples, counts))
    out = Path(args.out)
    atomic_write_text(out, "".join(json.dumps({"prompt": args.prompt, **p}) + "\n" for p in pairs))
    stats = {"pairs": len(pairs), "studies": len(studies), "skipped": dict(sorted(counts.items())),
             "mode": f"rank_by {args.rank_by}" if args.rank_by else "edit"}
    atomic_write_text(out.with_name(out.name + ".stats.json"), json.dumps(stats, indent=1) + "\n")
    log.info("%d pairs from %d studies -> %s; left out: %s", len(pairs), len(studies), out,
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
    if not pairs:
        log.warning("no pair was made: see the counts above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
