"""Report factuality: sentences that refer to a prior exam, and findings the ground truth does not have.

Two lexical, documented rules (no model, no download), used by ``eval.report score`` (beside BLEU/ROUGE),
by the report-factuality preference recipe (``data_prep.preference_from_samples --edit``) and as rewards.

**Prior-exam sentences.** A model that never sees an earlier study cannot compare with one: "compared with
the prior radiograph", "unchanged", "new since", "interval increase", "again seen", "stable", "has
resolved" all hallucinate a prior exam (Banerjee et al. 2024, "Direct Preference Optimization for
Suppressing Hallucinated Prior Exams in Radiology Report Generation", count such lines). A sentence counts
when it matches ``PRIOR_EXAM`` and does not only say that there is no prior ("No prior study for
comparison.", "Comparison: none.").

**Findings.** A finding is a term of ``FINDING_TERMS`` (CheXpert's observations plus nodule, mass, cyst,
granuloma...) mentioned positively: not inside the scope of a negation (NegEx-style: "no", "not",
"without", "negative for", "free of", "resolution of" at most ``NEG_WINDOW`` words before it, with no
new statement in between ("and there is", "is seen", "which", "with"); "is not seen", "is no longer
seen", "is absent", "has resolved", "ruled out" right after it; a clause ends at ";", ":", "but",
"however"). Hedged mentions ("possible pneumonia", "cannot be excluded") count as stated. Its side is the
nearest "left" / "right" / "bilateral" ("R" / "L" in capitals) before it in its clause, else the one side
named after it, if only one is; a mention without a side of a finding the report also states with a side
is that finding, not another one. A prediction's positive finding is
*hallucinated* when the reference report does not state that finding positively, or states it only on
the other side (a finding without a side never conflicts on side). ``omitted`` counts the reference's
positive findings that the prediction does not state, so that a model cannot lower its hallucination
rate by reporting nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_LIST_NUMBER = re.compile(r"\(?\d{1,2}[.)]")

PRIOR_EXAM = re.compile(r"""
    \b(?:prior|previous|preceding|earlier|last|recent|old)\s+(?:\w+\s+){0,2}?
        (?:study|studies|exams?|examinations?|radiographs?|films?|images?|imaging|ct|cxr|x-?rays?|scans?)\b
  | \bcompar(?:ed|ison)\s+(?:with|to)\b | \bin\s+comparison\b
  | \bunchanged\b | \bno\s+(?:significant\s+|appreciable\s+|interval\s+)?change\b
  | \binterval(?:ly)?\b | \bnew\s+since\b | \bsince\s+(?:the\s+)?(?:prior|previous|last|earlier)\b
  | \bagain\s+(?:seen|noted|demonstrated|identified|visualized)\b | \bredemonstrat\w*
  | (?<!hemodynamically\s)\bstable\b | \bpreviously\b | \bpersist(?:s|ent|ing)?\b | \bas\s+before\b
  | \bcomparison\s*:
  | \b(?:improved|improving|worsened|worsening|resolved|resolving)\b
""", re.IGNORECASE | re.VERBOSE)

NO_PRIOR = re.compile(r"\b(?:no|without)\s+(?:prior|previous|comparison|earlier)\b|\bcomparison\s*:\s*none\b",
                      re.IGNORECASE)

# surface form (regex) -> canonical finding; longer phrases first so that "pleural effusion" wins over "effusion"
FINDING_TERMS: dict[str, str] = {
    r"pleural\s+effusions?|effusions?": "effusion",
    r"pneumothora(?:x|ces)": "pneumothorax",
    r"nodules?|nodular\s+opacit(?:y|ies)": "nodule",
    r"mass(?:es)?": "mass",
    r"cysts?|cystic\s+lesions?": "cyst",
    r"consolidations?": "consolidation",
    r"opacit(?:y|ies)|opacification": "opacity",
    r"atelecta(?:sis|tic)": "atelectasis",
    r"(?:pulmonary\s+)?edema|oedema": "edema",
    r"cardiomegaly|enlarged\s+(?:heart|cardiac\s+silhouette)": "cardiomegaly",
    r"pneumonia": "pneumonia",
    r"fractures?": "fracture",
    r"infiltrates?": "infiltrate",
    r"emphysema": "emphysema",
    r"fibrosis": "fibrosis",
    r"hernia": "hernia",
    r"granulomas?": "granuloma",
    r"lesions?": "lesion",
}
_FINDING = re.compile(r"\b(" + "|".join(f"(?:{t})" for t in FINDING_TERMS) + r")\b", re.IGNORECASE)
_CANON = [(re.compile(rf"^(?:{t})$", re.IGNORECASE), name) for t, name in FINDING_TERMS.items()]
_CLAUSE = re.compile(r"[;:]|\bbut\b|\bhowever\b|\bexcept\b|\balthough\b", re.IGNORECASE)
_NEG_BEFORE = re.compile(r"\b(?:no|not|without|negative\s+for|free\s+of|absence\s+of|resolution\s+of|"
                         r"rule\s+out|ruled\s+out|neither|nor|clear\s+of)\b", re.IGNORECASE)
_NEG_AFTER = re.compile(r"^\W*(?:is|are|was|were|has|have)?\s*(?:(?:not|no\s+longer)\s+(?:seen|present|"
                        r"identified|visualized|evident|demonstrated)|absent|resolved|ruled\s+out)\b", re.IGNORECASE)
# a negation reaches at most NEG_WINDOW words forward (NegEx's window, a little wider for "no focal consolidation,
# pleural effusion, or pneumothorax") and stops at a new statement
NEG_WINDOW = 6
_NEG_STOP = re.compile(r"\b(?:and\s+)?there\s+(?:is|are|was|were)\b|\b(?:is|are)\s+(?:seen|noted|present|"
                       r"identified|demonstrated)\b|\bwhich\b|\bwith\b|\bthough\b|\bwhereas\b|\bwhile\b",
                       re.IGNORECASE)
_HEADER = re.compile(r"^([A-Z][A-Za-z ]{0,30}:)\s*")
_SIDE = re.compile(r"\b(left|right|bilateral(?:ly)?|both)\b|\b([RL])\b(?=\s+\w)", re.IGNORECASE)


def sentences(report: str) -> list[str]:
    """A report split into sentences (at ". ", "! ", "? " and line breaks), empty pieces dropped; a list
    number ("1.", "2)") belongs to the sentence after it."""
    out: list[str] = []
    number = ""
    for piece in _SENTENCE_END.split(report or ""):
        piece = piece.strip()
        if not piece:
            continue
        if _LIST_NUMBER.fullmatch(piece):
            number = f"{number}{piece} "
            continue
        out.append(number + piece)
        number = ""
    return out + ([number.strip()] if number else [])


def mentions_prior_exam(sentence: str) -> bool:
    """A sentence with a clause (";"-separated) that compares with a prior exam and does not only say that
    there is none."""
    return any(PRIOR_EXAM.search(c) and not NO_PRIOR.search(c) for c in sentence.split(";"))


def _canonical(term: str) -> str:
    for pattern, name in _CANON:
        if pattern.match(term):
            return name
    raise AssertionError(term)  # every match of _FINDING is one of FINDING_TERMS


def _side(m: re.Match) -> str | None:
    """A side word -> left | right | bilateral; a one-letter "R"/"L" only in capitals (None otherwise)."""
    if m.group(2) is not None:
        return {"R": "right", "L": "left"}.get(m.group(2))
    w = m.group(1).lower()
    return "bilateral" if w.startswith("bilateral") or w == "both" else w


def _negated(before: str, after: str) -> bool:
    words = before.split()[-NEG_WINDOW:]  # only the window before the finding: linear in the clause
    window = " ".join(words)
    stops = list(_NEG_STOP.finditer(window))
    if stops:
        window = window[stops[-1].end():]
    return bool(_NEG_BEFORE.search(window)) or bool(_NEG_AFTER.search(after[:80]))


def _finding_side(clause: str, start: int, end: int, sides: list[tuple[int, str]]) -> str | None:
    """The nearest side word before the finding in its clause; else the side after it, if only one is named."""
    before = [side for pos, side in sides if pos < start]
    if before:
        return before[-1]
    after = {side for pos, side in sides if pos >= end}
    return after.pop() if len(after) == 1 else None


@dataclass(frozen=True)
class Finding:
    name: str
    side: str | None  # left | right | bilateral | None (not stated)


def positive_findings(text: str) -> set[Finding]:
    """The findings a report states positively (negated mentions excluded), each with its clause's side."""
    out: set[Finding] = set()
    for sentence in sentences(text):
        for clause in _CLAUSE.split(sentence):
            sides = [(m.start(), side) for m in _SIDE.finditer(clause) if (side := _side(m)) is not None]
            for m in _FINDING.finditer(clause):
                if _negated(clause[max(0, m.start() - 200):m.start()], clause[m.end():]):
                    continue
                out.add(Finding(_canonical(m.group(1)), _finding_side(clause, m.start(), m.end(), sides)))
    # "the nodule" without a side, beside "a nodule in the left upper zone", is that nodule: one finding
    sided = {f.name for f in out if f.side is not None}
    return {f for f in out if f.side is not None or f.name not in sided}


def hallucinated(pred: set[Finding], ref: set[Finding]) -> set[Finding]:
    """The prediction's positive findings that the reference does not support (finding absent, or only on
    another side)."""
    bad = set()
    for f in pred:
        ref_sides = {r.side for r in ref if r.name == f.name}
        if not ref_sides:
            bad.add(f)
        elif f.side is not None and None not in ref_sides and f.side not in ref_sides and "bilateral" not in ref_sides:
            bad.add(f)
    return bad


def report_factuality(reference: str, prediction: str) -> dict:
    """One study's counts: sentences, prior-exam sentences, positive findings, hallucinated and omitted ones."""
    sents = sentences(prediction)
    pred, ref = positive_findings(prediction), positive_findings(reference)
    ref_names = {f.name for f in ref}
    return {"sentences": len(sents), "prior_exam_sentences": sum(mentions_prior_exam(s) for s in sents),
            "findings": len(pred), "hallucinated_findings": len(hallucinated(pred, ref)),
            "reference_findings": len(ref_names),
            "omitted_findings": len(ref_names - {f.name for f in pred})}


def factuality_metrics(references: list[str], predictions: list[str]) -> dict:
    """Corpus rates (micro-averaged) and per-report rates of ``report_factuality`` over paired lists:

    - prior_exam_sentence_rate: prior-exam sentences / all sentences of the predictions;
    - prior_exam_report_rate: reports with at least one prior-exam sentence / reports;
    - hallucinated_finding_rate: hallucinated positive findings / all positive findings of the predictions
      (0 when the predictions state none: see omitted_finding_rate);
    - hallucinated_report_rate: reports with at least one hallucinated finding / reports;
    - omitted_finding_rate: the references' positive findings missing from the predictions / all of them."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    rows = [report_factuality(r, p) for r, p in zip(references, predictions)]
    total = {k: sum(r[k] for r in rows) for k in (rows[0] if rows else {})}
    n = max(len(rows), 1)
    rate = lambda a, b: (total.get(a, 0) / total[b]) if total.get(b) else 0.0  # noqa: E731
    return {"prior_exam_sentence_rate": rate("prior_exam_sentences", "sentences"),
            "prior_exam_report_rate": sum(r["prior_exam_sentences"] > 0 for r in rows) / n,
            "hallucinated_finding_rate": rate("hallucinated_findings", "findings"),
            "hallucinated_report_rate": sum(r["hallucinated_findings"] > 0 for r in rows) / n,
            "omitted_finding_rate": rate("omitted_findings", "reference_findings"),
            "num_positive_findings": total.get("findings", 0)}


def remove_unsupported(report: str, reference: str | None = None, prior_exam: bool = True) -> str:
    """``report`` without its prior-exam sentences (``prior_exam``) and, given the ground-truth ``reference``,
    without the sentences that state a finding the reference does not support: the "chosen" side of a
    report-factuality pair whose "rejected" side is ``report`` as it was. Section headers stay."""
    ref = positive_findings(reference) if reference is not None else None
    kept, header = [], ""
    for s in sentences(report):
        if (prior_exam and mentions_prior_exam(s)) or (ref is not None and hallucinated(positive_findings(s), ref)):
            m = _HEADER.match(s)  # "Impression: Unchanged." removed: its header moves to the next sentence kept
            header = header or (m.group(1) + " " if m else "")
            continue
        if header and not _HEADER.match(s):
            s = header + s
        kept.append(s)
        header = ""
    return " ".join(kept)
