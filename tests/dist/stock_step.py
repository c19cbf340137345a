"""One SFT step of a tiny stock Qwen2-VL (packed rows, 3-D mRoPE positions per conversation) with DDP or
FSDP2 (one unit per decoder layer / vision block from _no_split_modules) on 2 gloo processes, or one process;
rank 0 saves the new weights and the step's loss. The ranks hold different numbers of label tokens."""
import sys

from train.distributed import cleanup, init_distributed
from train.instruct import InstructTask
from vlm.data.chat import ChatConfig
from vlm.data.stock_chat import StockCollate, encode_stock
from vlm.models.stock import stock_from_config

from common import step_image, tiny_vlm_folder, train_one_step  # tests/dist/common.py (on sys.path)

CONVS = [("What imaging modality is this?", "CT"), ("Is there a nodule?", "Yes, in the right upper lung, 8 mm."),
         ("Describe the findings.", "The lungs are clear."), ("Which side?", "Left")]


def main(out: str, parallel: str) -> None:
    d = init_distributed()
    folder = tiny_vlm_folder(out, d)
    model, processor = stock_from_config({"vlm": folder, "dtype": "float32", "freeze": ["vision"]})
    examples = []
    for i, (q, a) in enumerate(CONVS):
        msgs = [{"role": "user", "content": "<image>\n" + q}, {"role": "assistant", "content": a}]
        examples.append({"key": str(i), **encode_stock(msgs, [step_image(i)], processor, ChatConfig())})
    per = len(examples) // d.world_size
    mine = examples[d.rank * per:(d.rank + 1) * per]
    batch = StockCollate(True, 1024, processor.tokenizer.pad_token_id)(mine)
    train_one_step(model, d, parallel, InstructTask(), batch, out)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
