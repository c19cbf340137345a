"""Stage-2 training throughput: packed rows (train.instruct's default) vs LLaVA-style padded batches,
same model, same examples, same loss, on the real length mix of ../shared/fixtures/lengths.json
(short SLAKE VQA turns beside long IU X-Ray reports; copied in tests/fixtures).

    python bench/instruct_packing.py [--examples 1024] [--batch-size 16] [--report-share 0.3]
    python bench/instruct_packing.py --vlm qwen2_vl     (a stock VLM family, tiny: packed rows with each
                                                         conversation's own 3-D mRoPE positions vs padded)

Peer: LLaVA-1.5's actual batching, `group_by_modality_length` at per-device batch 16 on 8 ranks: random
megabatches of 16 x 8 = 128 conversations, sorted by length, split into 8 per-rank chunks of balanced total
length (LLaVA's LengthGroupedSampler), each rank's chunk padded to its longest; we run rank 0's batches
(every rank's are alike). Ours: train.instruct's packing, the same 16 conversations per step in rows of
--row-tokens with attention kept inside each conversation (vlm/models/varlen.py). Also printed: random-order
padded batches (no grouping), our length-grouped padded batches (packing=false group_size=4), and the
padding-free bound, 1 / (the peer's fraction of real tokens): what removing every pad token could gain if
a token cost the same in every batch. Both sides' loss over the same conversations is checked equal.

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


def llava_rank_batches(lengths: list[int], batch_size: int, ranks: int, rank: int, seed: int = 0) -> list[list[int]]:
    """Rank ``rank``'s batches under LLaVA's group_by_modality_length sampler (every example multimodal): a random
    permutation cut into megabatches of batch_size x ranks, each sorted by length (longest first) and dealt into
    ``ranks`` chunks, each index to the chunk with the least total length that still has room; the trainer then
    hands rank r the r-th chunk of every megabatch."""
    import random as _random

    order = list(range(len(lengths)))
    _random.Random(seed).shuffle(order)
    mega = batch_size * ranks
    out = []
    for i in range(0, len(order), mega):
        group = sorted(order[i:i + mega], key=lambda j: -lengths[j])
        if len(group) % ranks:  # a last, uneven megabatch is dealt round-robin
            chunks = [group[c::ranks] for c in range(ranks)]
        else:
            per = len(group) // ranks
            chunks, totals = [[] for _ in range(ranks)], [0] * ranks
            for j in group:
                c = min((c for c in range(ranks) if len(chunks[c]) < per), key=lambda c: totals[c])
                chunks[c].append(j)
                totals[c] += lengths[j]
        if chunks[rank]:
            out.append(chunks[rank])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1024, help="conversations drawn (rank 0 trains 1/--ranks of them)")
    p.add_argument("--batch-size", type=int, default=16, help="padded baseline: examples per batch")
    p.add_argument("--report-share", type=float, default=0.3, help="fraction of examples whose answer is a report")
    p.add_argument("--row-tokens", type=int, default=4096, help="packed row length (pack_length)")
    p.add_argument("--group-size", type=int, default=4, help="length-grouped padding: examples per padded group")
    p.add_argument("--llm-hidden", type=int, default=256, help="LLM width (the LLM dominates compute, as a 7B LLM does)")
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--vision", default=str(REPO / "runs/demo/clip"))
    p.add_argument("--tokenizer", default=str(REPO / "data/demo/tokenizer"))
    p.add_argument("--ranks", type=int, default=8, help="LLaVA's world size (megabatch = batch size x ranks)")
    p.add_argument("--vlm", help="a stock VLM family of vlm.models.tiny_vlm (qwen2_vl, gemma3, ...) instead of the "
                                 "LLaVA assembly: its processor, images of varied sizes, its packed positions")
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
    llm = {"hidden_size": a.llm_hidden, "intermediate_size": a.llm_hidden * 11 // 4, "num_hidden_layers": a.llm_layers,
           "num_attention_heads": a.llm_hidden // 32, "num_key_value_heads": a.llm_hidden // 64}
    chat = ChatConfig(max_length=1024)
    examples = []
    if a.vlm:
        from PIL import Image

        from vlm.data.stock_chat import StockCollate, encode_stock
        from vlm.models.stock import freeze_parts
        from vlm.models.tiny_vlm import build_tiny_vlm

        model, processor = build_tiny_vlm(a.vlm, **llm, **({"head_dim": 32} if a.vlm == "gemma3" else {}))
        if a.vlm != "gemma3":  # attention as train.instruct runs it (vlm.models.stock.load_stock_vlm)
            from vlm.models import varlen

            model.set_attn_implementation(varlen.register())
        freeze_parts(model, ["vision"])
        tok = processor.tokenizer
        for _ in range(a.examples):
            answer = text_of(rng.choice(reports) if rng.random() < a.report_share else rng.choice(ans), rng)
            msgs = [{"role": "user", "content": "<image>\n" + text_of(rng.choice(qs), rng)},
                    {"role": "assistant", "content": answer}]
            img = Image.new("RGB", (rng.choice((28, 42, 56)), rng.choice((28, 42, 56))), (rng.randrange(256), 90, 40))
            examples.append({"key": "x", **encode_stock(msgs, [img], processor, chat)})

        def collate(packing: bool, max_len: int, group_size: int = 0):
            return StockCollate(packing, max_len, tok.pad_token_id, group_size)
    else:
        model_cfg = {"vision": a.vision, "tokenizer": a.tokenizer, "stage": 2,
                     "llm_config": {"model_type": "llama", **llm, "max_position_embeddings": 2048}}
        model, tok = assistant_from_config(model_cfg)
        freeze_for_stage(model, 2)
        n_img = int(model.config.image_seq_length)
        size = model.config.vision_config.image_size
        for _ in range(a.examples):
            answer = text_of(rng.choice(reports) if rng.random() < a.report_share else rng.choice(ans), rng)
            conv = [{"from": "human", "value": "<image>\n" + text_of(rng.choice(qs), rng)},
                    {"from": "gpt", "value": answer}]
            ids, labels = encode(normalize_conversation(conv, 1), tok, chat, n_img)
            examples.append({"key": "x", "input_ids": ids[:1024], "labels": labels[:1024],
                             "pixel_values": [torch.randn(3, size, size)]})

        def collate(packing: bool, max_len: int, group_size: int = 0):
            return InstructCollate(packing, max_len, tok.pad_token_id, group_size)
    longest = max(len(e["input_ids"]) for e in examples)

    def run(batches, tokens: int) -> float:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        task, ctx = InstructTask(), StepContext(model, Dist(), "fp32")
        task.train_step(model, [batches[0]], ctx)  # warm-up
        opt.zero_grad()
        t0 = time.perf_counter()
        for b in batches:
            task.train_step(model, [b], ctx)
            opt.step()
            opt.zero_grad()
        return tokens / (time.perf_counter() - t0)

    def epoch_loss(batches) -> float:
        """Mean next-token loss over every label token of the batches, at the initial weights (no step)."""
        import torch.nn.functional as F

        total, n = 0.0, 0
        with torch.no_grad():
            for b in batches:
                for g in b.get("groups", [b]):
                    inputs = {k: v for k, v in g.items() if isinstance(v, torch.Tensor) and k != "labels"}
                    if "seq_lens" in g:  # a stock VLM's packed rows: the positions the training step computes
                        from vlm.data.stock_chat import packed_block_masks, packed_positions

                        inputs["position_ids"] = packed_positions(model, g)
                        inputs["attention_mask"] = packed_block_masks(model, g)
                    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
                    labels = g["labels"][:, 1:]
                    total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum"))
                    n += int((labels != -100).sum())
        return total / n

    padded = collate(False, 0)
    packer = collate(True, max(a.row_tokens, longest))
    lens = [len(e["input_ids"]) for e in examples]
    llava = llava_rank_batches(lens, a.batch_size, a.ranks, rank=0)
    llava_batches = [padded([examples[j] for j in b]) for b in llava]
    llava_tokens = sum(lens[j] for b in llava for j in b)
    llava_slots = sum(b["input_ids"].numel() for b in llava_batches)
    # ours on exactly the conversations rank 0 trains on under LLaVA's sampler, in the same steps
    llava_packed = [packer([examples[j] for j in b]) for b in llava]
    pack_slots = sum(b["input_ids"].numel() for b in llava_packed)
    # the same conversations in random order (no length grouping), and our length-grouped padding
    mine = [j for b in llava for j in b]
    random.Random(1).shuffle(mine)
    chunks = [[examples[j] for j in mine[i:i + a.batch_size]] for i in range(0, len(mine), a.batch_size)]
    pad_batches = [padded(c) for c in chunks]
    pad_slots = sum(b["input_ids"].numel() for b in pad_batches)
    grouper = collate(False, 0, group_size=a.group_size)
    group_batches = [grouper(c) for c in chunks]
    group_slots = sum(g["input_ids"].numel() for b in group_batches for g in b["groups"])
    real_tokens = llava_tokens
    loss_peer, loss_ours = epoch_loss(llava_batches), epoch_loss(llava_packed)
    if abs(loss_peer - loss_ours) > 1e-4 * abs(loss_peer):
        raise SystemExit(f"packed and padded losses differ: {loss_ours} vs {loss_peer}")
    peer = run(llava_batches, llava_tokens)
    ours = run(llava_packed, llava_tokens)
    random_pad = run(pad_batches, real_tokens)
    grouped = run(group_batches, real_tokens)
    bound = llava_slots / llava_tokens
    print(f"LLaVA's sampler (rank 0 of {a.ranks}): padded {peer:.0f} tokens/s ({llava_tokens / llava_slots:.0%} of "
          f"slots real), ours packed on the same steps {ours:.0f} tokens/s: ratio {ours / peer:.3f}, padding-free bound "
          f"{bound:.3f} ({ours / peer / bound:.0%} of it); loss {loss_ours:.5f} both ways", file=sys.stderr)
    print(f"the same conversations in random order: padded {random_pad:.0f} tokens/s ({real_tokens / pad_slots:.0%} "
          f"real), ours packed {ours:.0f} ({real_tokens / pack_slots:.0%} real): ratio {ours / random_pad:.3f}; "
          f"length-grouped padded (groups of {a.group_size}) {grouped:.0f} tokens/s ({real_tokens / group_slots:.0%} "
          f"real): packed / grouped ratio {ours / grouped:.3f}", file=sys.stderr)
    print(result_line("instruct_packing" + (f"_{a.vlm}" if a.vlm else ""), ours, peer, unit="tokens/s", peer_sampler="llava group_by_modality_length",
                      ranks=a.ranks, batch_size=a.batch_size, padding_free_bound=round(bound, 3),
                      of_bound=round(ours / peer / bound, 3), peer_efficiency=round(llava_tokens / llava_slots, 3),
                      vs_random_padding={"ours": round(ours, 2), "peer": round(random_pad, 2),
                                         "ratio": round(ours / random_pad, 3)},
                      vs_grouped={"ours": round(ours, 2), "peer": round(grouped, 2), "ratio": round(ours / grouped, 3)},
                      group_size=a.group_size, loss=round(loss_ours, 5)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
