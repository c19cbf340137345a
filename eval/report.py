"""Radiology report generation: score predictions (and, with a trained assistant, generate them).

    python -m eval.report score --benchmark iu_xray --annotation iu_xray/annotation.json --split test \\
        --predictions reports.jsonl --out iu_xray.json
    python -m eval.report score ... --constant "No acute cardiopulmonary abnormality." --out baseline.json

The annotation is R2Gen's layout ({"train", "val", "test"} of {"id", "report", "image_path"}).
Predictions: JSONL, one {"id": <the annotation's id>, "text": "..."} a line. By default R2Gen's
protocol: its report cleaning on references and predictions alike, then pycocoevalcap's
BLEU-1..4, METEOR, ROUGE-L and CIDEr (--text ptb: the COCO caption protocol; raw: white space
only). Always beside them, on the raw texts, "factuality" (vlm/factuality.py's documented lexical rules):
prior_exam_sentence_rate / prior_exam_report_rate (sentences that compare with a prior exam the model never
saw) and hallucinated_finding_rate / hallucinated_report_rate (findings stated positively that the reference
does not state, or states on the other side), with omitted_finding_rate. CheXbert F1, RadGraph F1, GREEN and
RaTEScore are added when their packages and weights are installed locally,
else listed under "unavailable" with the reason. Also writes OUT's stem + .reports.csv.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

from eval.benchmarks import REPORT_BENCHMARKS
from eval.predictions import read_predictions
from vlm.report_metrics import clinical_metrics, lexical_metrics, prepare
from vlm.factuality import factuality_metrics
from vlm.utils import atomic_write_text, cli, setup_logging

log = logging.getLogger("eval.report")


def score(args) -> dict:
    t0 = time.time()
    bench = REPORT_BENCHMARKS[args.benchmark](args.annotation, split=args.split)
    items = bench.load()
    if not items:
        raise ValueError(f"{args.annotation}: split {args.split!r} is empty")
    if getattr(args, "constant", None) is not None:  # a baseline: the same report for every study
        preds, missing = {it.id: args.constant for it in items}, []
    else:
        preds, missing = read_predictions(args.predictions, "id", [it.id for it in items], args.allow_missing)
    from vlm.grpo import answer_format, extract_answer

    raw_refs = {it.id: it.report for it in items}
    outputs = {it.id: preds.get(it.id, "") for it in items}  # as generated (kept in the CSV)
    formats = [answer_format(t) for t in outputs.values()]
    raw_preds = {k: extract_answer(t) for k, t in outputs.items()}  # a reasoning-style output's report
    # empty or whitespace-only reports still score above 0 under the protocols (R2Gen's cleaning turns "" into
    # " ."): the numbers stay the protocol's, and how many there were is reported beside them
    num_empty = sum(not any(ch.isalnum() for ch in raw_preds[it.id]) for it in items)  # "", " ", ".", a zero-width space
    if num_empty:
        log.warning("%d of %d reports are empty (no letter or digit)%s: the protocol still scores them (R2Gen's cleaning "
                    "makes '' into ' .'), see num_empty in the result", num_empty, len(items),
                    f" ({len(missing)} missing, scored as empty)" if missing else "")
    refs, hyps = prepare(raw_refs, args.text, bench.cleaner), prepare(raw_preds, args.text, bench.cleaner)
    scores, unavailable = lexical_metrics(refs, hyps)
    ids = list(raw_refs)
    result = {"benchmark": args.benchmark, "split": args.split, "text_processing": args.text,
              **({"constant_report": args.constant} if getattr(args, "constant", None) is not None else {}),
              "num_reports": len(items), "num_missing": len(missing), "num_empty": num_empty, **scores,
              "format_rate": sum(f != "plain" for f in formats) / len(formats),
              # on the raw texts (the rules read sentence ends, sides and negations that the cleaning keeps or not)
              "factuality": factuality_metrics([raw_refs[i] for i in ids], [raw_preds[i] for i in ids])}
    if not args.no_clinical:
        clinical, unavailable_c = clinical_metrics([raw_refs[i] for i in raw_refs], [raw_preds[i] for i in raw_refs])
        result.update(clinical)
        unavailable.update(unavailable_c)
    result["unavailable"] = unavailable
    result["seconds"] = round(time.time() - t0, 2)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "reference", "prediction", "reference_processed", "prediction_processed", "raw_output"])
    for it in items:
        w.writerow([it.id, raw_refs[it.id], raw_preds[it.id], refs[it.id][0], hyps[it.id][0], outputs[it.id]])
    atomic_write_text(out.with_suffix(".reports.csv"), buf.getvalue())
    return result


def generate_reports(args, assistant=None) -> int:
    """One report per study from its first (frontal) view; sharded over torchrun ranks like eval.vqa."""
    from eval.generate import answer_with, processor_settings
    from eval.prompts import load_prompts

    items = REPORT_BENCHMARKS[args.benchmark](args.annotation, split=args.split).load()
    prompt = args.prompt or load_prompts(args.benchmark, args.prompts).report
    samples = getattr(args, "num_samples", 1)
    temperature = getattr(args, "temperature", None)
    if samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {samples}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    sampling = None
    if samples > 1 or temperature is not None:  # N sampled reports per study, ids "<id>#<k>"
        sampling = {"temperature": 1.0 if temperature is None else temperature, "top_p": args.top_p, "seed": args.seed}
    todo = [(f"{it.id}#{k}" if samples > 1 else it.id, prompt, it.images[0] if it.images else None)
            for it in items for k in range(samples)]
    n, rank = answer_with(args.checkpoint, assistant, todo, args.out, "id", args.batch_size, args.max_new_tokens,
                          f"{args.benchmark} reports", processor_settings(getattr(args, "processor", None)), sampling)
    log.info("rank %d: %d reports generated now (%d in all) -> %s", rank, n, len(todo), args.out)
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a predictions JSONL against an R2Gen annotation file")
    s.add_argument("--benchmark", required=True, choices=sorted(REPORT_BENCHMARKS))
    s.add_argument("--annotation", required=True, help="R2Gen's annotation.json")
    s.add_argument("--split", default="test")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help='JSONL of {"id", "text"}')
    src.add_argument("--constant", metavar="TEXT",
                     help='score one report for every study (a baseline, e.g. "No acute abnormality.")')
    s.add_argument("--out", required=True, help="result JSON (a .reports.csv is written beside it)")
    s.add_argument("--text", default="r2gen", choices=["r2gen", "ptb", "raw"],
                   help="text processing before scoring (default r2gen: R2Gen's cleaning)")
    s.add_argument("--allow-missing", action="store_true", help="score studies without a prediction as empty")
    s.add_argument("--no-clinical", action="store_true", help="skip CheXbert/RadGraph/GREEN/RaTEScore even if installed")
    g = sub.add_parser("generate", help="write reports for a split with a trained assistant (JSONL)")
    g.add_argument("--checkpoint", required=True,
                   help="a train.instruct run/checkpoint, a transformers export, or any stock VLM folder or hub id")
    g.add_argument("--benchmark", required=True, choices=sorted(REPORT_BENCHMARKS))
    g.add_argument("--annotation", required=True)
    g.add_argument("--split", default="test")
    g.add_argument("--out", required=True, help="predictions JSONL (ids already there are skipped: resumable)")
    g.add_argument("--prompt", default=None, help="the instruction (default: the benchmark's report prompt)")
    g.add_argument("--prompts", default=None, help="prompts YAML (default: configs/eval/prompts.yaml)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--processor", action="append", metavar="KEY=VALUE",
                   help="a stock VLM's image processor setting (repeatable), e.g. max_pixels=1003520 for Qwen2-VL")
    g.add_argument("--num-samples", type=int, default=1,
                   help="sampled reports per study (ids <id>#<k>: data_prep.preference_from_samples --rank-by ranks "
                        "them); default 1, greedy")
    g.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy, "
                                                                    "or 1.0 with --num-samples > 1)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with sampling only)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "score":
        r = score(args)
        keys = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
        print(" ".join(f"{k}={r[k]:.4f}" if r[k] is not None else f"{k}=n/a" for k in keys)
              + f" ({r['num_reports']} reports)")
        print(" ".join(f"{k}={v:.4f}" for k, v in r["factuality"].items() if k.endswith("_rate")))
        for name, why in r["unavailable"].items():
            print(f"{name}: unavailable: {why}")
        log.info("wrote %s in %.1fs", args.out, r["seconds"])
    elif args.command == "generate":
        from eval.generate import run_and_cleanup

        run_and_cleanup(generate_reports, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
