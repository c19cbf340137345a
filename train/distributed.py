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


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, found by structure rather than by name: the entries of every ModuleList
    of two or more modules of one type (open_clip resblocks, timm blocks, Hugging Face encoder and decoder
    layers), outermost only (a list inside a block belongs to that block)."""
    found: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            found.extend(m)
    inner = {id(sub) for b in found for sub in b.modules() if sub is not b}
    return [b for b in found if id(b) not in inner]


def compile_blocks(blocks: list[nn.Module]) -> int:
    """``torch.compile`` each block's forward (before FSDP2 wraps it, as torchtitan does): the module, its
    parameter names and FSDP's hooks stay as they are, the block's computation runs as one compiled graph
    (recompiled for new shapes, with dynamic shapes after the first change). Returns how many were compiled."""
    for b in blocks:
        b.forward = torch.compile(b.forward)
    return len(blocks)


def shard_mesh(d: Dist, parallel: str, shard_group_size: int = 0):
    """The device mesh FSDP2 shards over: 1-D over every rank (fsdp), or 2-D (replicate, shard) for hsdp with
    ``shard_group_size`` ranks per shard group (0: torchrun's local world size, i.e. one node)."""
    from torch.distributed.device_mesh import init_device_mesh

    if parallel == "fsdp":
        return init_device_mesh(d.device.type, (d.world_size,), mesh_dim_names=("shard",))
    size = shard_group_size or d.local_world_size
    if size < 1 or d.world_size % size:
        raise ValueError(f"train.parallel=hsdp: world size {d.world_size} is not a multiple of the shard group size "
                         f"{size} (train.shard_group_size)")
    return init_device_mesh(d.device.type, (d.world_size // size, size), mesh_dim_names=("replicate", "shard"))


def parallelize(model: nn.Module, d: Dist, parallel: str = "ddp", shard_modules: tuple[type, ...] = (),
                precision: str = "fp32", shard_group_size: int = 0, compile: bool = False) -> nn.Module:
    """Wrap a single-device model for data parallel training: DDP, or FSDP2 (``fully_shard``)
    applied to every ``shard_modules`` instance, then to the root; ``hsdp`` is FSDP2 on a 2-D mesh
    (parameters sharded within groups of ``shard_group_size`` ranks, replicated across them, gradients
    reduce-scattered within a group and all-reduced across). Identity in one process. ``compile``: every
    repeated block (``repeated_blocks``) compiled first.

    FSDP2 with ``precision=bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``:
    parameters all-gathered and computed in bf16, gradients reduced in fp32 onto the sharded master
    weights (whatever dtype they are kept in: train.master_dtype)."""
    model.to(d.device)
    if compile:
        log.info("torch.compile: %d blocks", compile_blocks(repeated_blocks(model)))
    if not d.enabled:
        return model
    if parallel in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = shard_mesh(d, parallel, shard_group_size)

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        # FSDP2 cannot shard 0-dim parameters (logit scales and biases): they stay replicated, and
        # sync_replicated_grads averages their gradients like DDP would. A list in named order: every rank
        # must all-reduce them in the same order (a set's order is its members' memory addresses)
        scalars = [p for _, p in model.named_parameters() if p.ndim == 0]
        for m in model.modules():
            if shard_modules and isinstance(m, shard_modules):
                fully_shard(m, mesh=mesh, ignored_params=set(scalars), mp_policy=mp)
        fully_shard(model, mesh=mesh, ignored_params=set(scalars), mp_policy=mp)
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


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of ``params`` to ``max_norm``; returns the norm before clipping, a 0-dim
    tensor on the device (reading it is the caller's choice: nothing here waits for the device).

    Works for any mix of FSDP2-sharded (DTensor) and plain gradients (the replicated scalars FSDP leaves
    out), which torch's clip_grad_norm_ cannot stack together: each kind's norm is taken on its own
    (DTensor norms are reduced over the mesh) and combined."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sq = torch.zeros((), device=grads[0].device, dtype=torch.float32)
    for kind in (True, False):
        group = [g for g in grads if isinstance(g, DTensor) == kind]
        if group:
            n = torch.nn.utils.get_total_norm(group, 2.0)
            n = n.full_tensor() if isinstance(n, DTensor) else n
            sq = sq + n.float().to(sq.device) ** 2
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # non-finite norms give a non-finite coefficient: the
    for kind in (True, False):                          # trainer skips that step
        group = [g for g in grads if isinstance(g, DTensor) == kind]
        if group:
            torch._foreach_mul_(group, coef.to(group[0].device))
    return total
