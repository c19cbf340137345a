"""GRPO with verifiable rewards: group-normalised advantages, the clipped-ratio policy loss with a KL to the
reference, and the reasoning format (``<think>...</think><answer>...</answer>``) reward and answer extraction.

For each question, G answers are sampled; answer i gets reward r_i (correctness from the project's scorers,
plus an optional format reward). Its advantage is ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)`` over its group
(``scale: group``; ``batch``: the std of the whole batch; ``none``: no division), std with Bessel's
correction, as TRL computes it. Per completion token t of answer i, with ratio ``rho = exp(logp - logp_old)``:

    loss_it = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it
    KL_it   = exp(logp_ref - logp) - (logp_ref - logp) - 1          (the k3 estimator, Schulman 2020)
              times rho when ``kl_ratio_correction`` (TRL's default, DeepSeek-V3.2: the sampled tokens came
              from the old policy, so the ratio makes the KL gradient the unbiased reverse-KL gradient)

aggregated (``loss_type``) as ``grpo``: each answer's token mean, then the mean over answers (Shao et al.
2024); ``bnpo``: the mean over every completion token of the batch; ``dr_grpo``: the token sum divided by
answers x max_completion_length (Liu et al. 2025). Parity with TRL's GRPOTrainer loss on a fixed batch of
samples and rewards is tested (tests/test_grpo.py). ``GRPOConfig`` is the ``grpo:`` section of a
train.preference config with ``objective: grpo`` (train/grpo.py runs it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
SCALES = ("group", "batch", "none")
QUESTIONS = ("all", "closed", "open")


@dataclass
class GRPOConfig:
    """GRPO with verifiable rewards (train.preference, ``objective: grpo``)."""

    group_size: int = 8  # G: answers sampled per question (>= 2: the advantage compares them)
    temperature: float = 1.0  # sampling temperature of the policy's answers
    top_p: float = 1.0  # nucleus sampling (1: off)
    max_new_tokens: int = 256  # longest answer sampled (also dr_grpo's normaliser)
    beta: float = 0.04  # KL to the reference (the starting policy); 0: no reference, no reference forward
    eps_low: float = 0.2  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: Optional[float] = None  # None: eps_low (DAPO uses 0.28)
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo (see the module docstring)
    scale_rewards: str = "group"  # advantages divided by the std of the group | of the step's batch | none
    kl_ratio_correction: bool = True  # the k3 KL times the ratio (TRL's default use_bias_correction_kl)
    # reward name (vlm/rewards.py registry) -> weight; the reward of an answer is the weighted sum. Empty (the
    # default): {vqa: 1.0} (reward_weights; a default mapping here would be merged with the config's, not replaced)
    rewards: Dict[str, float] = field(default_factory=dict)
    # which question/answer turns of a conversation become prompts: all, closed (the reference answer is yes
    # or no), open (any other answer)
    questions: str = "all"
    max_questions: int = 0  # at most this many prompts per sample (the first ones that pass; 0: all)
    # the user turn's text; {question} is replaced by the question. The same template must be given to
    # eval.vqa generate (--prompts) so the model is evaluated on the prompts it was trained on
    prompt: str = "{question}"

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (the advantage compares the answers of a group), "
                             f"got {self.group_size}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"grpo.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"grpo.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"grpo.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"grpo.beta must be >= 0 (0: no KL term, no reference), got {self.beta}")
        for name in ("eps_low", "eps_high"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1e3:
                raise ValueError(f"grpo.{name} must be > 0, got {v}")
        if self.eps_low >= 1:
            raise ValueError(f"grpo.eps_low must be < 1 (the ratio's lower clip 1 - eps_low > 0), got {self.eps_low}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"grpo.scale_rewards must be one of {', '.join(SCALES)}, got {self.scale_rewards!r}")
        if self.questions not in QUESTIONS:
            raise ValueError(f"grpo.questions must be one of {', '.join(QUESTIONS)}, got {self.questions!r}")
        if self.max_questions < 0:
            raise ValueError(f"grpo.max_questions must be >= 0 (0: all), got {self.max_questions}")
        if "{question}" not in self.prompt:
            raise ValueError(f"grpo.prompt must contain {{question}}, got {self.prompt!r}")
        from vlm.rewards import REWARDS

        unknown = sorted(set(self.rewards) - set(REWARDS))
        if unknown:
            raise ValueError(f"grpo.rewards: unknown reward(s) {', '.join(map(repr, unknown))}; registered: "
                             f"{', '.join(sorted(REWARDS))}")
        bad = [k for k, w in self.rewards.items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"grpo.rewards: the weight of {', '.join(bad)} is not a finite number")

    @property
    def reward_weights(self) -> dict[str, float]:
        """The rewards in use: ``rewards``, or {vqa: 1.0} when it is empty."""
        return dict(self.rewards) or {"vqa": 1.0}
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL | re.IGNORECASE)


_ANSWER_IS = re.compile(r"\b(?:the\s+)?(?:final\s+|correct\s+)?answer\s+is\s*:?\s*(.+?)\s*(?:\.\s|\.?$|\n)",
                        re.IGNORECASE | re.DOTALL)
_THINK_END = re.compile(r"</think>", re.IGNORECASE)
# runs of spaces and tabs read as one space before _ANSWER_IS: its lazy answer followed by \s* rescans a whitespace
# run from every position inside it (quadratic: 40,000 spaces took 19 s); one space per run keeps it linear
_HSPACE = re.compile(r"[^\S\n]+")


_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</answer>", re.IGNORECASE)


def _last_tagged(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` (tags in any case), matched left to right as a lazy regex
    would ("<answer>a</answer> <answer>b</answer>" -> "b"), in linear time: a regex search rescans the rest of
    the text from every unclosed "<answer>", quadratic on an output that repeats the tag without closing it."""
    pos, last = 0, None
    while (start := _OPEN_TAG.search(text, pos)) and (end := _CLOSE_TAG.search(text, start.end())):
        last, pos = text[start.end():end.start()], end.end()
    return last


def answer_format(text: str) -> str:
    """How an output states its answer: ``tags`` (a complete ``<answer>...</answer>``), ``answer_is``
    ("... The answer is X."), ``after_think`` (plain text after a closed ``<think>`` block) or ``plain``."""
    if _last_tagged(text) is not None:
        return "tags"
    tail = _THINK_END.split(text)[-1]
    if _ANSWER_IS.search(_HSPACE.sub(" ", tail)):
        return "answer_is"
    return "after_think" if len(_THINK_END.split(text)) > 1 else "plain"


def extract_answer(text: str) -> str:
    """The answer of a reasoning-style output, by ``answer_format``: the content of its last
    ``<answer>...</answer>``; else what follows the last "the answer is" (up to the end of that sentence; runs
    of spaces in it read as one);
    else the text after the last ``</think>`` (the reasoning never counts); else the output unchanged (a
    plain answer, scored as it always was). Stripped. What eval scores and what the GRPO correctness reward
    reads are this same function."""
    found = _last_tagged(text)
    if found is not None:
        return found.strip()
    tail = _THINK_END.split(text)[-1]
    said = _ANSWER_IS.findall(_HSPACE.sub(" ", tail))
    if said:
        return said[-1].strip()
    return tail.strip() if tail is not text else text


def format_reward(text: str) -> float:
    """1.0 for ``<think>...</think>`` followed by ``<answer>...</answer>`` and nothing else (whitespace
    aside), each tag once; else 0.0."""
    if not _FORMAT.match(text):
        return 0.0
    lower = text.lower()
    return 1.0 if all(lower.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>")) else 0.0


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """rewards (N,) in groups of ``group`` consecutive answers to the same question -> advantages (N,)."""
    if group < 2 or rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group} (group >= 2)")
    r = rewards.float().view(-1, group)
    adv = (r - r.mean(1, keepdim=True)).reshape(-1)
    if scale == "group":
        return adv / (r.std(1, keepdim=True).expand_as(r).reshape(-1) + 1e-4)
    if scale == "batch":
        return adv / (rewards.float().std() + 1e-4)
    if scale == "none":
        return adv
    raise ValueError(f"scale must be group, batch or none, got {scale!r}")


def grpo_loss(logps: torch.Tensor, old_logps: Optional[torch.Tensor], advantages: torch.Tensor,
              mask: torch.Tensor, ref_logps: Optional[torch.Tensor] = None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: Optional[float] = None, loss_type: str = "grpo",
              max_completion_length: Optional[int] = None,
              kl_ratio_correction: bool = True) -> tuple[torch.Tensor, dict]:
    """logps / old_logps / ref_logps (B, T) per completion token, advantages (B,), mask (B, T) of completion
    tokens -> (scalar loss, metrics). ``old_logps`` None: the policy that sampled is this one (one update
    per generation): the ratio is 1 with the policy's gradient."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + (eps_low if eps_high is None else eps_high))
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * (kl * ratio if kl_ratio_correction else kl)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        if not max_completion_length:
            raise ValueError("loss_type=dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    n = mask.sum().clamp(min=1.0)
    metrics = {"clip_ratio": (((ratio < 1 - eps_low) | (ratio > 1 + (eps_low if eps_high is None else eps_high)))
                              .to(mask.dtype) * mask).sum().detach() / n}
    if kl is not None:
        metrics["kl"] = (kl * mask).sum().detach() / n
    return loss, metrics
