"""One stage-2 optimizer step of a tiny assistant with DDP or FSDP2 (2 gloo processes) or one process;
rank 0 saves the new weights and the step's loss. The ranks get different numbers of label tokens:
the loss must still be the token mean over the whole global batch."""
import sys

import torch

from train.distributed import all_reduce_mean, cleanup, init_distributed, parallelize
from train.instruct import InstructCollate, InstructTask
from train.trainer import StepContext
from vlm.data.chat import IGNORE
from vlm.models.clip import MedCLIP
from vlm.models.vlm import build_llava, freeze_for_stage, openclip_vit_to_hf

from common import save_after_step  # tests/dist/common.py (the script's folder is on sys.path)

IMAGE = 99


def main(out: str, parallel: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from vlm.models import varlen

    d = init_distributed()
    torch.manual_seed(0)
    vision = openclip_vit_to_hf(MedCLIP("tiny-vit-text").clip.visual)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       attn_implementation=varlen.register()))
    model = build_llava(vision, llm, IMAGE)
    freeze_for_stage(model, 2)
    n_img = model.config.image_seq_length
    g = torch.Generator().manual_seed(1)
    examples = []
    for i, (prompt, answer) in enumerate([(3, 2), (5, 12), (4, 3), (2, 25)]):
        ids = [1] + [IMAGE] * n_img + torch.randint(2, 90, (prompt + answer,), generator=g).tolist()
        labels = [IGNORE] * (1 + n_img + prompt) + ids[1 + n_img + prompt:]
        examples.append({"key": str(i), "input_ids": ids, "labels": labels,
                         "pixel_values": [torch.randn(3, 64, 64, generator=g)]})
    per = len(examples) // d.world_size
    mine = examples[d.rank * per:(d.rank + 1) * per]
    wrapped = parallelize(model, d, parallel, shard_modules=(LlamaDecoderLayer,))
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    batch = InstructCollate(True, 1024, 0)(mine)
    out_ = InstructTask().train_step(wrapped, [batch], StepContext(wrapped, d, "fp32"))
    opt.step()
    loss = all_reduce_mean(torch.tensor([out_["loss"]]))  # as the trainer reports it
    save_after_step(wrapped, d, out, loss)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
