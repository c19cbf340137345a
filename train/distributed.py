"""Process groups from torchrun's environment, and the one place where parallelism is applied.

``python -m train.clip`` (no torchrun) runs as a single process; under ``torchrun`` RANK,
WORLD_SIZE and LOCAL_RANK come from the environment. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from vlm.utils import Dist, torchrun_env

log = logging.getLogger(__name__)


def init_distributed() -> Dist:
    """torchrun's environment (vlm.utils.torchrun_env) plus the process group when there are ranks."""
    d = torchrun_env()
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        log.info("process group: %s, rank %d of %d", backend, d.rank, d.world_size)
    return d


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def set_master_dtype(model: nn.Module, dtype: torch.dtype, only_trainable: bool = False) -> int:
    """Cast floating-point parameters (and buffers) to ``dtype`` in place: fp32 master weights keep small
    updates, and a bf16-stored LLM next to an fp32 projector becomes one dtype, which FSDP2 needs.
    ``only_trainable``: cast the trainable parameters only (frozen weights, such as a LoRA run's base
    LLM, stay as stored: bf16 autocast computes with them as they are, at half the memory).
    Integer (quantized) weights are left alone. Returns how many tensors were cast."""
    n = 0
    tensors = [p for p in model.parameters() if p.requires_grad] if only_trainable else \
        [*model.parameters(), *model.buffers()]
    for t in tensors:
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
            n += 1
    return n


def parallelize(model: nn.Module, d: Dist, parallel: str = "ddp", shard_modules: tuple[type, ...] = (),
                precision: str = "fp32") -> nn.Module:
    """Wrap a single-device model for data parallel training: DDP, or FSDP2 (``fully_shard``)
    applied to every ``shard_modules`` instance, then to the root. Identity in one process.

    FSDP2 with ``precision=bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``:
    parameters all-gathered and computed in bf16, gradients reduced in fp32 onto the sharded master
    weights (whatever dtype they are kept in: train.master_dtype)."""
    model.to(d.device)
    if not d.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        # FSDP2 cannot shard 0-dim parameters (logit scales and biases): they stay replicated, and
        # sync_replicated_grads averages their gradients like DDP would. A list in named order: every rank
        # must all-reduce them in the same order (a set's order is its members' memory addresses)
        scalars = [p for _, p in model.named_parameters() if p.ndim == 0]
        for m in model.modules():
            if shard_modules and isinstance(m, shard_modules):
                fully_shard(m, ignored_params=set(scalars), mp_policy=mp)
        fully_shard(model, ignored_params=set(scalars), mp_policy=mp)
        model._replicated_params = [p for p in scalars if p.requires_grad]
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
               find_unused_parameters=False)


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of parameters FSDP leaves replicated (no-op otherwise)."""
    params = getattr(model, "_replicated_params", None)
    if not params or not (dist.is_available() and dist.is_initialized()):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global gradient norm of ``params`` to ``max_norm``; returns the norm before clipping.

    Works for any mix of FSDP2-sharded (DTensor) and plain gradients (the replicated scalars FSDP leaves
    out), which torch's clip_grad_norm_ cannot stack together: each kind's norm is taken on its own
    (DTensor norms are reduced over the mesh) and combined."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sq = torch.zeros((), device=grads[0].device, dtype=torch.float32)
    for kind in (True, False):
        group = [g for g in grads if isinstance(g, DTensor) == kind]
        if group:
            n = torch.nn.utils.get_total_norm(group, 2.0)
            n = n.full_tensor() if isinstance(n, DTensor) else n
            sq = sq + n.float().to(sq.device) ** 2
    total = float(sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
