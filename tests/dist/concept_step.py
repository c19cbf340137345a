"""One ConceptCLIP step (ClipTask.train_step: contrastive + concept alignment) under DDP and FSDP2 with
2 gloo processes, with 1 and 2 micro-batches per step, or in one process on the whole global batch; rank 0
saves the loss and the averaged gradients of every (scenario, parallel mode, accumulation) case.
Scenarios: ``shared`` (a concept occurs on both ranks), ``empty`` (rank 1's images have no concept at all),
``none`` (no concept anywhere in the step)."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from train.clip import ClipTask
from train.config import ClipRunConfig
from train.distributed import cleanup, init_distributed, parallelize, sync_replicated_grads
from train.trainer import StepContext
from vlm.models.clip import MedCLIP, build_tokenizer

SCENARIOS = {  # concepts of the 4 global images, rank-major (2 per rank with 2 processes)
    "shared": [["nodule", "effusion"], ["nodule"], ["nodule", "mass"], []],
    "empty": [["nodule", "effusion"], ["mass"], [], []],
    "none": [[], [], [], []],
}
CASES = [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]


def main(out: str) -> None:
    d = init_distributed()
    saved = {}
    for scenario in SCENARIOS:
        for parallel, accum in CASES:
            result = step(d, scenario, parallel, accum)
            saved.update({f"{scenario}.{parallel}{accum}.{k}": v for k, v in result.items()})
    if d.is_main:
        save_file(saved, out)
    if d.enabled:
        dist.barrier()
    cleanup()


def step(d, scenario: str, parallel: str, accum: int) -> dict:
    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text")
    cfg = ClipRunConfig()
    cfg.loss.concept_weight = 0.5
    tok = build_tokenizer("tiny-vit-text")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    captions = ["a chest x-ray with a nodule", "ct of the head", "a mass in the liver", "normal fundus"]
    metas = [{"concepts": [{"name": n} for n in names]} for names in SCENARIOS[scenario]]
    per = 4 // d.world_size
    mine = list(range(d.rank * per, (d.rank + 1) * per))
    size = len(mine) // accum
    batches = [{"images": images[idx], "tokens": tok([captions[i] for i in idx]), "meta": [metas[i] for i in idx],
                "keys": [captions[i] for i in idx]} for idx in (mine[k:k + size] for k in range(0, len(mine), size))]
    wrapped = parallelize(model, d, parallel)
    metrics = ClipTask(cfg, tok).train_step(wrapped, batches, StepContext(wrapped, d, "fp32"))
    sync_replicated_grads(wrapped)
    loss = torch.stack([torch.as_tensor(metrics["loss"]), torch.as_tensor(metrics["loss_concept"])]).float()
    if d.enabled:
        dist.all_reduce(loss)
        loss /= d.world_size
    grads = {}
    for n, p in model.named_parameters():  # (full_tensor is a collective: every rank walks them all)
        if p.grad is not None:
            grads[f"grad.{n}"] = (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
    return grads | {"loss": loss}


if __name__ == "__main__":
    main(sys.argv[1])
