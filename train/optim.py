"""AdamW with decay only where it belongs, cosine schedule with warmup (in steps), and EMA."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

NO_DECAY_NAMES = ("bias", "logit_scale", "logit_bias", "positional_embedding", "class_embedding", "cls_token",
                  "pos_embed", "token_embedding", "embeddings")


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """No weight decay for norms, biases, logit scales/biases, and embeddings (1-D or named so).

    ``lr_scales``: {name prefix: factor} for parameters that train at their own learning rate.
    """
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
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
    fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


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
    """Exponential moving average of a model's floating-point state (weights and buffers), in fp32.

    Under FSDP2 the model's state dict holds DTensor shards: the shadow then holds the same shards
    (each rank averages its own, no communication per step). ``state_dict()`` gathers full tensors
    (a collective: every rank calls it; the values are complete on every rank), so the saved EMA has
    the model's shapes and loads anywhere the model does; ``load_state_dict`` takes full tensors and
    shards them like the model's."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        """Full (unsharded) fp32 tensors on the CPU, keyed like the model's state dict."""
        from torch.distributed.tensor import DTensor

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in self.shadow.items()}

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
