"""One ConceptCLIP step (ClipTask.train_step: contrastive + concept alignment) under DDP with 2 gloo
processes, or in one process on the whole global batch; rank 0 saves the loss and the DDP-averaged
gradients. Scenarios: ``shared`` (a concept occurs on both ranks), ``empty`` (rank 1's images have no
concept at all), ``none`` (no concept anywhere in the step)."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from train.clip import ClipTask
from train.config import ClipRunConfig
from train.distributed import cleanup, init_distributed, parallelize
from train.trainer import StepContext
from vlm.models.clip import MedCLIP, build_tokenizer

SCENARIOS = {  # concepts of the 4 global images, rank-major (2 per rank with 2 processes)
    "shared": [["nodule", "effusion"], ["nodule"], ["nodule", "mass"], []],
    "empty": [["nodule", "effusion"], ["mass"], [], []],
    "none": [[], [], [], []],
}


def main(out: str) -> None:
    """Every scenario in one launch; rank 0 saves ``<scenario>.<name>`` tensors."""
    d = init_distributed()
    saved = {}
    for scenario in SCENARIOS:
        saved.update({f"{scenario}.{k}": v for k, v in step(d, scenario).items()})
    if d.is_main:
        save_file(saved, out)
    if d.enabled:
        dist.barrier()
    cleanup()


def step(d, scenario: str) -> dict:
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
    sl = slice(d.rank * per, (d.rank + 1) * per)
    batch = {"images": images[sl], "tokens": tok(captions[sl]), "meta": metas[sl], "keys": captions[sl]}
    wrapped = parallelize(model, d, "ddp")
    metrics = ClipTask(cfg, tok).train_step(wrapped, [batch], StepContext(wrapped, d, "fp32"))
    loss = torch.tensor([metrics["loss"], metrics["loss_concept"]])
    if d.enabled:
        dist.all_reduce(loss)
        loss /= d.world_size
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads | {"loss": loss}


if __name__ == "__main__":
    main(sys.argv[1])
