"""Verifiable rewards for GRPO: a registry of named functions ``reward(completion, answer, question) -> float``.

``completion`` is the sampled answer text as eval writes it (decoded, special tokens dropped), ``answer`` the
reference answer, ``question`` the question as the data set asks it (without the prompt template). Answer
rewards score ``vlm.grpo.extract_answer(completion)`` (the content of the last ``<answer>...</answer>``, or
the whole text when there is none), the same extraction ``eval.vqa score`` applies, with the scorers of
vlm/vqa_metrics.py that eval.vqa reports:

    closed_accuracy  strict closed correctness (``closed_correct``): for a yes/no answer the first yes/no word
                     of the prediction equals it; for a choice question ("heart or lung?") the prediction names
                     the answer and no other option; otherwise the normalised texts are equal
    open_exact       exact match of the normalised texts
    open_recall      token recall: the fraction of the answer's tokens found in the prediction
    vqa              what eval.vqa reports per question: closed_accuracy for a yes/no answer, open_recall for
                     any other
    format           ``<think>...</think><answer>...</answer>`` and nothing else (``vlm.grpo.format_reward``),
                     on the whole completion

Report rewards (the answer is the reference report; the whole completion is scored, after
``extract_answer``):

    report_rouge_l   ROUGE-L of the report against the reference, R2Gen's cleaning (vlm/report_metrics.py,
                     pycocoevalcap's scorer: the per-report value of the metric eval.report publishes)
    report_bleu_4    sentence-level BLEU-4, likewise
    factuality       1 minus a penalty of 0.5 per hallucinated finding and per prior-exam sentence
                     (vlm/factuality.py's rules), at least 0: a report without either gets 1

An empty report (no letter or digit) gets 0 from every report reward.

More rewards are one decorated function away::

    @register("short")
    def short(completion, answer, question):
        return 1.0 if len(completion.split()) <= 50 else 0.0

A name must be registered before the run config is validated (import the module that registers it).
"""
from __future__ import annotations

from typing import Callable

from vlm.grpo import extract_answer, format_reward
from vlm.vqa_metrics import closed_correct, exact_match, normalize, token_recall

Reward = Callable[[str, str, str], float]
REWARDS: dict[str, Reward] = {}


def register(name: str):
    """Decorator: add ``fn(completion, answer, question) -> float`` to the registry under ``name``."""
    def add(fn: Reward) -> Reward:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name].__qualname__})")
        REWARDS[name] = fn
        return fn
    return add


def get_reward(name: str) -> Reward:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(REWARDS))} "
                         "(add one with vlm.rewards.register)")
    return REWARDS[name]


def is_closed(answer: str) -> bool:
    """A closed question, for rewards and for grpo.questions: its reference answer is yes or no."""
    return normalize(answer) in ("yes", "no")


@register("closed_accuracy")
def closed_accuracy(completion: str, answer: str, question: str) -> float:
    return float(closed_correct(question, answer, extract_answer(completion)))


@register("open_exact")
def open_exact(completion: str, answer: str, question: str) -> float:
    return exact_match(answer, extract_answer(completion))


@register("open_recall")
def open_recall(completion: str, answer: str, question: str) -> float:
    return token_recall(answer, extract_answer(completion))


@register("vqa")
def vqa(completion: str, answer: str, question: str) -> float:
    if is_closed(answer):
        return closed_accuracy(completion, answer, question)
    return open_recall(completion, answer, question)


@register("format")
def reasoning_format(completion: str, answer: str, question: str) -> float:
    return format_reward(completion)


def _report_score(metric: str, completion: str, answer: str) -> float | None:
    """One report's score, or None for an empty one (no letter or digit: R2Gen's cleaning would score " .")."""
    from vlm.report_metrics import per_report_scores

    report = extract_answer(completion)
    if not any(ch.isalnum() for ch in report):
        return None
    return per_report_scores({"r": answer}, {"r": report}, metric)["r"]


@register("report_rouge_l")
def report_rouge_l(completion: str, answer: str, question: str) -> float:
    return _report_score("rouge_l", completion, answer) or 0.0


@register("report_bleu_4")
def report_bleu_4(completion: str, answer: str, question: str) -> float:
    return _report_score("bleu_4", completion, answer) or 0.0


@register("factuality")
def factuality(completion: str, answer: str, question: str) -> float:
    penalty = _report_score("factuality", completion, answer)
    return 0.0 if penalty is None else max(0.0, 1.0 + 0.5 * penalty)
