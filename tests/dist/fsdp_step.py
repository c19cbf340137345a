"""One optimizer step with DDP, FSDP2 or HSDP (gloo processes) or one process; rank 0 saves the new weights
(and, in the file's metadata, the placements of the sharded parameters)."""
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from train.distributed import cleanup, init_distributed, parallelize, sync_replicated_grads
from vlm.losses import LossConfig, contrastive_loss
from vlm.models.clip import MedCLIP


def main(out: str, parallel: str, precision: str = "fp32") -> None:
    from open_clip.transformer import ResidualAttentionBlock

    d = init_distributed()
    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text")
    model.concept_logit_scale.requires_grad_(False)  # unused here: DDP must not wait for them
    model.concept_logit_bias.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(8, 3, 64, 64, generator=g), torch.randint(1, 1000, (8, 48), generator=g)
    per = 8 // d.world_size
    sl = slice(d.rank * per, (d.rank + 1) * per)
    wrapped = parallelize(model, d, parallel, shard_modules=(ResidualAttentionBlock,), precision=precision,
                          shard_group_size=2)
    w = model.clip.visual.conv1.weight
    placements = str(getattr(w, "placements", None))
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)  # linear in the gradient: a faithful comparison
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as the trainer runs it
        o = wrapped(images[sl], tokens[sl])
        loss = contrastive_loss(LossConfig())(o["image_features"], o["text_features"], o["logit_scale"])
    loss.backward()
    sync_replicated_grads(wrapped)
    grads = {f"grad.{n}": (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
             for n, p in model.named_parameters() if p.grad is not None}
    dtypes = sorted({str(p.dtype) for p in model.parameters()})  # the master weights' dtypes
    opt.step()
    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        save_file({**{k: v.contiguous() for k, v in state.items()}, **grads}, out,
                  metadata={"placements": placements, "dtypes": ",".join(dtypes)})
    if d.enabled:  # every rank done (rank 0's file written) before the group goes away
        torch.distributed.barrier()
    cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:])
