"""AdamW with decay only where it belongs, cosine schedule with warmup (in steps), and EMA."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

NO_DECAY_NAMES = ("bias", "logit_scale", "logit_bias", "positional_embedding", "class_embedding", "cls_token",
                  "pos_embed", "token_embedding", "embeddings")


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """No weight decay for norms, biases, logit scales/biases, and embeddings (1-D or named so).

    ``lr_scales``: {name prefix: factor} for parameters that train at their own learning rate, matched
    against the model's own names (a DDP wrapper's ``module.`` and torch.compile's ``_orig_mod.`` removed:
    the optimizer is built after parallelize).
    """
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        while name.startswith(("module.", "_orig_mod.")):
            name = name.split(".", 1)[1]
        decay = p.ndim >= 2 and not any(k in name for k in NO_DECAY_NAMES)
        scale = next((f for prefix, f in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in groups.items()]


def build_optimizer(model: nn.Module, cfg, lr_scales=None) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, lr_scales)
    if not groups:
        raise ValueError("no trainable parameters (every tower locked?)")
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    # fused AdamW (CPU and CUDA kernels): one kernel per step, and it skips a step on device when the trainer
    # sets ``opt.found_inf`` (a non-finite loss or gradient) without the host reading the flag
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    except RuntimeError:  # parameters the fused kernels do not take (a device or dtype without them)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))


class EMA:
    """Exponential moving average of a model's trainable weights, in fp32.

    Frozen weights never change, so their average is themselves: only trainable parameters are shadowed
    (a LoRA run keeps no fp32 copy of its frozen 7B base). Under FSDP2 the parameters are DTensor shards and
    the shadow holds the same shards (each rank averages its own, no communication per step).
    Checkpoints hold the shadow as shards beside the model's (vlm.checkpoint: "ema.*", with ``aliases`` for tied
    weights); ``load_state_dict`` takes a whole-model EMA of the earlier single-file format."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}
        canonical = {id(p): n for n, p in model.named_parameters()}
        self.aliases = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
                        if canonical[id(p)] != n and canonical[id(p)] in self.shadow}  # tied weights

    @torch.no_grad()
    def update(self, model: nn.Module, keep: torch.Tensor | None = None) -> None:
        """One EMA step; ``keep`` (a 0-dim bool tensor, on device): False leaves the average as it is (a skipped
        optimizer step), decided without reading the flag on the host."""
        params = dict(model.named_parameters())
        weight = 1 - self.decay
        if keep is not None:
            weight = keep.to(torch.float32) * weight
        for n, s in self.shadow.items():
            w = weight.to(s.device) if torch.is_tensor(weight) else weight
            s.lerp_(params[n].detach().float(), w)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"the saved EMA lacks {len(missing)} tensors of this model: {missing[:5]}")
        for k, cur in self.shadow.items():
            full = state[k].float()
            if tuple(full.shape) != tuple(cur.shape):
                raise ValueError(f"saved EMA tensor {k} has shape {tuple(full.shape)}, the model {tuple(cur.shape)}")
            if isinstance(cur, DTensor):
                self.shadow[k] = distribute_tensor(full.to(cur.device), cur.device_mesh, cur.placements)
            else:
                self.shadow[k] = full.to(cur.device).clone()
