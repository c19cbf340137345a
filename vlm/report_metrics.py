"""Report-generation metrics with R2Gen's protocol, plus clinical metrics when available.

Default protocol (R2Gen, Chen et al. 2020, ``modules/tokenizers.py`` and ``modules/metrics.py``):
each reference and prediction is cleaned with ``clean_report_iu_xray`` or
``clean_report_mimic_cxr`` (reproduced here rule for rule, quirks included: the character class
``:-[`` is a range that also strips ``<=>@``, and empty sentences are kept because their filter
compares a string with a list), then scored with pycocoevalcap's Bleu(4), Meteor, Rouge and Cider
on one reference per study. ``text="ptb"`` uses the COCO caption protocol (PTBTokenizer) instead,
``text="raw"`` only lower-cases and splits on white space.

Clinical metrics: CheXbert F1 (micro/macro over the 14 observations and the top-5 subset) through
the ``f1chexbert`` package and RadGraph F1 through ``radgraph``, when those packages and their
weights are present locally; otherwise each is reported as unavailable with the reason.
"""
from __future__ import annotations

import logging
import re
import shutil

log = logging.getLogger(__name__)

_R2GEN_STRIP = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")  # ':-[' is a range, as in R2Gen


def _r2gen_sentence(t: str) -> str:
    t = t.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    return _R2GEN_STRIP.sub("", t)


def _numbering(t: str) -> str:
    t = t.replace("1. ", "")
    for n in "2345":
        t = t.replace(f". {n}. ", ". ")
    for n in "2345":
        t = t.replace(f" {n}. ", ". ")
    return t


def _join(pieces: list[str]) -> str:
    return " . ".join(_r2gen_sentence(s) for s in pieces) + " ."


def clean_report_iu_xray(report: str) -> str:
    t = report
    for _ in range(3):
        t = t.replace("..", ".")
    return _join(_numbering(t).strip().lower().split(". "))


def clean_report_mimic_cxr(report: str) -> str:
    t = report.replace("\n", " ")
    for _ in range(7):
        t = t.replace("__", "_")
    for _ in range(6):
        t = t.replace("  ", " ")
    for _ in range(8):
        t = t.replace("..", ".")
    return _join(_numbering(t).strip().lower().split(". "))


CLEANERS = {"iu_xray": clean_report_iu_xray, "mimic_cxr": clean_report_mimic_cxr}


def prepare(texts: dict[str, str], mode: str, cleaner: str) -> dict[str, list[str]]:
    """{id: text} -> {id: [processed text]} as pycocoevalcap expects."""
    if mode == "r2gen":
        fn = CLEANERS[cleaner]
        return {k: [fn(v)] for k, v in texts.items()}
    if mode == "raw":
        return {k: [" ".join(v.lower().split()) or "."] for k, v in texts.items()}
    if mode == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        out = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in texts.items()})
        return {k: [v[0] or "."] for k, v in out.items()}
    raise ValueError(f"unknown text processing {mode!r} (r2gen, ptb, raw)")


def lexical_metrics(refs: dict[str, list[str]], preds: dict[str, list[str]]) -> tuple[dict, dict]:
    """-> (scores, unavailable): bleu_1..4, meteor, rouge_l, cider over the ids of refs."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores, unavailable = {}, {}
    bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    scores.update({f"bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    if shutil.which("java") is None:
        unavailable["meteor"] = "METEOR needs Java (a 'java' executable on PATH); install a JRE to report it"
        scores["meteor"] = None
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            m = Meteor()
            scores["meteor"] = float(m.compute_score(refs, preds)[0])
            m.close() if hasattr(m, "close") else None
        except Exception as e:  # the Java subprocess failed
            unavailable["meteor"] = f"METEOR failed: {type(e).__name__}: {e}"
            scores["meteor"] = None
    scores["rouge_l"] = float(Rouge().compute_score(refs, preds)[0])
    scores["cider"] = float(Cider().compute_score(refs, preds)[0])
    return scores, unavailable


def chexbert_f1(refs: list[str], preds: list[str]) -> dict:
    try:
        from f1chexbert import F1CheXbert
    except ImportError:
        raise RuntimeError("package f1chexbert is not installed (pip install f1chexbert; it needs the CheXbert "
                           "checkpoint in the local Hugging Face cache)") from None
    try:
        _, _, report, report5 = F1CheXbert()(hyps=preds, refs=refs)
    except Exception as e:  # no weights offline, or an API change
        raise RuntimeError(f"CheXbert could not run: {type(e).__name__}: {e}") from None
    return {"micro_f1_14": report["micro avg"]["f1-score"], "macro_f1_14": report["macro avg"]["f1-score"],
            "micro_f1_5": report5["micro avg"]["f1-score"], "macro_f1_5": report5["macro avg"]["f1-score"]}


def radgraph_f1(refs: list[str], preds: list[str]) -> dict:
    try:
        from radgraph import F1RadGraph
    except ImportError:
        raise RuntimeError("package radgraph is not installed (pip install radgraph; it needs the RadGraph "
                           "model in the local Hugging Face cache)") from None
    try:
        score = F1RadGraph(reward_level="partial")(hyps=preds, refs=refs)[0]
    except Exception as e:
        raise RuntimeError(f"RadGraph could not run: {type(e).__name__}: {e}") from None
    return {"f1_partial": float(score)}


def clinical_metrics(refs: list[str], preds: list[str], which=("chexbert", "radgraph")) -> tuple[dict, dict]:
    scores, unavailable = {}, {}
    for name, fn in (("chexbert", chexbert_f1), ("radgraph", radgraph_f1)):
        if name not in which:
            continue
        try:
            scores[name] = fn(refs, preds)
        except RuntimeError as e:
            unavailable[name] = str(e)
            log.info("%s unavailable: %s", name, e)
    return scores, unavailable


RANK_METRICS = ("bleu_4", "rouge_l", "cider", "factuality")


def per_report_scores(refs: dict[str, str], preds: dict[str, str], metric: str, cleaner: str = "iu_xray") -> dict:
    """{key: reference}, {key: prediction} -> {key: score} of one report against its reference, higher better:
    bleu_4 / rouge_l / cider with R2Gen's cleaning (pycocoevalcap's per-report scores; CIDEr's document
    frequencies come from the references given), or factuality: minus (hallucinated findings + prior-exam
    sentences) under vlm/factuality.py's rules (0 is a report without either)."""
    if metric not in RANK_METRICS:
        raise ValueError(f"unknown ranking metric {metric!r} (one of {', '.join(RANK_METRICS)})")
    keys = list(preds)
    if metric == "factuality":
        from vlm.factuality import report_factuality

        out = {}
        for k in keys:
            f = report_factuality(refs[k], preds[k])
            out[k] = -float(f["hallucinated_findings"] + f["prior_exam_sentences"])
        return out
    r, p = prepare({k: refs[k] for k in keys}, "r2gen", cleaner), prepare(preds, "r2gen", cleaner)
    if metric == "bleu_4":
        from pycocoevalcap.bleu.bleu import Bleu

        per = Bleu(4).compute_score(r, p, verbose=0)[1][3]
    elif metric == "rouge_l":
        from pycocoevalcap.rouge.rouge import Rouge

        per = Rouge().compute_score(r, p)[1]
    else:
        from pycocoevalcap.cider.cider import Cider

        per = Cider().compute_score(r, p)[1]
    return {k: float(s) for k, s in zip(r, per)}  # pycocoevalcap scores in the references' key order
