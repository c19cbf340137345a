"""Preference losses of the DPO family, on sequence log-probabilities.

A pair is a prompt (with its images) and two responses, chosen (w) and rejected (l). The policy's and the
reference's log-probabilities of each response, summed over its tokens, are ``pi_w, pi_l, ref_w, ref_l``
(shape (P,) for P pairs); ``n_w, n_l`` are the responses' token counts. With the DPO log-ratio margin
``delta = (pi_w - ref_w) - (pi_l - ref_l)``:

    dpo     -log sigmoid(beta * delta)                                     (Rafailov et al. 2023)
    cdpo    -(1 - eps) log sigmoid(beta * delta) - eps log sigmoid(-beta * delta)
            (conservative DPO: labels flipped with probability eps = label_smoothing)
    ipo     (delta_avg - 1 / (2 beta))^2, delta_avg the margin of the per-token averages
            ((pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l), as TRL computes it (Azar et al., Eq. 17)
    simpo   -log sigmoid(beta * (pi_w / n_w - pi_l / n_l) - gamma)  (no reference; Meng et al. 2024)
    orpo    NLL of the chosen tokens (mean over them) - beta * log sigmoid(log odds(w) - log odds(l)), the odds
            of the per-token average probability, odds(p) = p / (1 - p)  (no reference; Hong et al. 2024)

Implicit rewards (logged, as TRL logs them): ``beta * (pi - ref)``; for the reference-free SimPO and ORPO
``beta * pi / n``. Parity with TRL's trainers is tested on the same tiny model and batch
(tests/test_preference.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "cdpo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PreferenceLossConfig:
    loss: str = "dpo"  # dpo | ipo | cdpo | simpo | orpo
    beta: float = 0.1  # DPO/cDPO/IPO: the KL strength; SimPO: the reward scale; ORPO: the odds-ratio weight
    label_smoothing: float = 0.0  # cdpo: probability that a pair's labels are flipped (0 < eps < 0.5)
    gamma: float = 0.5  # simpo: the target reward margin

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ValueError("loss=cdpo needs label_smoothing > 0 (with 0 it is dpo)")
        if self.label_smoothing > 0 and self.loss not in ("cdpo", "simpo"):
            raise ValueError(f"label_smoothing applies to cdpo and simpo, not {self.loss} (dpo with label smoothing "
                             "is loss=cdpo)")
        if self.gamma != 0.5 and self.loss != "simpo":
            raise ValueError(f"gamma is SimPO's target margin; it does not apply to {self.loss}")

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) -> per-token log-probabilities of the labels (B, T - 1) of the
    next-token predictions, 0 where the label is ``ignore_index``. Only the labelled positions are taken to
    fp32 and normalised ((N, V), N the labelled tokens: a response, not the prompt and its image tokens)."""
    target = labels[:, 1:]
    mask = target != ignore_index
    picked = logits[:, :-1][mask].float()  # (N, V)
    lp = picked.gather(1, target[mask].unsqueeze(1)).squeeze(1) - torch.logsumexp(picked, dim=-1)
    out = torch.zeros(target.shape, dtype=lp.dtype, device=lp.device)
    return out.masked_scatter(mask, lp)


def preference_loss(cfg: PreferenceLossConfig, pi_w: torch.Tensor, pi_l: torch.Tensor, n_w: torch.Tensor,
                    n_l: torch.Tensor, ref_w: torch.Tensor | None = None, ref_l: torch.Tensor | None = None,
                    nll_w: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """-> (per-pair losses (P,), metrics). ``nll_w``: ORPO's per-pair summed chosen NLL; its mean over the
    chosen tokens of these pairs is added to every pair's loss (a trainer that splits a step over
    micro-batches or ranks passes zeros and adds the NLL over the whole step's chosen tokens itself).
    Metrics are detached per-pair tensors: rewards of chosen and rejected, margins, reward accuracy,
    log-probs."""
    n_w, n_l = n_w.to(pi_w).clamp(min=1), n_l.to(pi_l).clamp(min=1)
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.needs_reference:
        if ref_w is None or ref_l is None:
            raise ValueError(f"loss={cfg.loss} needs the reference model's log-probabilities")
        r_w, r_l = pi_w - ref_w, pi_l - ref_l
        delta = r_w - r_l
        if cfg.loss == "dpo":
            losses = -F.logsigmoid(beta * delta)
        elif cfg.loss == "cdpo":
            losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
        else:  # ipo
            losses = (r_w / n_w - r_l / n_l - 1 / (2 * beta)) ** 2
        rewards_w, rewards_l = beta * r_w.detach(), beta * r_l.detach()
    elif cfg.loss == "simpo":
        avg_w, avg_l = pi_w / n_w, pi_l / n_l
        z = beta * (avg_w - avg_l) - cfg.gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        rewards_w, rewards_l = beta * avg_w.detach(), beta * avg_l.detach()
    else:  # orpo
        if nll_w is None:
            raise ValueError("loss=orpo needs the chosen responses' NLL")
        avg_w, avg_l = pi_w / n_w, pi_l / n_l
        log_odds = (avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))
        nll = nll_w.sum() / n_w.sum()  # the mean NLL over every chosen token of these pairs
        losses = nll - beta * F.logsigmoid(log_odds)
        rewards_w, rewards_l = beta * avg_w.detach(), beta * avg_l.detach()
    metrics = {"rewards/chosen": rewards_w, "rewards/rejected": rewards_l, "rewards/margins": rewards_w - rewards_l,
               "rewards/accuracy": (rewards_w > rewards_l).float(), "logps/chosen": pi_w.detach(),
               "logps/rejected": pi_l.detach()}
    return losses, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
