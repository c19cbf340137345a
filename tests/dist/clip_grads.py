"""Run under torchrun (2 gloo processes) or plainly: loss and gradients of a fixed global batch.

Each rank takes its slice of the global batch; the result (loss, and the DDP-averaged gradients)
is written by rank 0 to argv[1] (safetensors)."""
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from train.distributed import cleanup, init_distributed, parallelize
from vlm.losses import LossConfig, concept_align_loss, contrastive_loss
from vlm.models.clip import MedCLIP


def main(out: str, kind: str) -> None:
    d = init_distributed()
    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 64, 64, generator=g)
    tokens = torch.randint(1, 1000, (8, 48), generator=g)
    concept_tokens = torch.randint(1, 1000, (3, 48), generator=g)
    per = 8 // d.world_size
    sl = slice(d.rank * per, (d.rank + 1) * per)
    ddp = parallelize(model, d, "ddp")
    # rank r owns concepts r::W of 3; concept c is present in global images c and c + 4
    mine = list(range(d.rank, 3, d.world_size))
    out_ = ddp(images[sl], tokens[sl], patches=True, concept_tokens=concept_tokens[mine])
    loss_fn = contrastive_loss(LossConfig(kind=kind))
    if kind == "clip":
        loss = loss_fn(out_["image_features"], out_["text_features"], out_["logit_scale"])
    else:
        loss = loss_fn(out_["image_features"], out_["text_features"], out_["logit_scale"], model.clip.logit_bias)
    cemb = out_["concept_features"]
    order = [c for r in range(d.world_size) for c in range(r, 3, d.world_size)]  # rank-major global order
    pos = torch.zeros(3, 8)
    for i, c in enumerate(order):
        pos[i, c] = pos[i, c + 4] = 1
    closs = concept_align_loss(out_["image_patches"], cemb, pos, model.concept_logit_scale,
                               model.concept_logit_bias)
    total = loss + float(os.environ.get("CONCEPT_W", "0.5")) * closs
    total.backward()
    reported = torch.stack([loss.detach(), closs.detach()])
    if d.enabled:
        dist.all_reduce(reported)
        reported /= d.world_size
    if d.is_main:
        grads = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        save_file(grads | {"loss": reported}, out)
    if d.enabled:  # every rank done (rank 0's file written) before the group goes away
        torch.distributed.barrier()
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
