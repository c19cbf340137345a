"""One GRPO step (LoRA on a tiny stock Qwen2-VL, KL to the policy with adapters off) with DDP on 2 gloo processes;
each rank samples answers for its own prompts (rank 0: one image, rank 1: two). Rank 0 saves the starting
weights (OUT.start); every rank saves its weights after the step and the step's loss (OUT.rank<r>)."""
import sys

import torch
from safetensors.torch import save_file

from train.config import LLM_LORA_TARGET
from train.distributed import all_reduce_mean, cleanup, init_distributed, parallelize
from train.grpo import GRPOTask, QuestionSample, StockRollout, collate_questions
from train.trainer import StepContext
from vlm.data.chat import ChatConfig
from vlm.grpo import GRPOConfig
from vlm.models.stock import decoder_layers, stock_from_config

from common import step_image, tiny_vlm_folder  # tests/dist/common.py (the script's folder is on sys.path)

CONVS = [[("Is there a nodule?", "yes"), ("Where is the nodule?", "the right upper lung")],
         [("Is there an effusion?", "no")], [("What modality is this?", "chest x-ray"), ("Is it normal?", "no")]]


def _weights(model) -> dict:
    """This rank's own copy of the weights (DDP keeps a full replica on every rank)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main(out: str) -> None:
    d = init_distributed()
    folder = tiny_vlm_folder(out, d)
    torch.manual_seed(0)  # the same adapters on every rank
    model, processor = stock_from_config({"vlm": folder, "dtype": "float32", "freeze": ["vision"],
                                          "lora": {"r": 4, "alpha": 8, "target": LLM_LORA_TARGET}})
    with torch.no_grad():
        for n, p in model.named_parameters():  # only the adapters train (the reference is the policy without them)
            p.requires_grad = ".lora_" in n
            if "lora_B" in n:
                p.fill_(0.02)  # the policy differs from its reference: the KL term has a gradient
    cfg = GRPOConfig(group_size=4, max_new_tokens=5, beta=0.1, rewards={"vqa": 1.0, "format": 0.5})
    sample = QuestionSample(cfg, ChatConfig(), processor=processor)
    samples = []
    for i, conv in enumerate(CONVS):
        turns = [{"from": f, "value": ("<image>\n" if k == 0 and f == "human" else "") + v}
                 for k, (q, a) in enumerate(conv) for f, v in (("human", q), ("gpt", a))]
        samples.append(sample({"key": str(i), "image": step_image(i), "views": [], "meta": {"conversations": turns}}))
    mine = samples[:1] if d.rank == 0 else samples[1:]
    if d.is_main:
        save_file(_weights(model), out + ".start")
    wrapped = parallelize(model, d, "ddp", shard_modules=decoder_layers(model))
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    task = GRPOTask(cfg, StockRollout(processor, cfg), rank=d.rank)  # each rank samples its own answers
    res = task.train_step(wrapped, [collate_questions(mine)], StepContext(wrapped, d, "fp32"))
    opt.step()
    loss = all_reduce_mean(torch.tensor([float(res["loss"])]))
    save_file(_weights(model) | {"loss": loss}, f"{out}.rank{d.rank}")
    torch.distributed.barrier()
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
