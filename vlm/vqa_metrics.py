"""VQA metrics: strict (corrected) metrics, and LLaVA-Med's v1 protocol reproduced exactly.

Strict metrics, over a normalised text (lower case, punctuation to spaces except decimal points
and thousands separators inside numbers, number words to digits, articles dropped):

* closed accuracy: for a yes/no answer, the first yes/no word of the prediction equals it
  (anything else is wrong: "normal" is not "no"); for a choice question ("which is larger, the
  heart or the lung?") the prediction names the answer and none of the other options; otherwise
  the normalised prediction equals the answer;
* exact match and token F1 (SQuAD-style, multiset overlap) on open questions;
* open recall: the fraction of the answer's tokens (with multiplicity) found in the prediction.

The ``llava_med`` block reproduces LLaVA-Med v1's ``llava/eval/run_eval_batch.py`` with its
``eval_metrics`` (``normalize_word`` and all): substring-based closed accuracy and open accuracy,
token recall ("open recall" in the paper's tables), and its exact-match and F1 definitions,
including their quirks, so numbers are comparable with published ones. Quirks kept on purpose:
"none" maps to "0", the period regex removes at most 32 periods (``re.UNICODE`` passed as
count), the punctuation rule tests the original string, "exact match" is a precision, and the
F1 counts the prediction's multiplicity.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# ------------------------------------------------------------------------------------------
# Strict normalisation

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12"}
ARTICLES = {"a", "an", "the"}
_NUM_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUM_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_NON_WORD = re.compile(r"[^\w\s\u0001]")


def normalize(text: str) -> str:
    """Lower case; punctuation to spaces (keeping 3.5 and 1,000 intact); number words to digits; no articles."""
    t = str(text).lower().strip()
    t = _NUM_COMMA.sub("", t)
    t = _NUM_POINT.sub("\u0001", t)  # protect decimal points from the punctuation rule
    t = _NON_WORD.sub(" ", t).replace("\u0001", ".").replace("_", " ")
    return " ".join(NUMBER_WORDS.get(w, w) for w in t.split() if w not in ARTICLES)


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def first_yes_no(text: str) -> str | None:
    for w in tokens(text):
        if w in ("yes", "no"):
            return w
    return None


_OPTIONS = re.compile(r"(?:^|,|:|\b(?:is it|is this|are they|is there|was it))\s*([^,:?]+?\s+or\s+[^?]+?)\s*\??$")


def choice_options(question: str) -> list[str]:
    """The options of an 'A or B' question, normalised: 'Which is bigger, the heart or the lung?' -> [heart, lung]."""
    q = str(question).strip().lower()
    m = _OPTIONS.search(q)
    if not m:
        return []
    clause = m.group(1)
    parts = re.split(r"\s*,\s*|\s+or\s+", clause)
    opts = [normalize(p) for p in parts if normalize(p)]
    return opts if len(opts) >= 2 else []


def _contains_phrase(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def closed_correct(question: str, answer: str, prediction: str) -> bool:
    ans = normalize(answer)
    if ans in ("yes", "no"):
        return first_yes_no(prediction) == ans
    pred = tokens(prediction)
    opts = choice_options(question)
    if opts and any(ans == o or _contains_phrase(o.split(), ans.split()) or _contains_phrase(ans.split(), o.split())
                    for o in opts):
        if not _contains_phrase(pred, ans.split()):
            return False
        others = [o for o in opts if o != ans and not _contains_phrase(ans.split(), o.split())
                  and not _contains_phrase(o.split(), ans.split())]
        return not any(_contains_phrase(pred, o.split()) for o in others)
    return " ".join(pred) == ans


def exact_match(answer: str, prediction: str) -> float:
    return float(normalize(answer) == normalize(prediction))


def token_f1(answer: str, prediction: str) -> float:
    a, p = Counter(tokens(answer)), Counter(tokens(prediction))
    common = sum((a & p).values())
    if not a or not p or common == 0:
        return float(not a and not p)
    prec, rec = common / sum(p.values()), common / sum(a.values())
    return 2 * prec * rec / (prec + rec)


def token_recall(answer: str, prediction: str) -> float:
    a, p = Counter(tokens(answer)), Counter(tokens(prediction))
    return sum((a & p).values()) / sum(a.values()) if a else float(not p)


# ------------------------------------------------------------------------------------------
# LLaVA-Med v1 (llava/eval/eval_metrics/glossary.py, evaluate_metrics.py, run_eval_batch.py)

LLAVA_MED_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
LLAVA_MED_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                     "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
LLAVA_MED_ARTICLES = ("a", "an", "the")
LLAVA_MED_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!")
_LM_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: a lookahead, so '.' not before a digit
_LM_DIGIT_COMMA = re.compile(r"(\d)(\,)(\d)")
_LM_PERIOD_MAX = int(re.UNICODE)  # they pass re.UNICODE (32) as sub()'s count argument


def llava_med_normalize_word(token: str) -> str:
    """LLaVA-Med v1's normalize_word, rule for rule."""
    out = token
    digit_comma = _LM_DIGIT_COMMA.search(token) is not None
    for p in LLAVA_MED_PUNCT:
        # the test looks at the original string, the replacement acts on the running one
        if (p + " " in token or " " + p in token) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    token = _LM_PERIOD.sub("", out, count=_LM_PERIOD_MAX)
    words = []
    for w in token.lower().split():
        w = LLAVA_MED_NUMBERS.get(w, w)
        if w not in LLAVA_MED_ARTICLES:
            words.append(w)
    words = [LLAVA_MED_CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words).replace(",", "")


def _lm_words(sentence: str) -> Counter:
    return Counter(sentence.lower().strip().split())


def llava_med_exact_match(candidate: str, reference: str) -> float:
    """Their calculate_exactmatch: distinct reference words found in the candidate / candidate length."""
    cand = _lm_words(llava_med_normalize_word(candidate))
    ref = _lm_words(llava_med_normalize_word(reference))
    total = sum(cand.values())
    return sum(1 for w in ref if w in cand) / total if total else 0.0


def llava_med_f1(candidate: str, reference: str) -> tuple[float, float, float]:
    """Their calculate_f1score -> (f1, precision, recall); tp counts the candidate's multiplicity."""
    cand = _lm_words(llava_med_normalize_word(candidate))
    ref = _lm_words(llava_med_normalize_word(reference))
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in cand.items() if w in ref)
    fp = sum(c for w, c in cand.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in cand)
    if tp == 0:
        return 0.0, 0.0, 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r), p, r


def llava_med_scores(answer: str, prediction: str, answer_type: str) -> dict:
    """One question as run_eval_batch.evaluate scores it (lower-cased, normalised, then the metrics)."""
    gt = llava_med_normalize_word(str(answer).lower())
    pred = llava_med_normalize_word(str(prediction).lower())
    hit = float(gt in pred)
    if answer_type == "OPEN":
        f1, p, r = llava_med_f1(pred, gt)
        return {"hit": hit, "exact": llava_med_exact_match(pred, gt), "f1": f1, "precision": p, "recall": r}
    return {"hit": hit}


# ------------------------------------------------------------------------------------------
# Scoring a benchmark


@dataclass
class ScoredQuestion:
    qid: object
    question: str
    answer: str
    prediction: str
    answer_type: str  # OPEN | CLOSED
    categories: dict = field(default_factory=dict)
    strict: dict = field(default_factory=dict)
    llava_med: dict = field(default_factory=dict)
    raw: str = ""  # the output as generated, when the prediction scored is the answer extracted from it


def score_question(qid, question: str, answer: str, prediction: str, answer_type: str,
                   categories: dict | None = None) -> ScoredQuestion:
    prediction = "" if prediction is None else str(prediction)
    sq = ScoredQuestion(qid, question, str(answer), prediction, answer_type, categories or {})
    if answer_type == "CLOSED":
        sq.strict = {"correct": float(closed_correct(question, answer, prediction))}
    else:
        sq.strict = {"exact_match": exact_match(answer, prediction), "token_f1": token_f1(answer, prediction),
                     "recall": token_recall(answer, prediction)}
    sq.llava_med = llava_med_scores(answer, prediction, answer_type)
    return sq


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0


def aggregate(qs: list[ScoredQuestion]) -> dict:
    """The result keys of DESIGN section 4 for a list of scored questions."""
    open_q = [q for q in qs if q.answer_type == "OPEN"]
    closed_q = [q for q in qs if q.answer_type == "CLOSED"]
    out = {
        "num_questions": len(qs), "num_open": len(open_q), "num_closed": len(closed_q),
        "closed_accuracy": _mean(q.strict["correct"] for q in closed_q),
        "open_recall": _mean(q.strict["recall"] for q in open_q),
        "exact_match": _mean(q.strict["exact_match"] for q in open_q),
        "token_f1": _mean(q.strict["token_f1"] for q in open_q),
    }
    out["overall_accuracy"] = _mean([q.strict["correct"] for q in closed_q] +
                                    [q.strict["exact_match"] for q in open_q])
    out["llava_med"] = {
        "open_recall": _mean(q.llava_med["recall"] for q in open_q),
        "closed_accuracy": _mean(q.llava_med["hit"] for q in closed_q),
        "open_substring_accuracy": _mean(q.llava_med["hit"] for q in open_q),
        "open_exact_match": _mean(q.llava_med["exact"] for q in open_q),
        "open_f1": _mean(q.llava_med["f1"] for q in open_q),
        "open_precision": _mean(q.llava_med["precision"] for q in open_q),
    }
    return out


METRIC_COLUMNS = {  # metric -> (question filter, per-question value)
    "closed_accuracy": ("CLOSED", lambda q: q.strict["correct"]),
    "open_recall": ("OPEN", lambda q: q.strict["recall"]),
    "exact_match": ("OPEN", lambda q: q.strict["exact_match"]),
    "token_f1": ("OPEN", lambda q: q.strict["token_f1"]),
    "llava_med.open_recall": ("OPEN", lambda q: q.llava_med["recall"]),
    "llava_med.closed_accuracy": ("CLOSED", lambda q: q.llava_med["hit"]),
}


def bootstrap_ci(qs: list[ScoredQuestion], n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals, resampling questions within each answer type."""
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, (kind, value) in METRIC_COLUMNS.items():
        vals = np.array([value(q) for q in qs if q.answer_type == kind], dtype=np.float64)
        if len(vals) == 0:
            continue
        idx = rng.integers(0, len(vals), size=(n, len(vals)))
        means = vals[idx].mean(axis=1)
        out[name] = [float(np.percentile(means, lo_q)), float(np.percentile(means, hi_q))]
    return out


def breakdown(qs: list[ScoredQuestion]) -> dict:
    """Metrics per value of every category the data set has (answer type, content type, modality, organ)."""
    out: dict = {}
    keys = sorted({k for q in qs for k in q.categories})
    for key in keys:
        groups: dict[str, list] = {}
        for q in qs:
            if q.categories.get(key) not in (None, ""):
                groups.setdefault(str(q.categories[key]), []).append(q)
        out[key] = {v: {k: r for k, r in aggregate(g).items() if k in (
            "num_open", "num_closed", "closed_accuracy", "open_recall", "exact_match", "token_f1")}
            for v, g in sorted(groups.items())}
    return out
