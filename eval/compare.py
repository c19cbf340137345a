"""Is model B better than model A? Paired differences per benchmark, with their uncertainty.

    python -m eval.compare runs/suite_base runs/suite_tuned --out runs/compare.json
    python -m eval.compare slake_a.json slake_b.json

A and B are two runs on the same questions: each an eval.suite output folder (its summary.json lists the
benchmarks: <name>.json beside <name>.questions.csv / <name>.reports.csv) or one eval.vqa / eval.report
score result JSON (its per-question CSV beside it). Benchmarks present in both are compared, question by
question (joined on the question or study id; the two runs must hold the same ids).

Per benchmark and metric: A's value, B's, the difference B - A, its paired bootstrap 95% interval (the same
resampled questions for both runs; --bootstrap resamples, --seed), and for a right/wrong metric McNemar's
exact test (two-sided binomial test on the discordant questions: A right and B wrong, A wrong and B right).

- VQA: closed_accuracy (strict; McNemar), exact_match (open; McNemar), open_recall (open; bootstrap only).
- Multiple choice and text QA: accuracy (strict; McNemar), and for mmmu_med MMMU's own parsing too.
- Reports: rouge_l (per report, R2Gen's cleaning: the corpus ROUGE-L is their mean), and from
  vlm/factuality.py the reports with a prior-exam sentence and with a hallucinated finding (McNemar on
  "report has one"; lower is better).

Writes OUT (JSON) and OUT's stem + .md (a markdown table); prints the table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from vlm.utils import atomic_write_text, cli, setup_logging

VQA_METRICS = (("closed_accuracy", "CLOSED", "strict_correct", True), ("exact_match", "OPEN", "exact_match", True),
               ("open_recall", "OPEN", "recall", False))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired right/wrong (0/1) arrays -> {"a_only", "b_only", "p"}: McNemar's exact test, the two-sided
    binomial test of the discordant pairs against p = 1/2 (p = 1 when there are none)."""
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    # P(X <= k) for X ~ Binomial(n, 1/2), in log space (n may be tens of thousands)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int, seed: int, level: float = 0.95) -> list[float]:
    """Percentile interval of mean(b) - mean(a) over ``n`` resamples of the paired items."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n, len(a)))
    diffs = (b[idx] - a[idx]).mean(axis=1)
    return [float(np.percentile(diffs, (1 - level) / 2 * 100)), float(np.percentile(diffs, (1 + level) / 2 * 100))]


def _results(path: Path) -> dict[str, Path]:
    """A run -> {benchmark: its result JSON}."""
    if path.is_dir():
        summary = path / "summary.json"
        if not summary.is_file():
            raise FileNotFoundError(f"{path}: not an eval.suite output folder (no summary.json)")
        names = json.loads(summary.read_text()).get("benchmarks", {})
        return {n: path / f"{n}.json" for n in names}
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    r = json.loads(path.read_text())
    if "benchmark" not in r:
        raise ValueError(f"{path}: not an eval.vqa / eval.report score result (no 'benchmark' key)")
    return {r["benchmark"]: path}


def _rows(result: Path, suffix: str, key: str) -> dict[str, dict]:
    table = result.with_suffix(suffix)
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found: the per-question file that {result.name} was written with")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for i, r in enumerate(rows):
        if key not in r:
            raise ValueError(f"{table}: row {i + 2} has no {key!r} column")
        if r[key] in out:
            raise ValueError(f"{table}: row {i + 2}: {key} {r[key]!r} appears twice")
        out[r[key]] = r
    return out


def _paired(a: dict, b: dict, name: str) -> list[str]:
    if set(a) != set(b):
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        raise ValueError(f"{name}: the two runs answered different questions ({only_a} only in A, {only_b} only "
                         "in B); compare runs of the same benchmark split")
    return sorted(a)


def _metric(a: np.ndarray, b: np.ndarray, binary: bool, n: int, seed: int, lower_is_better: bool = False) -> dict:
    out = {"n": int(len(a)), "a": float(a.mean()) if len(a) else None, "b": float(b.mean()) if len(b) else None}
    if not len(a):
        return out
    out["diff"] = out["b"] - out["a"]
    out["ci95"] = paired_bootstrap(a, b, n, seed) if n > 0 else None
    if binary:
        out["mcnemar"] = mcnemar_exact(a, b)
    if lower_is_better:
        out["lower_is_better"] = True
    return out


def compare_vqa(name: str, ra: Path, rb: Path, n: int, seed: int) -> dict:
    a, b = _rows(ra, ".questions.csv", "question_id"), _rows(rb, ".questions.csv", "question_id")
    ids = _paired(a, b, name)
    out = {}
    for metric, kind, column, binary in VQA_METRICS:
        keep = [i for i in ids if a[i]["answer_type"] == kind]
        va = np.array([float(a[i][column]) for i in keep], dtype=np.float64)
        vb = np.array([float(b[i][column]) for i in keep], dtype=np.float64)
        out[metric] = _metric(va, vb, binary, n, seed)
    return out


def compare_choice(name: str, ra: Path, rb: Path, n: int, seed: int) -> dict:
    """Multiple-choice and text QA: strict accuracy (McNemar), and MMMU's own parsing where it was scored."""
    a, b = _rows(ra, ".questions.csv", "question_id"), _rows(rb, ".questions.csv", "question_id")
    ids = _paired(a, b, name)
    out = {}
    for metric, column in (("accuracy", "correct"), ("mmmu_compat_accuracy", "mmmu_correct")):
        if ids and column in a[ids[0]] and column in b[ids[0]]:  # mmmu_correct: mmmu_med only
            va = np.array([float(a[i][column]) for i in ids], dtype=np.float64)
            vb = np.array([float(b[i][column]) for i in ids], dtype=np.float64)
            out[metric] = _metric(va, vb, True, n, seed)
    return out


def compare_reports(name: str, ra: Path, rb: Path, n: int, seed: int) -> dict:
    from vlm.factuality import report_factuality
    from vlm.report_metrics import per_report_scores

    a, b = _rows(ra, ".reports.csv", "id"), _rows(rb, ".reports.csv", "id")
    ids = _paired(a, b, name)
    cleaner = "mimic_cxr" if name == "mimic_cxr" else "iu_xray"
    refs = {i: a[i]["reference"] for i in ids}
    out = {}
    ra_, rb_ = (per_report_scores(refs, {i: r[i]["prediction"] for i in ids}, "rouge_l", cleaner) for r in (a, b))
    out["rouge_l"] = _metric(np.array([ra_[i] for i in ids]), np.array([rb_[i] for i in ids]), False, n, seed)
    fa = [report_factuality(refs[i], a[i]["prediction"]) for i in ids]
    fb = [report_factuality(refs[i], b[i]["prediction"]) for i in ids]
    for metric, key in (("reports_with_prior_exam", "prior_exam_sentences"),
                        ("reports_with_hallucinated_finding", "hallucinated_findings")):
        out[metric] = _metric(np.array([float(f[key] > 0) for f in fa]), np.array([float(f[key] > 0) for f in fb]),
                              True, n, seed, lower_is_better=True)
    return out


def compare(path_a: Path, path_b: Path, n: int = 10000, seed: int = 0) -> dict:
    ra, rb = _results(path_a), _results(path_b)
    common = [k for k in ra if k in rb]
    if not common:
        raise ValueError(f"{path_a} and {path_b} have no benchmark in common ({sorted(ra)} vs {sorted(rb)})")
    out = {"a": str(path_a), "b": str(path_b), "bootstrap": n, "seed": seed, "benchmarks": {}}
    for name in common:
        kind = json.loads(ra[name].read_text())
        fn = compare_choice if kind.get("kind") == "choice" else compare_vqa if "closed_accuracy" in kind else \
            compare_reports
        out["benchmarks"][name] = fn(name, ra[name], rb[name], n, seed)
    out["only_in_one"] = sorted(set(ra) ^ set(rb))
    return out


def markdown(r: dict) -> str:
    lines = [f"# {r['b']} (B) vs {r['a']} (A)", "",
             "| benchmark | metric | n | A | B | B - A | 95% CI (paired bootstrap) | McNemar p (A only / B only) |",
             "|---|---|---|---|---|---|---|---|"]
    for bench, metrics in r["benchmarks"].items():
        for m, v in metrics.items():
            if v.get("a") is None:
                lines.append(f"| {bench} | {m} | 0 | — | — | — | — | — |")
                continue
            ci = f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" if v.get("ci95") else "—"
            mc = v.get("mcnemar")
            p = f"{mc['p']:.4g} ({mc['a_only']} / {mc['b_only']})" if mc else "—"
            label = m + (" (lower is better)" if v.get("lower_is_better") else "")
            lines.append(f"| {bench} | {label} | {v['n']} | {v['a']:.4f} | {v['b']:.4f} | {v['diff']:+.4f} | {ci} "
                         f"| {p} |")
    if r["only_in_one"]:
        lines += ["", f"Not compared (in one run only): {', '.join(r['only_in_one'])}"]
    return "\n".join(lines) + "\n"


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="run A: an eval.suite output folder, or an eval.vqa / eval.report score result JSON")
    p.add_argument("b", help="run B, the same kind as A")
    p.add_argument("--out", help="result JSON (a .md table beside it); default: print only")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    setup_logging()
    if args.bootstrap < 0:
        raise ValueError("--bootstrap must be >= 0")
    r = compare(Path(args.a), Path(args.b), args.bootstrap, args.seed)
    md = markdown(r)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, json.dumps(r, indent=1) + "\n")
        atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
