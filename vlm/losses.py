"""Training losses: CLIP (InfoNCE) and SigLIP (sigmoid) from open_clip, ConceptCLIP-style
patch-concept alignment, and the masked LM loss of instruction tuning.

Distributed semantics (checked by tests with 2 gloo processes): every loss here is written so that
averaging gradients over ranks (what DDP does) gives exactly the gradient of the same loss on the
global batch in one process. Features are gathered with ``torch.distributed.nn.all_gather``,
which keeps the gradient path to every rank's own features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss


@dataclass
class LossConfig:
    """Contrastive objective and concept alignment."""

    kind: str = "clip"  # clip (InfoNCE, softmax) | siglip (sigmoid)
    local_loss: bool = False  # clip: local rows vs global columns (O(local x global) memory)
    gather_with_grad: bool = True  # clip: keep gradients through the feature all-gather
    concept_weight: float = 0.0  # > 0 adds ConceptCLIP's patch-concept alignment
    concepts_per_sample: int = 4  # at most this many (non-negated) concepts per caption
    logit_scale_max: float = 100.0  # clamp exp(logit_scale) after every step

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ValueError(f"loss.kind must be clip or siglip, got {self.kind!r}")
        if not (self.concept_weight >= 0 and math.isfinite(self.concept_weight)):  # NaN fails every comparison
            raise ValueError(f"loss.concept_weight must be a finite number >= 0, got {self.concept_weight}")
        if not (self.logit_scale_max > 1 and math.isfinite(self.logit_scale_max)):
            raise ValueError(f"loss.logit_scale_max must be a finite number > 1, got {self.logit_scale_max}")
        if self.concepts_per_sample < 1:
            raise ValueError(f"loss.concepts_per_sample must be >= 1, got {self.concepts_per_sample}")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (W * B, ...) in rank order; gradients flow back to every rank."""
    _, world = _world()
    if world == 1:
        return x
    import torch.distributed.nn  # noqa: F401  (registers the autograd-aware collectives)

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def contrastive_loss(cfg: LossConfig):
    rank, world = _world()
    if cfg.kind == "clip":
        return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                        rank=rank, world_size=world)
    return SigLipLoss(rank=rank, world_size=world)


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (no gradient), rank-major, rows may differ in number; -> (rows, my offset)."""
    rank, world = _world()
    if world == 1:
        return x.detach(), 0
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    pad = x.new_zeros((max(counts), *x.shape[1:]))
    pad[:x.shape[0]] = x.detach()
    parts = [torch.zeros_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[:rank])


def concept_align_loss(patches: torch.Tensor, concept_emb: torch.Tensor, positives: torch.Tensor,
                       logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """ConceptCLIP's patch-concept alignment (sigmoid) over the global batch.

    patches:     (B, N, D) this rank's normalised patch embeddings
    concept_emb: (C, D)    this rank's normalised concept text embeddings
    positives:   (C_all, J) 1 where image j (global, rank-major) has concept c (global, rank-major)
    Each concept is scored against its best-matching patch of every image of the global batch:
    s_cj = max_n <t_c, p_jn>; logit = exp(scale) * s_cj + bias; the loss is the BCE averaged over
    all (concept, image) pairs of the global batch.

    No autograd collectives: every rank gathers the others' patches and concepts without
    gradients and scores (a) its concepts against every image and (b) every other concept against
    its images; (b) enters as ``x - x.detach()`` (gradient, no value). Summed over ranks, each pair's
    gradient reaches its concept once and its image once, so DDP's average equals the
    single-process gradient, and no collective can interleave with DDP's own all-reduces.
    """
    _, world = _world()
    all_p, p_off = _gather_rows(patches)  # (J, N, D)
    all_c, c_off = _gather_rows(concept_emb)  # (C_all, D)
    B, C = patches.shape[0], concept_emb.shape[0]
    scale = logit_scale.exp()

    def bce(t, p, target, scale, bias):  # (c, D) x (j, N, D) -> summed BCE of best-patch logits
        logits = scale * torch.einsum("cd,jnd->cjn", t, p).amax(dim=-1) + bias
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum")

    all_p = torch.cat([all_p[:p_off], patches, all_p[p_off + B:]])  # own images keep their gradient
    if C:
        own = bce(concept_emb, all_p, positives[c_off:c_off + C], scale, logit_bias)
    else:  # this rank encodes no concept: scale and bias still take part (zero gradient), or DDP would wait
        own = patches.sum() * 0 + (scale + logit_bias) * 0
    others = torch.cat([all_c[:c_off], all_c[c_off + C:]])
    if others.shape[0]:
        other_pos = torch.cat([positives[:c_off], positives[c_off + C:]])[:, p_off:p_off + B]
        # the scale and bias already get these pairs' gradient on the concepts' own ranks
        extra = bce(others, patches, other_pos, scale.detach(), logit_bias.detach())
        own = own + (extra - extra.detach())
    pairs = max(1, all_c.shape[0]) * all_p.shape[0]
    return own * world / pairs


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions; (B, T, V) logits, (B, T) labels, shift inside."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=ignore_index)
