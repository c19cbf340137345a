"""One SFT step of a tiny stock Qwen2-VL (packed rows, 3-D mRoPE positions per conversation) with DDP or
FSDP2 (one unit per decoder layer / vision block from _no_split_modules) on 2 gloo processes, or one process;
rank 0 saves the new weights and the step's loss. The ranks hold different numbers of label tokens."""
import sys

import torch
from PIL import Image

from train.distributed import all_reduce_mean, cleanup, init_distributed, parallelize
from train.instruct import InstructTask
from train.trainer import StepContext
from vlm.data.chat import ChatConfig
from vlm.data.stock_chat import StockCollate, encode_stock
from vlm.models.stock import decoder_layers, stock_from_config

from common import save_after_step, tiny_vlm_folder  # tests/dist/common.py (the script's folder is on sys.path)

CONVS = [("What imaging modality is this?", "CT"), ("Is there a nodule?", "Yes, in the right upper lung, 8 mm."),
         ("Describe the findings.", "The lungs are clear."), ("Which side?", "Left")]


def main(out: str, parallel: str) -> None:
    d = init_distributed()
    folder = tiny_vlm_folder(out, d)
    model, processor = stock_from_config({"vlm": folder, "dtype": "float32", "freeze": ["vision"]})
    examples = []
    for i, (q, a) in enumerate(CONVS):
        img = Image.new("RGB", (28 * (1 + i % 2), 56), (40 * i, 90, 200 - 30 * i))
        msgs = [{"role": "user", "content": "<image>\n" + q}, {"role": "assistant", "content": a}]
        examples.append({"key": str(i), **encode_stock(msgs, [img], processor, ChatConfig())})
    per = len(examples) // d.world_size
    mine = examples[d.rank * per:(d.rank + 1) * per]
    wrapped = parallelize(model, d, parallel, shard_modules=decoder_layers(model))
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    batch = StockCollate(True, 1024, processor.tokenizer.pad_token_id)(mine)
    res = InstructTask().train_step(wrapped, [batch], StepContext(wrapped, d, "fp32"))
    opt.step()
    loss = all_reduce_mean(torch.tensor([res["loss"]]))
    save_after_step(wrapped, d, out, loss)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
