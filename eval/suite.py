"""Run a list of benchmarks from one config and write one summary beside the published anchors.

    python -m eval.suite --config configs/demo/suite.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m eval.suite --config configs/suite/medical.yaml checkpoint=runs/llava_med_7b_lora

For each benchmark: generate the answers with the checkpoint (sharded over torchrun ranks,
resumable: answers already in the predictions file are kept) unless the entry names existing
predictions, then score with eval.vqa / eval.report. Writes OUT/<name>.json (+ .md, .csv) per
benchmark and OUT/summary.json + OUT/summary.md: our numbers (strict and LLaVA-Med protocol for VQA;
BLEU/METEOR/ROUGE-L/CIDEr for reports; accuracy for multiple choice and text QA) beside the anchors of
eval/anchors.yaml, each with its source and setting.

The forgetting check: `llm_only=true` answers the config's text benchmarks with the base LLM the checkpoint was
built from (`llm=ID` names another) and skips the rest; `python -m eval.compare` then sets the two runs side by side:

    python -m eval.suite --config configs/suite/medical_breadth.yaml checkpoint=RUN llm_only=true out=runs/suite_base
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from vlm.utils import atomic_write_text, cli, setup_logging

log = logging.getLogger("eval.suite")
ANCHORS = Path(__file__).resolve().parent / "anchors.yaml"


@dataclass
class SuiteBenchmark:
    name: str = "???"  # vqa_rad | slake | pathvqa | iu_xray | mimic_cxr | a multiple-choice or text QA benchmark
    data_root: Optional[str] = None  # VQA: the official release folder / file
    annotation: Optional[str] = None  # reports: R2Gen's annotation.json
    split: Optional[str] = None  # default: test
    lang: str = "en"  # SLAKE
    predictions: Optional[str] = None  # score these instead of generating


@dataclass
class SuiteConfig:
    checkpoint: Optional[str] = None  # a train.instruct run/checkpoint, a transformers export, or a stock VLM (id/folder)
    processor: dict = field(default_factory=dict)  # stock VLM image processor settings (min/max_pixels)
    out: str = "runs/suite"
    benchmarks: List[SuiteBenchmark] = field(default_factory=list)
    batch_size: int = 16
    vqa_max_new_tokens: int = 32  # VQA, multiple-choice and text QA answers (raise it for reasoning-style outputs)
    report_max_new_tokens: int = 128
    closed_options: bool = False  # closed questions with the options listed (configs/eval/prompts.yaml)
    prompts: Optional[str] = None
    anchors: Optional[str] = None  # default: eval/anchors.yaml
    bootstrap: int = 1000
    text: str = "r2gen"  # report text processing: r2gen | ptb | raw
    # the forgetting check: the text benchmarks answered by the base LLM the checkpoint was built from (its
    # model.llm; a tuned stock VLM's model.vlm, without images), or by `llm` when given; other benchmarks skipped
    llm_only: bool = False
    llm: Optional[str] = None


@dataclass
class Anchor:
    model: str = "???"
    source: str = "???"
    setting: str = "???"
    protocol: str = "llava_med"  # llava_med | strict | report | paper (multiple choice: the source's own extraction)
    note: str = ""  # how the numbers were checked
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)


@dataclass
class AnchorFile:
    anchors: List[Anchor] = field(default_factory=list)


def load_anchors(path: Optional[str]) -> list[Anchor]:
    from vlm.config import load_config

    return load_config(AnchorFile, Path(path) if path else ANCHORS).anchors


def run_benchmark(cfg: SuiteConfig, b: SuiteBenchmark, out: Path, assistant, is_main: bool) -> Optional[dict]:
    from eval import report, vqa
    from eval.benchmarks import CHOICE_BENCHMARKS, VQA_BENCHMARKS

    is_vqa = b.name in VQA_BENCHMARKS or b.name in CHOICE_BENCHMARKS  # both through eval.vqa (names checked in main)
    source = b.data_root if is_vqa else b.annotation
    if not source:
        raise ValueError(f"benchmark {b.name}: {'data_root' if is_vqa else 'annotation'} is required")
    preds = Path(b.predictions) if b.predictions else out / f"{b.name}_predictions.jsonl"
    split = b.split if is_vqa else (b.split or "test")
    common = dict(benchmark=b.name, split=split, out=str(preds), batch_size=cfg.batch_size, prompts=cfg.prompts,
                  checkpoint=cfg.checkpoint)
    if not b.predictions:
        if assistant is None:
            raise ValueError(f"benchmark {b.name}: no predictions given and no checkpoint to generate them")
        if is_vqa:
            vqa.generate_answers(argparse.Namespace(**common, data_root=source, lang=b.lang,
                                                    max_new_tokens=cfg.vqa_max_new_tokens,
                                                    closed_options=cfg.closed_options), assistant)
        else:
            report.generate_reports(argparse.Namespace(**common, annotation=source, prompt=None,
                                                       max_new_tokens=cfg.report_max_new_tokens), assistant)
    if not is_main:
        return None
    result_path = str(out / f"{b.name}.json")
    if is_vqa:
        return vqa.score(argparse.Namespace(benchmark=b.name, data_root=source, split=b.split, lang=b.lang,
                                            predictions=str(preds), out=result_path, allow_missing=False,
                                            bootstrap=cfg.bootstrap, seed=0))
    return report.score(argparse.Namespace(benchmark=b.name, annotation=source, split=split,
                                           predictions=str(preds), out=result_path, allow_missing=False,
                                           text=cfg.text, no_clinical=False))


VQA_KEYS = (("closed_accuracy", "closed acc."), ("open_recall", "open recall"))
REPORT_KEYS = ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider")


def summarize(results: dict[str, dict], anchors: list[Anchor], cfg: SuiteConfig) -> tuple[dict, str]:
    summary = {"checkpoint": cfg.checkpoint, "closed_options": cfg.closed_options, "benchmarks": {}, "anchors": []}
    title = cfg.checkpoint or "given predictions"
    if cfg.llm_only:
        summary["llm_only"] = cfg.llm or "the checkpoint's base LLM"
        title = f"the base LLM ({cfg.llm or 'of ' + str(cfg.checkpoint)}), text benchmarks only"
    lines = [f"# Evaluation suite: {title}", ""]
    vqa = {n: r for n, r in results.items() if "closed_accuracy" in r}
    choice = {n: r for n, r in results.items() if r.get("kind") == "choice"}
    reports = {n: r for n, r in results.items() if "bleu_4" in r}
    for n, r in vqa.items():
        summary["benchmarks"][n] = {"closed_accuracy": r["closed_accuracy"], "open_recall": r["open_recall"],
                                    "exact_match": r["exact_match"], "token_f1": r["token_f1"],
                                    "llava_med": {k: r["llava_med"][k] for k in ("closed_accuracy", "open_recall")},
                                    "num_closed": r["num_closed"], "num_open": r["num_open"]}
    for n, r in reports.items():
        summary["benchmarks"][n] = {k: r.get(k) for k in REPORT_KEYS} | {"num_reports": r["num_reports"],
                                                                         "factuality": r.get("factuality")}
    if vqa:
        lines += ["## VQA (percent)", "", "| model | protocol | " + " | ".join(
            f"{n} {label}" for n in vqa for _, label in VQA_KEYS) + " |", "|---|---|" + "---|" * (2 * len(vqa))]
        for proto in ("strict", "llava_med"):
            cells = [100 * (r if proto == "strict" else r["llava_med"])[k] for r in vqa.values() for k, _ in VQA_KEYS]
            lines.append(f"| **ours** | {proto} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        for a in anchors:
            if a.protocol in ("llava_med", "strict") and any(n in a.results for n in vqa):
                cells = [a.results.get(n, {}).get(k) for n in vqa for k, _ in VQA_KEYS]
                lines.append(f"| {a.model} | {a.protocol} | " + " | ".join("—" if c is None else f"{c:.1f}"
                                                                          for c in cells) + " |")
        lines.append("")
    for n, r in choice.items():
        summary["benchmarks"][n] = {"accuracy": r["accuracy"], "num_questions": r["num_questions"],
                                    "answered_rate": r["answered_rate"]}
        if "compat" in r:
            summary["benchmarks"][n]["compat"] = {k: v["accuracy"] for k, v in r["compat"].items()}
    if choice:
        lines += ["## Multiple choice and text QA (percent, strict)", "",
                  "| model | " + " | ".join(choice) + " |", "|---|" + "---|" * len(choice),
                  "| **ours** | " + " | ".join(f"{100 * r['accuracy']:.1f}" for r in choice.values()) + " |"]
        for a in anchors:
            if any(n in a.results for n in choice):
                lines.append(f"| {a.model} ({a.protocol}) | " + " | ".join(
                    "—" if a.results.get(n, {}).get("accuracy") is None else f"{a.results[n]['accuracy']:.1f}"
                    for n in choice) + " |")
        compat = {n: r["compat"] for n, r in choice.items() if "compat" in r}
        for n, c in compat.items():
            lines.append(f"\n{n} with its authors' parsing: " + ", ".join(
                f"{k} {100 * v['accuracy']:.1f} ({v['num_random']} random picks)" for k, v in c.items()))
        lines.append("")
    if reports:
        lines += ["## Report generation", "", "| model | benchmark | " + " | ".join(REPORT_KEYS) + " |",
                  "|---|---|" + "---|" * len(REPORT_KEYS)]
        for n, r in reports.items():
            lines.append(f"| **ours** | {n} | " + " | ".join("n/a" if r.get(k) is None else f"{r[k]:.3f}"
                                                           for k in REPORT_KEYS) + " |")
        for a in anchors:
            for n in reports:
                if n in a.results:
                    lines.append(f"| {a.model} | {n} | " + " | ".join(
                        "—" if a.results[n].get(k) is None else f"{a.results[n][k]:.3f}" for k in REPORT_KEYS) + " |")
        lines += ["", "Factuality (vlm/factuality.py's lexical rules; lower is better, omitted findings beside):", "",
                  "| benchmark | prior-exam sentences | reports with one | hallucinated findings | reports with one | "
                  "omitted findings |", "|---|---|---|---|---|---|"]
        for n, r in reports.items():
            f = r.get("factuality") or {}
            lines.append(f"| {n} | " + " | ".join("n/a" if f.get(k) is None else f"{f[k]:.3f}" for k in (
                "prior_exam_sentence_rate", "prior_exam_report_rate", "hallucinated_finding_rate",
                "hallucinated_report_rate", "omitted_finding_rate")) + " |")
        lines.append("")
    used = [a for a in anchors if any(n in a.results for n in results)]
    if used:
        lines += ["### Anchors", "", "Published results on the benchmarks' official test splits: comparable with ours "
                  "only when the data is the official release, scored with the same protocol.", ""]
        for a in used:
            lines.append(f"- **{a.model}** ({a.setting}; {a.protocol} protocol): {a.source}"
                         + (f" ({a.note})" if a.note else ""))
            summary["anchors"].append({"model": a.model, "source": a.source, "setting": a.setting,
                                       "protocol": a.protocol, "note": a.note,
                                       "results": {n: dict(v) for n, v in a.results.items() if n in results}})
        lines.append("")
    return summary, "\n".join(lines)


def check_names(cfg: SuiteConfig) -> None:
    from eval.benchmarks import CHOICE_BENCHMARKS, REPORT_BENCHMARKS, VQA_BENCHMARKS

    known = {**VQA_BENCHMARKS, **CHOICE_BENCHMARKS, **REPORT_BENCHMARKS}
    for b in cfg.benchmarks:
        if b.name not in known:
            raise ValueError(f"benchmarks: unknown name {b.name!r} (known: {sorted(known)})")


def select_text_benchmarks(cfg: SuiteConfig) -> None:
    """llm_only: keep the text benchmarks (the base LLM cannot see images), saying which were skipped."""
    from eval.benchmarks import CHOICE_BENCHMARKS

    text = [b for b in cfg.benchmarks if b.name in CHOICE_BENCHMARKS and not CHOICE_BENCHMARKS[b.name].has_images]
    if not text:
        raise ValueError("llm_only=true: the config lists no text benchmark (medqa, medmcqa, pubmedqa, mmlu_med)")
    if not cfg.checkpoint and not cfg.llm and any(not b.predictions for b in text):
        raise ValueError("llm_only=true needs checkpoint= (whose base LLM answers) or llm= (the LLM to ask)")
    skipped = [b.name for b in cfg.benchmarks if b not in text]
    if skipped:
        log.info("llm_only: the base LLM answers %s; skipped (they have images): %s",
                 ", ".join(b.name for b in text), ", ".join(skipped))
    cfg.benchmarks = text


def check_answers_owner(cfg: SuiteConfig, out: Path, is_main: bool) -> None:
    """Generation resumes from the answers already in OUT, so OUT must hold one model's answers: OUT/answers_by.json
    records which (checkpoint, llm_only, llm); another model's run in the same OUT is refused, not silently served
    the first one's answers."""
    me = {"checkpoint": cfg.checkpoint, "llm_only": cfg.llm_only, "llm": cfg.llm}
    path = out / "answers_by.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != me:
            raise ValueError(f"{out} holds answers generated by {before}, and this run ({me}) would reuse them: "
                             "give it its own out= folder")
    elif is_main:
        if any(out.glob("*_predictions.jsonl")):
            log.warning("%s holds answers from a run that did not record its model; they are kept (resumed) as this "
                        "run's", out)
        atomic_write_text(path, json.dumps(me) + "\n")


@cli
def main(argv=None) -> int:
    from eval.generate import cleanup, init_distributed
    from vlm.config import config_parser, load_config

    args = config_parser("python -m eval.suite", __doc__, "checkpoint=runs/demo/stage2").parse_args(argv)
    cfg = load_config(SuiteConfig, args.config, args.overrides)
    if not cfg.benchmarks:
        raise ValueError("benchmarks: the config lists none")
    setup_logging()
    anchors = load_anchors(cfg.anchors)
    d = init_distributed()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if cfg.llm and not cfg.llm_only:
        raise ValueError("llm names the base model for llm_only=true; set llm_only=true (or drop llm)")
    check_names(cfg)
    if cfg.llm_only:
        select_text_benchmarks(cfg)
    if any(not b.predictions for b in cfg.benchmarks):
        check_answers_owner(cfg, out, d.is_main)
    try:
        assistant = None
        if (cfg.checkpoint or cfg.llm_only) and any(not b.predictions for b in cfg.benchmarks):
            from vlm.models.vlm import load_assistant, load_base_llm

            assistant = load_base_llm(cfg.checkpoint, cfg.llm) if cfg.llm_only else \
                load_assistant(cfg.checkpoint, dict(cfg.processor) or None)
        results = {}
        for b in cfg.benchmarks:
            r = run_benchmark(cfg, b, out, assistant, d.is_main)
            if r is not None:
                results[b.name] = r
                log.info("%s scored -> %s", b.name, out / f"{b.name}.json")
        if d.is_main:
            summary, md = summarize(results, anchors, cfg)
            summary["seconds"] = round(time.time() - t0, 1)
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
            atomic_write_text(out / "summary.md", md + "\n")
            print(md)
            log.info("summary -> %s (%.1fs)", out / "summary.json", summary["seconds"])
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
