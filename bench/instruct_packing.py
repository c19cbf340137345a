"""Stage-2 training throughput: packed rows (train.instruct's default) vs LLaVA-style padded batches,
same model, same examples, same loss, on the real length mix of ../shared/fixtures/lengths.json
(short SLAKE VQA turns beside long IU X-Ray reports; copied in tests/fixtures).

    python bench/instruct_packing.py [--examples 256] [--batch-size 16] [--report-share 0.3]

Peer: LLaVA's padded batches (random order, padded to the longest, per-device batch 16 as in LLaVA-1.5's
fine-tuning script). Ours: train.instruct's packing, the same 16 conversations per step in rows of
--row-tokens with attention kept inside each conversation (vlm/models/varlen.py). Also printed (not in the
ratio): our length-grouped padded batches (packing=false group_size=4).

Each example is one image (64 image tokens with the demo's tower) + a question + an answer whose
character lengths are drawn from the fixture. Throughput counts real (non-pad) tokens per second of
forward + backward + optimizer step. Needs the demo's vision tower and tokenizer (`make demo`).
Last line: {"bench": "instruct_packing", "ours": tokens/s packed, "peer": tokens/s padded, "ratio": ...}
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, result_line  # noqa: E402

WORDS = ("the heart size is normal lungs are clear there is no pleural effusion or pneumothorax small nodule "
         "right upper lobe mass left lower zone is this a ct scan of the head what modality was used yes no").split()


def text_of(chars: int, rng: random.Random) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(WORDS))
    return " ".join(out) or "yes"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="padded baseline: examples per batch")
    p.add_argument("--report-share", type=float, default=0.3, help="fraction of examples whose answer is a report")
    p.add_argument("--pack-window", type=int, default=16, help="examples per packed step (data.batch_size)")
    p.add_argument("--row-tokens", type=int, default=4096, help="packed row length (pack_length)")
    p.add_argument("--group-size", type=int, default=4, help="length-grouped padding: examples per padded group")
    p.add_argument("--llm-hidden", type=int, default=256, help="LLM width (the LLM dominates compute, as a 7B LLM does)")
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--vision", default=str(REPO / "runs/demo/clip"))
    p.add_argument("--tokenizer", default=str(REPO / "data/demo/tokenizer"))
    a = p.parse_args(argv)
    import torch

    from train.distributed import Dist
    from train.instruct import InstructCollate, InstructTask
    from train.trainer import StepContext
    from vlm.data.chat import ChatConfig, encode, normalize_conversation
    from vlm.models.vlm import assistant_from_config, freeze_for_stage

    torch.set_num_threads(2)
    lengths = json.loads((REPO / "tests/fixtures/lengths.json").read_text())
    qs, ans = lengths["slake_en_train_question_chars"], lengths["slake_en_train_answer_chars"]
    reports = next(v for k, v in lengths.items() if "report" in k)
    rng = random.Random(0)
    model_cfg = {"vision": a.vision, "tokenizer": a.tokenizer, "stage": 2,
                 "llm_config": {"model_type": "llama", "hidden_size": a.llm_hidden,
                                "intermediate_size": a.llm_hidden * 11 // 4, "num_hidden_layers": a.llm_layers,
                                "num_attention_heads": a.llm_hidden // 32, "num_key_value_heads": a.llm_hidden // 64,
                                "max_position_embeddings": 2048}}
    model, tok = assistant_from_config(model_cfg)
    freeze_for_stage(model, 2)
    chat = ChatConfig(max_length=1024)
    n_img = int(model.config.image_seq_length)
    size = model.config.vision_config.image_size
    examples = []
    for _ in range(a.examples):
        answer = text_of(rng.choice(reports) if rng.random() < a.report_share else rng.choice(ans), rng)
        conv = [{"from": "human", "value": "<image>\n" + text_of(rng.choice(qs), rng)}, {"from": "gpt", "value": answer}]
        ids, labels = encode(normalize_conversation(conv, 1), tok, chat, n_img)
        examples.append({"key": "x", "input_ids": ids[:1024], "labels": labels[:1024],
                         "pixel_values": [torch.randn(3, size, size)]})
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    longest = max(len(e["input_ids"]) for e in examples)

    def run(batches) -> float:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        task, ctx = InstructTask(), StepContext(model, Dist(), "fp32")
        task.train_step(model, [batches[0]], ctx)  # warm-up
        opt.zero_grad()
        t0 = time.perf_counter()
        for b in batches:
            task.train_step(model, [b], ctx)
            opt.step()
            opt.zero_grad()
        return real_tokens / (time.perf_counter() - t0)

    padded = InstructCollate(False, 0, tok.pad_token_id)
    packer = InstructCollate(True, max(a.row_tokens, longest), tok.pad_token_id)
    pad_batches = [padded(examples[i:i + a.batch_size]) for i in range(0, len(examples), a.batch_size)]
    # packing: rows of up to --row-tokens, filled from --pack-window examples at a time (what the stream
    # delivers per step with data.batch_size = pack window)
    pack_batches = [packer(examples[i:i + a.pack_window]) for i in range(0, len(examples), a.pack_window)]
    pad_slots = sum(b["input_ids"].numel() for b in pad_batches)
    pack_slots = sum(b["input_ids"].numel() for b in pack_batches)
    grouper = InstructCollate(False, 0, tok.pad_token_id, group_size=a.group_size)
    group_batches = [grouper(examples[i:i + a.batch_size]) for i in range(0, len(examples), a.batch_size)]
    group_slots = sum(g["input_ids"].numel() for b in group_batches for g in b["groups"])
    peer = run(pad_batches)
    ours = run(pack_batches)
    grouped = run(group_batches)
    print(f"packed {ours:.0f} tokens/s ({real_tokens / pack_slots:.0%} of slots real), padded {peer:.0f} tokens/s "
          f"({real_tokens / pad_slots:.0%} real), length-grouped padded {grouped:.0f} tokens/s "
          f"({real_tokens / group_slots:.0%} real); {len(examples)} examples, {real_tokens} tokens", file=sys.stderr)
    print(result_line("instruct_packing", ours, peer, unit="tokens/s", examples=len(examples),
                      batch_size=a.batch_size, pack_window=a.pack_window, row_tokens=a.row_tokens, pad_efficiency=round(real_tokens / pad_slots, 3),
                      pack_efficiency=round(real_tokens / pack_slots, 3), grouped=round(grouped, 2),
                      group_size=a.group_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
