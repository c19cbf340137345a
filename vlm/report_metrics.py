"""Report-generation metrics with R2Gen's protocol, plus clinical metrics when available.

Default protocol (R2Gen, Chen et al. 2020, ``modules/tokenizers.py`` and ``modules/metrics.py``):
each reference and prediction is cleaned with ``clean_report_iu_xray`` or
``clean_report_mimic_cxr`` (reproduced here rule for rule, quirks included: the character class
``:-[`` is a range that also strips ``<=>@``, and empty sentences are kept because their filter
compares a string with a list), then scored with pycocoevalcap's Bleu(4), Meteor, Rouge and Cider
on one reference per study. ``text="ptb"`` uses the COCO caption protocol (PTBTokenizer) instead,
``text="raw"`` only lower-cases and splits on white space.

Clinical metrics: CheXbert F1 (micro/macro over the 14 observations and the top-5 subset) through
the ``f1chexbert`` package, RadGraph F1 through ``radgraph``, GREEN through ``green_score`` and RaTEScore
through ``RaTEScore``, when those packages and their weights are present locally (GREEN's and
RaTEScore's models are looked up in the Hugging Face cache first: nothing is downloaded); otherwise each is
reported as unavailable with the reason.
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


GREEN_MODEL = "StanfordAIMI/GREEN-radllama2-7b"
RATESCORE_MODELS = ("Angelakeke/RaTE-NER-Deberta", "FremyCompany/BioLORD-2023-C")


def _cached(repo: str) -> bool:
    """Whether a hub model is in the local Hugging Face cache (looked up, never downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:
        return False


def green(refs: list[str], preds: list[str]) -> dict:
    """GREEN (Ostmeier et al. 2024) through the ``green_score`` package: an LLM judge counting clinically
    significant errors; mean and standard deviation over the reports."""
    try:
        from green_score import GREEN
    except ImportError:
        raise RuntimeError("package green_score is not installed (pip install green-score; it runs the "
                           f"{GREEN_MODEL} model from the local Hugging Face cache, on a GPU)") from None
    if not _cached(GREEN_MODEL):
        raise RuntimeError(f"the GREEN model {GREEN_MODEL} is not in the local Hugging Face cache (download it "
                           "where there is network; nothing is downloaded here)")
    import tempfile

    try:
        mean, std, *_ = GREEN(model_name=GREEN_MODEL, output_dir=tempfile.mkdtemp(prefix="green-"))(refs, preds)
    except Exception as e:
        raise RuntimeError(f"GREEN could not run: {type(e).__name__}: {e}") from None
    return {"mean": float(mean), "std": float(std)}


def ratescore(refs: list[str], preds: list[str]) -> dict:
    """RaTEScore (Zhao et al. 2024) through the ``RaTEScore`` package: entity-level similarity of the reports;
    the mean over the reports."""
    try:
        from RaTEScore import RaTEScore
    except ImportError:
        raise RuntimeError("package RaTEScore is not installed (pip install RaTEScore; it needs "
                           f"{' and '.join(RATESCORE_MODELS)} in the local Hugging Face cache)") from None
    missing = [m for m in RATESCORE_MODELS if not _cached(m)]
    if missing:
        raise RuntimeError(f"RaTEScore's models {missing} are not in the local Hugging Face cache (nothing is "
                           "downloaded here)")
    try:
        scores = RaTEScore().compute_score(preds, refs)
    except Exception as e:
        raise RuntimeError(f"RaTEScore could not run: {type(e).__name__}: {e}") from None
    return {"mean": float(sum(scores) / max(len(scores), 1))}


CLINICAL = ("chexbert", "radgraph", "green", "ratescore")


def clinical_metrics(refs: list[str], preds: list[str], which=CLINICAL) -> tuple[dict, dict]:
    """The clinical metrics whose packages and weights are here; every other one is in ``unavailable`` with
    the reason (never skipped silently)."""
    scores, unavailable = {}, {}
    for name, fn in (("chexbert", chexbert_f1), ("radgraph", radgraph_f1), ("green", green),
                     ("ratescore", ratescore)):
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
