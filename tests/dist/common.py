"""What the tests/dist step scripts share: a tiny stock VLM folder every rank loads, and the weights after the
step (full, gathered under FSDP2) with the step's loss, saved by rank 0 for the test to compare."""
import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def tiny_vlm_folder(out: str, d, family: str = "qwen2_vl") -> str:
    """The family's tiny VLM (seed 0: the same weights for every rank) beside ``out``; transformers saves on
    the main process only, so rank 0 writes it and the others wait."""
    from vlm.models.tiny_vlm import save_tiny_vlm

    folder = out + ".vlm"
    if d.is_main:
        save_tiny_vlm(folder, family, seed=0)
    if d.enabled:
        torch.distributed.barrier()
    return folder


def save_after_step(wrapped, d, out: str, loss: torch.Tensor) -> None:
    """Rank 0 writes the full weights and ``loss`` to ``out``; every rank waits for it before going on."""
    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        save_file({k: v.contiguous() for k, v in state.items()} | {"loss": loss}, out)
    if d.enabled:  # every rank done (rank 0's file written) before the group goes away
        torch.distributed.barrier()


def step_image(i: int):
    """The i-th stand-in image of the step scripts (two sizes, so a batch mixes image shapes)."""
    from PIL import Image

    return Image.new("RGB", (28 * (1 + i % 2), 56), (40 * i, 90, 200 - 30 * i))


def train_one_step(model, d, parallel: str, task, batch: dict, out: str) -> None:
    """Wrap ``model`` (DDP / FSDP2 over its decoder layers), one SGD step of ``task`` on this rank's ``batch``,
    and rank 0 saves the weights after it with the step's loss (mean over ranks)."""
    from train.distributed import all_reduce_mean, parallelize
    from train.trainer import StepContext
    from vlm.models.stock import decoder_layers

    wrapped = parallelize(model, d, parallel, shard_modules=decoder_layers(model))
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    res = task.train_step(wrapped, [batch], StepContext(wrapped, d, "fp32"))
    opt.step()
    save_after_step(wrapped, d, out, all_reduce_mean(torch.tensor([float(res["loss"])])))
