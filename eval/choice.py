"""Multiple-choice and text QA benchmarks in eval.vqa: scoring (vlm/choice_metrics.py's strict rule, MMMU's own
parsing beside it for mmmu_med) and generation (the options listed as configs/eval/prompts.yaml says).

Writes OUT (JSON: accuracy, num_questions, answered_rate, per-category breakdowns, a bootstrap 95% interval, the
``compat`` block where the benchmark's authors published a parsing rule), OUT's stem + .questions.csv (one row per
question: the letter chosen, how it was read, right or not, the raw output) and + .md.
"""
from __future__ import annotations

import csv
import io
import time

from eval.benchmarks import CHOICE_BENCHMARKS
from eval.predictions import format_stats, read_predictions, write_scored


def load_items(args):
    bench = CHOICE_BENCHMARKS[args.benchmark](args.data_root, split=args.split)
    items = bench.load()
    if not items:
        raise ValueError(f"{args.benchmark}: no questions in split {bench.split!r} of {args.data_root}")
    return bench, items


def score(args) -> dict:
    from vlm.choice_metrics import aggregate_choice, bootstrap_accuracy, breakdown_choice, score_choice
    from vlm.grpo import extract_answer

    t0 = time.time()
    bench, items = load_items(args)
    preds, missing = read_predictions(args.predictions, "question_id", [it.qid for it in items], args.allow_missing)
    raw = [preds.get(str(it.qid), "") for it in items]
    scored = [score_choice(it.qid, it.question, it.options, it.answer, extract_answer(r), it.kind, it.categories,
                           it.answers, r, mmmu=bench.compat == "mmmu") for it, r in zip(items, raw)]
    result = {"benchmark": args.benchmark, "kind": "choice", "split": bench.split, **aggregate_choice(scored),
              "num_missing": len(missing), **format_stats(raw)}
    if args.bootstrap:
        result["ci95"] = {"accuracy": bootstrap_accuracy(scored, n=args.bootstrap, seed=args.seed)}
    result["breakdown"] = breakdown_choice(scored)
    return write_scored(args, result, _csv(scored), markdown, t0, missing)


def generate_answers(args, assistant=None) -> int:
    """Answer the benchmark's questions with the assistant, or with ``--llm-only`` its base language model (text
    benchmarks only), sharded over torchrun ranks and resumable (eval.generate.answer_file)."""
    from eval.generate import answer_benchmark
    from eval.prompts import choice_prompt, load_prompts

    if getattr(args, "llm", None) and not getattr(args, "llm_only", False):
        raise ValueError("--llm names the base model for --llm-only; add --llm-only (or drop --llm)")
    bench, items = load_items(args)
    prompts = load_prompts(args.benchmark, args.prompts)
    if getattr(args, "llm_only", False):
        if bench.has_images:
            raise ValueError(f"--llm-only answers text benchmarks; {args.benchmark}'s questions have images")
        from vlm.models.vlm import load_base_llm

        assistant = load_base_llm(args.checkpoint, getattr(args, "llm", None))
    return answer_benchmark(args, assistant, [(it.qid, choice_prompt(prompts, it.question, it.options, it.context),
                                               it.images or None) for it in items])


def _csv(scored) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cats = sorted({k for q in scored for k in q.categories})
    compat = any(q.compat is not None for q in scored)
    w.writerow(["question_id", "kind", "question", "answer", "answer_text", "prediction", "choice", "read_as",
                "correct", *(["mmmu_choice", "mmmu_random", "mmmu_correct"] if compat else []), *cats, "raw_output"])
    for q in scored:
        w.writerow([q.qid, q.kind, q.question, q.answer, q.answer_text, q.prediction, q.choice or "", q.how,
                    int(q.correct), *([q.compat_choice or "", int(q.compat_random), int(bool(q.compat))] if compat
                                      else []), *[q.categories.get(c, "") for c in cats], q.raw])
    return buf.getvalue()


def markdown(r: dict) -> str:
    ci = (r.get("ci95") or {}).get("accuracy")
    acc = f"{100 * r['accuracy']:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    lines = [f"## {r['benchmark']} ({r['split']}): {r['num_questions']} questions", "", "| metric | value |", "|---|---|",
             f"| accuracy (strict; 95% CI) | {acc} |",
             f"| answered (one option chosen) | {100 * r['answered_rate']:.1f} |",
             f"| reasoning format (tags / 'the answer is' / after think) | {100 * r['format_rate']:.1f} |"]
    for name, block in (r.get("compat") or {}).items():
        lines.append(f"| {name} compat accuracy ({block['num_random']} random picks) | {100 * block['accuracy']:.1f} |")
    lines.append("")
    for cat, groups in r.get("breakdown", {}).items():
        lines += [f"### by {cat}", "", "| value | n | accuracy |", "|---|---|---|"]
        lines += [f"| {v} | {m['n']} | {100 * m['accuracy']:.1f} |" for v, m in groups.items()]
        lines.append("")
    return "\n".join(lines)
