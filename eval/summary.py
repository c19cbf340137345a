"""Collect a pipeline run's results into one summary.json and a short README.md report.

    python -m eval.summary --out runs/demo \\
        --zeroshot modality=runs/demo/zeroshot_modality.json --zeroshot finding=runs/demo/zeroshot_finding.json \\
        --retrieval runs/demo/retrieval.json --suite runs/demo/suite/summary.json \\
        --report-baseline runs/demo/suite/iu_xray_constant.json \\
        --export open_clip=runs/demo/exports/open_clip --export transformers=runs/demo/exports/transformers \\
        --ask runs/demo/ask_open_clip.json --ask runs/demo/ask_transformers.json \\
        --curves clip=runs/demo/clip/metrics.jsonl --curves stage2=runs/demo/stage2/metrics.jsonl \\
        --confusion runs/demo/zeroshot_finding_confusion.png --stage-times runs/demo/.stages

Keys (DESIGN section 4): zeroshot.<name>_accuracy, retrieval.image_to_text_r1, vqa.closed_accuracy and
vqa.open_recall (the suite's first VQA benchmark), report.bleu_4 and report.rouge_l (its first report
benchmark; report.baseline_bleu_4 from --report-baseline), exports.<name> (folders relative to the
working directory), asked (the answers of the exported models), preference.before / .after / .change
(--preference BEFORE AFTER: two eval.suite summaries around preference tuning), seconds (the sum of the stage times
in --stage-times, else of the inputs' own "seconds"). Every input is optional; a missing file is an
error that names it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from vlm.utils import atomic_write_text, cli, setup_logging


def _pairs(items: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r}: expected NAME=PATH")
        out[name] = Path(path)
    return out


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def _curve(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]


def build(args) -> tuple[dict, list[str]]:
    s: dict = {}
    md = ["| result | value |", "|---|---|"]
    for name, path in _pairs(args.zeroshot, "--zeroshot").items():
        r = _load(path)
        s.setdefault("zeroshot", {})[f"{name}_accuracy"] = r["accuracy"]
        s["zeroshot"][f"{name}_balanced_accuracy"] = r["balanced_accuracy"]
        md.append(f"| zero-shot {name} accuracy ({r['num_classes']} classes, {r['num_images']} images) | "
                  f"{r['accuracy']:.3f} |")
    if args.retrieval:
        r = _load(Path(args.retrieval))
        s["retrieval"] = {k: r[k] for k in ("image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "chance_r1")}
        md.append(f"| retrieval image→text R@1 (chance {r['chance_r1']:.4f}) | {r['image_to_text_r1']:.3f} |")
    if args.suite:
        suite = _load(Path(args.suite))
        vqa, rep = _first_benchmarks(suite)
        if vqa:
            n, b = vqa
            s["vqa"] = {"benchmark": n, "closed_accuracy": b["closed_accuracy"], "open_recall": b["open_recall"],
                        "exact_match": b["exact_match"], "llava_med": b["llava_med"]}
            md += [f"| VQA {n}: closed accuracy (strict) | {b['closed_accuracy']:.3f} |",
                   f"| VQA {n}: open recall | {b['open_recall']:.3f} |"]
        if rep:
            n, b = rep
            s["report"] = {"benchmark": n, **{k: b[k] for k in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider")}}
            md += [f"| report {n}: BLEU-4 | {b['bleu_4']:.3f} |", f"| report {n}: ROUGE-L | {b['rouge_l']:.3f} |"]
            if b.get("factuality"):
                s["report"]["factuality"] = b["factuality"]
                md += [f"| report {n}: prior-exam sentence rate | {b['factuality']['prior_exam_sentence_rate']:.3f} |",
                       f"| report {n}: hallucinated-finding rate | {b['factuality']['hallucinated_finding_rate']:.3f} |"]
    if args.preference:
        s["preference"], rows = preference_block(*(_load(Path(x)) for x in args.preference))
        md += rows
    if args.report_baseline:
        r = _load(Path(args.report_baseline))
        s.setdefault("report", {})["baseline_bleu_4"] = r["bleu_4"]
        s["report"]["baseline_rouge_l"] = r["rouge_l"]
        s["report"]["baseline_text"] = r.get("constant_report")
        md.append(f"| report baseline: the constant report \"{r.get('constant_report')}\": BLEU-4 | {r['bleu_4']:.3f} |")
    for name, path in _pairs(args.export, "--export").items():
        if not path.is_dir():
            raise FileNotFoundError(f"export folder {path} not found")
        s.setdefault("exports", {})[name] = str(path)
        md.append(f"| export ({name}) | `{path}` |")
    for path in args.ask or []:
        r = _load(Path(path))
        s.setdefault("asked", []).append(r)
        what = r.get("question") or "which of: " + ", ".join(r.get("labels", []))
        md.append(f"| stock {r['kind']} loads `{r['model']}`: \"{what}\" | {r['answer']} |")
    return s, md


PREFERENCE_KEYS = (("closed_accuracy", "VQA closed accuracy"), ("open_recall", "VQA open recall"),
                   ("bleu_4", "report BLEU-4"), ("rouge_l", "report ROUGE-L"),
                   ("prior_exam_sentence_rate", "report prior-exam sentence rate"),
                   ("prior_exam_report_rate", "reports with a prior-exam sentence"),
                   ("hallucinated_finding_rate", "report hallucinated-finding rate"),
                   ("omitted_finding_rate", "report omitted-finding rate"))


def _first_benchmarks(suite: dict) -> tuple:
    """An eval.suite summary's first VQA and first report benchmark, each (name, values) or None."""
    benches = suite["benchmarks"]
    return (next(((n, b) for n, b in benches.items() if "closed_accuracy" in b), None),
            next(((n, b) for n, b in benches.items() if "bleu_4" in b), None))


def _suite_values(suite: dict) -> dict:
    """The first VQA and the first report benchmark of an eval.suite summary, flattened."""
    vqa, rep = _first_benchmarks(suite)
    out: dict = {}
    if vqa:
        out.update(closed_accuracy=vqa[1]["closed_accuracy"], open_recall=vqa[1]["open_recall"])
    if rep:
        out.update(bleu_4=rep[1]["bleu_4"], rouge_l=rep[1]["rouge_l"], **(rep[1].get("factuality") or {}))
    return out


def preference_block(before: dict, after: dict) -> tuple[dict, list[str]]:
    """Two eval.suite summaries (before and after preference tuning) -> {"before", "after", "change"} and
    the report's rows."""
    b, a = _suite_values(before), _suite_values(after)
    keys = [(k, label) for k, label in PREFERENCE_KEYS if b.get(k) is not None and a.get(k) is not None]
    block = {"before": {k: b[k] for k, _ in keys}, "after": {k: a[k] for k, _ in keys},
             "change": {k: a[k] - b[k] for k, _ in keys}}
    return block, [f"| after preference tuning: {label} | {b[k]:.3f} → {a[k]:.3f} |" for k, label in keys]


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for summary.json, README.md and the PNGs")
    p.add_argument("--title", default="Run summary")
    p.add_argument("--zeroshot", action="append", metavar="NAME=JSON", help="an eval.zeroshot result")
    p.add_argument("--retrieval", metavar="JSON", help="an eval.retrieval result")
    p.add_argument("--suite", metavar="JSON", help="an eval.suite summary.json")
    p.add_argument("--report-baseline", metavar="JSON", help="an eval.report score --constant result")
    p.add_argument("--preference", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="two eval.suite summary.json files, before and after preference tuning (the `preference` "
                        "block: VQA accuracy, BLEU/ROUGE, prior-exam and hallucinated-finding rates)")
    p.add_argument("--export", action="append", metavar="NAME=DIR", help="an exported model folder")
    p.add_argument("--ask", action="append", metavar="JSON", help="an eval.ask answer")
    p.add_argument("--curves", action="append", metavar="NAME=METRICS_JSONL", help="a training run's metrics.jsonl")
    p.add_argument("--confusion", metavar="PNG", help="a confusion-matrix image to show in the report")
    p.add_argument("--stage-times", metavar="DIR", help="a folder of <stage> files holding each stage's seconds")
    args = p.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, md = build(args)
    if args.stage_times:
        times = {f.name: float(f.read_text().strip() or 0) for f in sorted(Path(args.stage_times).iterdir())
                 if f.is_file()}
        summary["stage_seconds"] = times
        summary["seconds"] = round(sum(times.values()), 1)
    lines = [f"# {args.title}", "", *md, ""]
    if "seconds" in summary:
        lines[-1:-1] = [f"| total time (sum of stages) | {summary['seconds']:.0f} s |"]
        lines += ["Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()), ""]
    curves = _pairs(args.curves, "--curves")
    if curves:
        from eval.plots import training_curves_png

        training_curves_png({n: _curve(p) for n, p in curves.items()}, out / "training_curves.png", "training loss")
        lines += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    if args.confusion:
        src = Path(args.confusion)
        if not src.is_file():
            raise FileNotFoundError(f"--confusion {src} not found")
        if src.resolve() != (out / src.name).resolve():
            shutil.copyfile(src, out / src.name)
        lines += ["## Zero-shot confusion matrix", "", f"![confusion matrix]({src.name})", ""]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "README.md", "\n".join(lines))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
