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


def parallelize(model: nn.Module, d: Dist, parallel: str = "ddp", shard_modules: tuple[type, ...] = ()) -> nn.Module:
    """Wrap a single-device model for data parallel training: DDP, or FSDP2 (``fully_shard``)
    applied to every ``shard_modules`` instance, then to the root. Identity in one process."""
    model.to(d.device)
    if not d.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 cannot shard 0-dim parameters (logit scales and biases): they stay replicated, and
        # sync_replicated_grads averages their gradients like DDP would
        scalars = {p for p in model.parameters() if p.ndim == 0}
        for m in model.modules():
            if shard_modules and isinstance(m, shard_modules):
                fully_shard(m, ignored_params=scalars)
        fully_shard(model, ignored_params=scalars)
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
