"""Medical VQA: score predictions (and, with a trained assistant, generate them).

    python -m eval.vqa generate --checkpoint runs/demo/stage2 --benchmark slake --data-root Slake1.0 --out answers.jsonl
    torchrun --nproc_per_node 8 -m eval.vqa generate ...    (sharded; merged in question order)
    python -m eval.vqa score --benchmark slake --data-root Slake1.0 --predictions answers.jsonl --out slake.json

Benchmarks: vqa_rad (official JSON or HF parquet), slake (official JSON, English by default),
pathvqa (HF parquet or original pkl); multiple choice omnimedvqa, pmc_vqa, mmmu_med, medxpertqa_mm and text QA
medqa, medmcqa, pubmedqa, mmlu_med (their releases: eval/benchmarks/multiple_choice.py, text_qa.py; scored by
eval/choice.py: accuracy, num_questions, breakdowns). Forgetting: a text benchmark answered by the assistant and,
with --llm-only, by the base LLM it was built from, then compared:

    python -m eval.vqa generate --checkpoint RUN --benchmark medqa --data-root MedQA --out tuned.jsonl
    python -m eval.vqa generate --checkpoint RUN --llm-only --benchmark medqa --data-root MedQA --out base.jsonl
    (score both, then) python -m eval.compare base.json tuned.json

Predictions: JSONL, one {"question_id": <the benchmark's own id>, "text": "..."} a line. Writes OUT (JSON:
strict metrics, the `llava_med` block computed as LLaVA-Med v1 does, per-category breakdowns, bootstrap 95%
intervals), OUT's stem + .questions.csv (one row per question) and + .md (a markdown table). See
vlm/vqa_metrics.py (vlm/choice_metrics.py for multiple choice) for the definitions.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time

from eval.benchmarks import CHOICE_BENCHMARKS, VQA_BENCHMARKS
from eval.predictions import format_stats, read_predictions, write_scored
from vlm.utils import cli, setup_logging
from vlm.vqa_metrics import aggregate, bootstrap_ci, breakdown, score_question

log = logging.getLogger("eval.vqa")


def score(args) -> dict:
    if args.benchmark in CHOICE_BENCHMARKS:
        from eval import choice

        return choice.score(args)
    t0 = time.time()
    bench = VQA_BENCHMARKS[args.benchmark](args.data_root, split=args.split, lang=args.lang)
    items = bench.load()
    if not items:
        raise ValueError(f"{args.benchmark}: no questions in split {bench.split!r} (lang {args.lang})")
    preds, missing = read_predictions(args.predictions, "question_id", [it.qid for it in items], args.allow_missing)
    from vlm.grpo import extract_answer

    # reasoning-style outputs (<think>...</think><answer>...</answer>, "... The answer is X.") are scored on their
    # answer: the same extraction the GRPO correctness reward reads; the raw output stays in the CSV
    raw = {str(it.qid): preds.get(str(it.qid), "") for it in items}
    formats = format_stats([raw[str(it.qid)] for it in items])
    scored = [score_question(it.qid, it.question, it.answer, extract_answer(raw[str(it.qid)]), it.answer_type,
                             it.categories) for it in items]
    for q in scored:
        q.raw = raw[str(q.qid)]
    result = {"benchmark": args.benchmark, "split": bench.split, "lang": args.lang, **aggregate(scored),
              "num_missing": len(missing), "num_answer_tags": formats["answer_formats"].get("tags", 0), **formats}
    if args.bootstrap:
        result["ci95"] = bootstrap_ci(scored, n=args.bootstrap, seed=args.seed)
    result["breakdown"] = breakdown(scored)
    return write_scored(args, result, _csv(scored), markdown, t0, missing)


def generate_answers(args, assistant=None) -> int:
    """Answer the benchmark's questions (sharded over torchrun ranks; see eval.generate.answer_file)."""
    if args.benchmark in CHOICE_BENCHMARKS:
        from eval import choice

        return choice.generate_answers(args, assistant)
    if getattr(args, "llm_only", False) or getattr(args, "llm", None):
        text = ", ".join(n for n, b in CHOICE_BENCHMARKS.items() if not b.has_images)
        raise ValueError(f"--llm-only answers text benchmarks ({text}); {args.benchmark} has images")
    from eval.generate import answer_benchmark
    from eval.prompts import load_prompts, vqa_prompt

    items = VQA_BENCHMARKS[args.benchmark](args.data_root, split=args.split, lang=args.lang).load()
    prompts = load_prompts(args.benchmark, args.prompts)
    return answer_benchmark(args, assistant, [(it.qid, vqa_prompt(prompts, it.question, it.answer_type,
                                                                   args.closed_options), it.image) for it in items])


def _csv(scored) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cats = sorted({k for q in scored for k in q.categories})
    w.writerow(["question_id", "answer_type", "question", "answer", "prediction", "strict_correct",
                "exact_match", "token_f1", "recall", "llava_med_hit", "llava_med_recall", *cats, "raw_output"])
    for q in scored:
        w.writerow([q.qid, q.answer_type, q.question, q.answer, q.prediction, q.strict.get("correct", ""),
                    q.strict.get("exact_match", ""), q.strict.get("token_f1", ""), q.strict.get("recall", ""),
                    q.llava_med["hit"], q.llava_med.get("recall", ""), *[q.categories.get(c, "") for c in cats],
                    q.raw or q.prediction])
    return buf.getvalue()


def _pct(x) -> str:
    return f"{100 * x:.1f}"


def markdown(r: dict) -> str:
    ci = r.get("ci95", {})

    def cell(key, value):
        return _pct(value) + (f" [{_pct(ci[key][0])}, {_pct(ci[key][1])}]" if key in ci else "")

    lm = r["llava_med"]
    lines = [f"## {r['benchmark']} ({r['split']}, {r['lang']}): {r['num_closed']} closed, {r['num_open']} open",
             "", "| metric | value (95% CI) |", "|---|---|",
             f"| closed accuracy (strict) | {cell('closed_accuracy', r['closed_accuracy'])} |",
             f"| open recall | {cell('open_recall', r['open_recall'])} |",
             f"| open exact match | {cell('exact_match', r['exact_match'])} |",
             f"| open token F1 | {cell('token_f1', r['token_f1'])} |",
             f"| LLaVA-Med closed (substring) | {cell('llava_med.closed_accuracy', lm['closed_accuracy'])} |",
             f"| LLaVA-Med open recall | {cell('llava_med.open_recall', lm['open_recall'])} |",
             f"| LLaVA-Med open substring acc. | {_pct(lm['open_substring_accuracy'])} |", ""]
    for cat, groups in r.get("breakdown", {}).items():
        lines += [f"### by {cat}", "", "| value | closed n | closed acc | open n | open recall |", "|---|---|---|---|---|"]
        for v, m in groups.items():
            lines.append(f"| {v} | {m['num_closed']} | {_pct(m['closed_accuracy'])} | {m['num_open']} | "
                         f"{_pct(m['open_recall'])} |")
        lines.append("")
    return "\n".join(lines)


BENCHMARK_NAMES = sorted(VQA_BENCHMARKS) + sorted(CHOICE_BENCHMARKS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.vqa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a predictions JSONL against a benchmark")
    s.add_argument("--benchmark", required=True, choices=BENCHMARK_NAMES)
    s.add_argument("--data-root", required=True, help="the benchmark's official release folder (or file)")
    s.add_argument("--predictions", required=True, help='JSONL of {"question_id", "text"}')
    s.add_argument("--out", required=True, help="result JSON (a .questions.csv and a .md are written beside it)")
    s.add_argument("--split", default=None, help="default: the benchmark's test split (omnimedvqa: open_access, "
                   "pmc_vqa: test_clean, mmmu_med: validation, medmcqa: dev)")
    s.add_argument("--lang", default="en", choices=["en", "zh", "all"], help="SLAKE question language")
    s.add_argument("--allow-missing", action="store_true", help="score questions without a prediction as wrong")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    s.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("generate", help="answer a benchmark's questions with a trained assistant (JSONL)")
    g.add_argument("--checkpoint", required=True,
                   help="a train.instruct run/checkpoint, a transformers export, or any stock VLM folder or hub id")
    g.add_argument("--benchmark", required=True, choices=BENCHMARK_NAMES)
    g.add_argument("--data-root", required=True)
    g.add_argument("--out", required=True, help="predictions JSONL (ids already there are skipped: resumable)")
    g.add_argument("--split", default=None)
    g.add_argument("--lang", default="en", choices=["en", "zh", "all"])
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--processor", action="append", metavar="KEY=VALUE",
                   help="a stock VLM's image processor setting (repeatable), e.g. max_pixels=1003520 for Qwen2-VL")
    g.add_argument("--prompts", default=None, help="prompts YAML (default: configs/eval/prompts.yaml)")
    g.add_argument("--llm-only", action="store_true",
                   help="text benchmarks: answer with the base LLM the assistant was built from (its training config's "
                        "model.llm; a tuned stock VLM's model.vlm, text only) instead of the assistant: the forgetting "
                        "check")
    g.add_argument("--llm", default=None, help="with --llm-only: this LLM (hub id or folder) instead of the recorded one")
    g.add_argument("--closed-options", action="store_true",
                   help="closed questions use the benchmark's closed_options prompt (the options listed, as some "
                        "papers do; off by default)")
    return p


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "score":
        r = score(args)
        if args.benchmark in CHOICE_BENCHMARKS:
            from eval.choice import markdown as choice_markdown

            print(choice_markdown(r).split("\n### ")[0])
        else:
            print(markdown(r).split("\n### ")[0])
        log.info("wrote %s (+ .questions.csv, .md) in %.2fs", args.out, r["seconds"])
    elif args.command == "generate":
        from eval.generate import run_and_cleanup

        run_and_cleanup(generate_answers, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
