"""One DPO step (LoRA on a tiny stock Qwen2-VL, reference = adapters off) with DDP on 2 gloo processes or one
process; rank 0 saves the new weights and the step's loss. Each rank holds different pairs."""
import sys

import torch

from train.config import LLM_LORA_TARGET
from train.distributed import cleanup, init_distributed
from train.preference import PairCollate, PairSample, PreferenceTask
from vlm.data.chat import ChatConfig
from vlm.data.stock_chat import StockCollate
from vlm.models.stock import stock_from_config
from vlm.preference import PreferenceLossConfig

from common import step_image, tiny_vlm_folder, train_one_step  # tests/dist/common.py (on sys.path)

PAIRS = [("Where is the nodule?", "In the right upper lung.", "In the left lower lung, unchanged since the prior."),
         ("What modality?", "CT", "A chest x-ray"), ("Is there an effusion?", "No", "Yes, a large one on the left."),
         ("Describe the findings.", "The lungs are clear.", "A mass")]


def main(out: str, loss: str) -> None:
    d = init_distributed()
    folder = tiny_vlm_folder(out, d)
    torch.manual_seed(0)  # the same adapters on every rank
    model, processor = stock_from_config({"vlm": folder, "dtype": "float32", "freeze": ["vision"],
                                          "lora": {"r": 4, "alpha": 8, "target": LLM_LORA_TARGET}})
    with torch.no_grad():  # adapters away from zero: the policy differs from its reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.02)
    sample = PairSample(ChatConfig(), processor=processor)
    pairs = []
    for i, (q, c, r) in enumerate(PAIRS):
        pairs.append(sample({"key": str(i), "image": step_image(i), "views": [], "meta": {
            "conversations": [{"from": "human", "value": "<image>\n" + q}], "chosen": c, "rejected": r}}))
    mine = pairs[:1] if d.world_size == 2 and d.rank == 0 else pairs[1:] if d.world_size == 2 else pairs
    batch = PairCollate(StockCollate(False, 0, processor.tokenizer.pad_token_id))(mine)
    task = PreferenceTask(PreferenceLossConfig(loss=loss, beta=0.5), lora=True)
    train_one_step(model, d, "ddp", task, batch, out)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
