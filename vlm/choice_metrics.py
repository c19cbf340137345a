"""Multiple-choice scoring: one strict rule for every multiple-choice and text QA benchmark, and MMMU's published
answer parsing reproduced for the ``compat`` block of MMMU.

Strict rule (``strict_choice``), applied to the answer that ``vlm.grpo.extract_answer`` finds (the ``<answer>`` tags,
"the answer is X", the text after ``</think>``, else the output itself):

1. Cleaning: Unicode compatibility forms folded (NFKC: a full-width "Ｂ" is "B"); surrounding whitespace, quotes,
   markdown emphasis (``**``) and trailing ``. , ; : ! ? 。`` go; a leading ``Answer:`` / ``The correct answer:`` /
   ``Option`` / ``Choices:`` (case-insensitive, whole words) goes.
2. A letter: the answer is one option letter, bare or as ``(B)``, ``[B]``, ``B.``, ``B)``, ``B:``, ``B -`` (lower case
   not when followed by a space, so the article in "a small nodule" is not option A; a letter that is not an
   option's is not an answer). The letter may be followed by its option's text (``B. Pleural effusion``,
   ``(B): Pleural effusion``, ``B (Pleural effusion)``); followed by any other text, the answer contradicts
   itself and chooses nothing.
3. Else the option text: the cleaned answer equals exactly one option's text (case, inner whitespace and trailing
   punctuation ignored).
4. Else nothing is chosen, and the question is wrong: "A and B", "not A", "A or C", the option's text inside a
   longer sentence, an empty answer. (An output saying "the answer is C. difficile" is read on the rest of that
   line when it is exactly an option, C. difficile, rather than on the letter before its first period.) How often this happens is reported (``answered_rate``), so a model that
   rambles is visible rather than rescued.

Open questions (MMMU has a few): exact match after ``vlm.vqa_metrics.normalize`` against any accepted answer.

MMMU compat (``mmmu_parse_choice``, ``mmmu_parse_open``, ``mmmu_open_correct``): the rules of MMMU's
``mmmu/utils/eval_utils.py`` (Yue et al. 2024), written from their description; tested on hand-written cases.
Multiple choice: the response stripped of ``, . ! ? ; : '`` at both ends and padded with spaces; candidates are the
letters written ``(X)``; else letters standing alone (`` X ``); else, for responses of more than 5 words, options
whose text occurs in the response (case-insensitive); several candidates: the one that occurs last; none: a random
letter. MMMU draws that letter from an unseeded ``random.choice``; we draw it from ``random.Random`` seeded by the
question id, so a rescoring gives the same number (the expected accuracy is the same), and count how often it
happened (``num_random``).
"""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Optional

LETTERS = "ABCDEFGHIJKLMNOP"

_WS = re.compile(r"\s+")
_EDGE = " \t\n\"'`“”‘’"
_TRAIL = ".,;:!?。"
_PREFIX = re.compile(r"^(?:(?:the\s+)?(?:final\s+|correct\s+)?answer|options?|choices?)\b\s*:?\s*", re.IGNORECASE)
# a letter in one of its written forms, then what follows it: (B) / [B] / B. B) B: B- / bare B (then a space or the end)
_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):\-–—]|([A-Za-z])(?=\s|$))\s*(.*)$", re.DOTALL)
_SEPARATORS = ".:)-–— "
_ANSWER_IS_LINE = re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)


def _fold(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).replace("**", "")).strip(_EDGE)


def clean_text(text: str) -> str:
    """Case-folded, NFKC-folded, inner whitespace collapsed, surrounding quotes and trailing punctuation removed."""
    # trailing punctuation and quotes in any order ("B.'", 'pneumothorax."'): one rstrip, linear in the length
    return _fold(text).rstrip(_TRAIL + _EDGE).casefold()


def strict_choice(prediction: str, options: dict[str, str]) -> tuple[Optional[str], str]:
    """-> (the chosen letter or None, how: ``letter``, ``letter+text``, ``text``, ``contradiction``, ``none``)."""
    whole = clean_text(prediction)
    t = _PREFIX.sub("", _fold(prediction)).strip(_EDGE).rstrip(_TRAIL + _EDGE)
    if not t:
        return None, "none"
    m = _LETTER.match(t)
    letter, rest = None, ""
    if m:
        letter, rest = next(g for g in m.groups()[:4] if g).upper(), m.group(5).strip()
        # a lower-case letter followed by a space is a word ("a small nodule"), unless it is all there is
        if letter not in options or (m.group(4) is not None and m.group(4).islower() and len(t) > 1):
            letter = None
        elif not rest.lstrip(_SEPARATORS):
            return letter, "letter"
    texts = {k: clean_text(v) for k, v in options.items()}
    # the whole answer as an option's text first ("Answer unknown" is that option, not "unknown" after a prefix)
    by_text = [k for k, v in texts.items() if v == whole] or [k for k, v in texts.items() if v == clean_text(t)]
    if letter is not None:
        # what follows the letter, as written ("A. -5 mmHg", "A. (i) and (ii)"), then without a separator or
        # brackets ("B - text", "(B): text", "B (text)"); the text of another option is a contradiction
        said = clean_text(rest)
        loose = rest.lstrip(_SEPARATORS).strip()
        loose = clean_text(loose[1:-1] if loose.startswith("(") and loose.endswith(")") else loose)
        if said == texts[letter] or (loose == texts[letter] and said not in texts.values()):
            return letter, "letter+text"
        if not by_text:
            return None, "contradiction"
    if len(by_text) == 1:
        return by_text[0], "text"
    return None, "none"


def answer_is_line(raw: str) -> Optional[str]:
    """The rest of the line after the last "answer is" (after any ``</think>``), or None: what a stated answer
    says when its own text holds a period ("The answer is C. difficile"), which ``extract_answer`` cuts."""
    tail = re.split(r"</think>", raw, flags=re.IGNORECASE)[-1]
    found = None
    for found in _ANSWER_IS_LINE.finditer(tail):
        pass
    return found.group(1).strip() if found else None


def open_correct(prediction: str, answers: list[str]) -> bool:
    from vlm.vqa_metrics import normalize

    p = normalize(prediction)
    return bool(p) and any(p == normalize(a) for a in answers)


# ---- MMMU compat -----------------------------------------------------------------------------------------------

def mmmu_parse_choice(response: str, options: dict[str, str], seed: object = 0) -> tuple[str, bool]:
    """MMMU's multiple-choice parsing -> (letter, whether it was a random pick)."""
    letters = list(options)
    r = response
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        r = r.strip(ch)
    r = " " + r + " "
    cands, bracketed, by_letter = [], False, True
    for c in letters:
        if f"({c})" in r:
            cands.append(c)
            bracketed = True
    if not cands:
        cands = [c for c in letters if f" {c} " in r]
    if not cands and len(r.split()) > 5:
        low = r.lower()
        cands = [c for c in letters if options[c].lower() in low]
        by_letter = not cands
    if not cands:
        return random.Random(str(seed)).choice(letters), True
    if len(cands) == 1:
        return cands[0], False
    if by_letter:
        pos = [r.rfind(f"({c})" if bracketed else f" {c} ") for c in cands]
    else:
        low = r.lower()
        pos = [low.rfind(options[c].lower()) for c in cands]
    return cands[max(range(len(cands)), key=lambda i: (pos[i], -i))], False


_NUM_PATTERNS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands commas: 1,234,567
                 # scientific: 1.5e-3; (?<!\d) only stops a match from starting inside a run of digits (where MMMU's
                 # pattern fails anyway, once per digit: quadratic on a long number), so the matches are theirs
                 re.compile(r"-?(?<!\d)\d+(?:\.\d+)?[eE][+-]?\d+"),
                 re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"))  # plain: 12, 0.5, .5 (not 5mg)
_OPEN_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _mmmu_number(s: str) -> Optional[float]:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def mmmu_normalize(s) -> list:
    """MMMU's normalize_str: a number -> [the number rounded to 2 places]; text -> [lower-cased text] (and, for a
    single character, also with spaces around it, as they do to avoid partial matches)."""
    if isinstance(s, (int, float)):
        return [round(float(s), 2)]
    s = s.strip()
    n = _mmmu_number(s)
    if n is not None:
        return [round(n, 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_extract_numbers(s: str) -> list[str]:
    return [m for p in _NUM_PATTERNS for m in p.findall(s)]


def mmmu_parse_open(response: str) -> list:
    """MMMU's open-answer parsing: the key sub-responses (the text after the last indicator word of each
    sentence), their numbers, normalised; deduplicated in order."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _OPEN_INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = ""
        for ind in indicators:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # as theirs: an empty tail is replaced by the next
                    shortest = tail
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", ":", "'"):
            keys.append(shortest)
    if not keys:
        keys = [response]
    preds = list(keys)
    for k in keys:
        preds += mmmu_extract_numbers(k)
    out = []
    for p in preds:
        for v in mmmu_normalize(p):
            if v not in out:
                out.append(v)
    return out


def mmmu_open_correct(answers: list[str], parsed: list) -> bool:
    """MMMU's eval_open: a parsed string is right when a normalised answer occurs in it; a parsed number when it
    equals a normalised number answer."""
    norm = []
    for a in answers:
        norm += mmmu_normalize(a)
    for p in parsed:
        if isinstance(p, str):
            if any(isinstance(a, str) and a in p for a in norm):
                return True
        elif p in norm:
            return True
    return False


# ---- one question, the benchmark ---------------------------------------------------------------------------------

@dataclass
class ScoredChoice:
    qid: object
    question: str
    answer: str  # the right letter (multiple choice) or the first accepted answer (open)
    answer_text: str
    prediction: str  # the extracted answer
    choice: Optional[str]  # the letter chosen (None: none)
    how: str
    correct: bool
    kind: str = "choice"  # choice | open
    categories: dict = field(default_factory=dict)
    raw: str = ""
    compat: Optional[bool] = None  # MMMU's rule: right
    compat_choice: Optional[str] = None
    compat_random: bool = False


def score_choice(qid, question: str, options: dict[str, str], answer: str, prediction: str, kind: str = "choice",
                 categories: Optional[dict] = None, answers: Optional[list[str]] = None, raw: str = "",
                 mmmu: bool = False) -> ScoredChoice:
    """One question: ``answer`` the right letter (``kind`` choice) or ``answers`` the accepted texts (open);
    ``prediction`` what extract_answer found in the ``raw`` output."""
    from vlm.grpo import answer_format

    if kind == "open":
        accepted = answers or [answer]
        ok = open_correct(prediction, accepted)
        q = ScoredChoice(qid, question, accepted[0], accepted[0], prediction, None, "open", ok, kind,
                         categories or {}, raw)
        if mmmu:
            q.compat = mmmu_open_correct(accepted, mmmu_parse_open(raw or prediction))
        return q
    letter, how = strict_choice(prediction, options)
    if raw and how in ("letter", "contradiction", "none") and answer_format(raw) == "answer_is":
        line = answer_is_line(raw)
        if line and line != prediction:
            by_line = strict_choice(line, options)
            if by_line[1] in ("text", "letter+text"):  # the stated line is exactly one option, in full
                letter, how = by_line
    q = ScoredChoice(qid, question, answer, options.get(answer, ""), prediction, letter, how, letter == answer, kind,
                     categories or {}, raw)
    if mmmu:
        # MMMU parses the model's whole response (they prompt for the letter directly; no reasoning extraction)
        q.compat_choice, q.compat_random = mmmu_parse_choice(raw or prediction, options, seed=qid)
        q.compat = q.compat_choice == answer
    return q


def _rate(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def aggregate_choice(qs: list[ScoredChoice]) -> dict:
    choice = [q for q in qs if q.kind == "choice"]
    out = {"accuracy": _rate(q.correct for q in qs), "num_questions": len(qs), "num_correct": sum(q.correct for q in qs),
           "num_choice": len(choice), "num_open": len(qs) - len(choice),
           "answered_rate": _rate(q.choice is not None for q in choice),
           "answered_by": {h: sum(q.how == h for q in choice) for h in ("letter", "letter+text", "text")},
           "unanswered_by": {h: sum(q.how == h for q in choice) for h in ("contradiction", "none")}}
    if any(q.compat is not None for q in qs):
        out["compat"] = {"mmmu": {"accuracy": _rate(bool(q.compat) for q in qs),
                                  "num_random": sum(q.compat_random for q in qs),
                                  "rule": "MMMU's eval_utils parsing (parse_multi_choice_response / parse_open_response"
                                          " + eval_open); random picks seeded by question id"}}
    return out


def bootstrap_accuracy(qs: list[ScoredChoice], n: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the accuracy. Resampling N right/wrong questions with replacement puts
    Binomial(N, accuracy) right ones in the resample, so each resample's accuracy is drawn as that count / N: the
    same distribution as drawing N indices, in O(n) instead of an n x N index array (800 MB at 100k questions)."""
    import numpy as np

    if not qs or n <= 0:
        return []
    right = sum(q.correct for q in qs)
    means = np.random.default_rng(seed).binomial(len(qs), right / len(qs), size=n) / len(qs)
    return [float(np.percentile(means, (1 - level) / 2 * 100)), float(np.percentile(means, (1 + level) / 2 * 100))]


def breakdown_choice(qs: list[ScoredChoice]) -> dict:
    """Accuracy per value of each category (question type, modality, subject, ...)."""
    out: dict = {}
    for cat in sorted({k for q in qs for k, v in q.categories.items() if v not in (None, "")}):
        groups: dict = {}
        for q in qs:
            v = q.categories.get(cat)
            if v not in (None, ""):
                groups.setdefault(str(v), []).append(q.correct)
        out[cat] = {v: {"n": len(g), "accuracy": _rate(g)} for v, g in sorted(groups.items())}
    return out
