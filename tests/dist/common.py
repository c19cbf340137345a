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
