"""GPU training efficiency (MFU) of our two training paths on one GPU, with the formula used.

    python bench/gpu.py                       # both: CLIP ViT-B/16 and a 7B-shaped LLM (stage-2 packing)
    python bench/gpu.py --only clip --clip-batch 256 --compile
    python bench/gpu.py --only llm --llm-layers 16 --attn flash_attention_2
    python bench/gpu.py --device cpu --tiny --peak-tflops 1   # a smoke run of the code path (tests)

What runs is the training step of our code, on random data held on the device (no loader: this measures
the step, the loader has its own benchmark), after --warmup steps, timed with the device synchronised:

- CLIP: our MedCLIP with configs/model/vit-b16-clip.json (open_clip ViT-B/16 + text transformer), bf16
  autocast, fp32 master weights, fused AdamW, CLIP InfoNCE, optionally train.compile's per-block compile.
- LLM: a Llama-2-7B-shaped decoder (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000; random init)
  trained on packed rows of several conversations (position ids restart per conversation; 576 image tokens
  as LLaVA-1.5 at 336 px + real SLAKE / IU X-Ray text lengths, tests/fixtures/lengths.json) with our ``sdpa_varlen`` or
  ``flash_attention_2`` (varlen from the restarts), bf16 weights with fp32 AdamW states (--llm-master fp32
  keeps fp32 master weights: 6.7B x 16 bytes, needs ~110 GB before activations), gradient checkpointing.

FLOPs per step (multiply-adds count 2; backward = 2 x forward, so training = 3 x forward):
- a transformer on a sequence of T tokens: 6 * N * T + attention, N = the parameters of its matmuls
  (embedding tables excluded, the LLM head included), attention = 3 * 4 * L * d * T^2 for bidirectional
  towers (the image tower) and half of it for causal ones (the text tower, the LLM per conversation:
  sum over conversations of 6 * L * d * len^2), i.e. what a kernel that skips masked blocks computes.
- CLIP: image tower on 197 tokens per image + text tower on 77 tokens per caption (+ the B x B logits).
MFU = FLOPs per step / step time / peak dense bf16 FLOP/s of the device (--peak-tflops, or a table for
A100 / H100 / H200). Targets named in issue 11: CLIP >= 50%, LLM >= 40% (torchtitan reports 33-39% for
Llama-3.1-8B on H100 in bf16). Last line: {"bench": "gpu", "clip_mfu": ..., "llm_mfu": ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY_LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 512}


def peak_flops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return tflops * 1e12
    return None


def matmul_params(module: torch.nn.Module, skip=(torch.nn.Embedding,)) -> int:
    """Parameters that multiply every token: weights of Linear layers, attention in-projections and the patch
    embedding (a convolution with stride = kernel is a matmul per patch)."""
    n = 0
    for m in module.modules():
        if isinstance(m, skip):
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            n += m.weight.numel()
        elif isinstance(m, torch.nn.MultiheadAttention):
            n += m.in_proj_weight.numel() if m.in_proj_weight is not None else 0
    return n


def tower_flops(params: int, layers: int, width: int, tokens: int, causal: bool) -> float:
    """Training FLOPs of one sequence through a transformer tower (see the module docstring)."""
    attention = 3 * 4 * layers * width * tokens ** 2 * (0.5 if causal else 1.0)
    return 6 * params * tokens + attention


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step after ``warmup`` steps, the device synchronised around the timed ones."""
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def clip_flops(model, arch: dict, batch: int) -> float:
    """Training FLOPs of one CLIP step (see the module docstring)."""
    v, t = arch["vision_cfg"], arch["text_cfg"]
    img_tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    image = tower_flops(matmul_params(model.clip.visual), v["layers"], v["width"], img_tokens, causal=False)
    text = tower_flops(matmul_params(model.clip.transformer), t["layers"], t["width"], t["context_length"],
                       causal=True)
    return batch * (image + text) + 3 * 2 * batch * batch * arch["embed_dim"]


def bench_clip(args, device: torch.device) -> dict:
    from train.distributed import compile_blocks, repeated_blocks
    from vlm.losses import ClipLoss
    from vlm.models.clip import MedCLIP

    arch = json.loads((REPO / "configs/model/vit-b16-clip.json").read_text())
    arch.pop("_comment", None)
    if args.tiny:
        arch["vision_cfg"].update(image_size=32, patch_size=8, layers=2, width=64)
        arch["text_cfg"].update(width=64, heads=2, layers=2, context_length=16, vocab_size=1000)
        arch["embed_dim"] = 64
    torch.manual_seed(0)
    model = MedCLIP(arch).to(device).train()
    if args.compile:
        compile_blocks(repeated_blocks(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    loss_fn = ClipLoss()
    v, t = arch["vision_cfg"], arch["text_cfg"]
    B, S, T = args.clip_batch, v["image_size"], t["context_length"]
    images = torch.randn(B, 3, S, S, device=device)
    texts = torch.randint(1, t["vocab_size"], (B, T), device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            img, txt = model.encode_image(images), model.encode_text(texts)
            loss = loss_fn(img, txt, model.logit_scale.exp())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed_steps(step, args.warmup, args.steps, device)
    flops = clip_flops(model, arch, B)
    return {"samples_per_s": B / sec, "step_s": sec, "flops_per_step": flops, "batch": B,
            "formula": "B * (6*N_img*197 + 12*L*d*197^2 + 6*N_txt*77 + 6*L*d*77^2) + 6*B^2*D"}


def conversation_lengths(count: int, image_tokens: int, seed: int = 0, report_share: float = 0.3) -> list[int]:
    """Token lengths of stage-2 conversations: the image's tokens + a SLAKE question + an answer that is a
    SLAKE answer or (``report_share`` of them) an IU X-Ray report, at 4 characters per token, + 24 template
    tokens; the character lengths are real (tests/fixtures/lengths.json), as in bench/instruct_packing.py."""
    import random

    lengths = json.loads((REPO / "tests/fixtures/lengths.json").read_text())
    qs, ans = lengths["slake_en_train_question_chars"], lengths["slake_en_train_answer_chars"]
    reports = lengths["iu_xray_train_report_chars"]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        answer = rng.choice(reports) if rng.random() < report_share else rng.choice(ans)
        out.append(image_tokens + (rng.choice(qs) + answer) // 4 + 24)
    return out


def packed_rows(total_tokens: int, row_len: int, image_tokens: int, seed: int = 0) -> list[list[int]]:
    """Conversation lengths packed first-fit into rows of ``row_len`` tokens."""
    rows: list[list[int]] = []
    used = 0
    pool = iter(conversation_lengths(total_tokens // image_tokens + 1000, image_tokens, seed))
    while used < total_tokens:
        n = min(next(pool), row_len)
        for r in rows:
            if sum(r) + n <= row_len:
                r.append(n)
                break
        else:
            rows.append([n])
        used += n
    return rows


def bench_llm(args, device: torch.device) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm.models import varlen

    dims = dict(TINY_LLM if args.tiny else LLAMA2_7B)
    if args.llm_layers:
        dims["num_hidden_layers"] = args.llm_layers
    row_len = 256 if args.tiny else args.llm_row_len
    attn = varlen.register() if args.attn == "sdpa" else args.attn
    cfg = AutoConfig.for_model("llama", **dims)
    torch.manual_seed(0)
    dtype = torch.float32 if args.llm_master == "fp32" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    rows = packed_rows(args.llm_batch * row_len, row_len, 16 if args.tiny else 576)[: args.llm_batch]
    T = max(sum(r) for r in rows)
    ids = torch.randint(0, dims["vocab_size"], (len(rows), T), device=device)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0
        for n in r:
            pos[i, at:at + n] = torch.arange(n)
            at += n
        if at < T:  # the tail of a shorter row: one more segment (its loss masked)
            pos[i, at:] = torch.arange(T - at)
    pos = pos.to(device)
    labels = ids.clone()
    real = sum(sum(r) for r in rows)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.float32):
            loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed_steps(step, args.warmup, args.steps, device)
    L, d = dims["num_hidden_layers"], dims["hidden_size"]
    n = matmul_params(model)  # decoder layers' projections + the head (the input embedding excluded)
    seg = [x for r in rows for x in r] + [T - sum(r) for r in rows if sum(r) < T]
    flops = 6 * n * len(rows) * T + sum(6 * L * d * x ** 2 for x in seg)
    return {"tokens_per_s": len(rows) * T / sec, "real_tokens_per_s": real / sec, "step_s": sec,
            "flops_per_step": flops, "rows": len(rows), "row_len": T, "conversations": len(seg),
            "params_matmul": n, "formula": "6*N*tokens + sum over conversations of 6*L*d*len^2 (causal)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["clip", "llm"], help="run one of the two (default both)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run; MFU needs --peak-tflops)")
    ap.add_argument("--tiny", action="store_true", help="2-layer 64-wide models (a check of the code path)")
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the device (default: a table)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="CLIP autocast (default bf16)")
    ap.add_argument("--compile", action="store_true", help="CLIP: compile each transformer block (train.compile)")
    ap.add_argument("--clip-batch", type=int, default=256)
    ap.add_argument("--llm-layers", type=int, help="decoder layers (default 32; fewer if memory is short)")
    ap.add_argument("--llm-batch", type=int, default=4, help="packed rows per step")
    ap.add_argument("--llm-row-len", type=int, default=4096, help="tokens per packed row")
    ap.add_argument("--llm-master", default="bf16", choices=["bf16", "fp32"],
                    help="LLM weight dtype: bf16 weights (default) or fp32 masters with bf16 autocast")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"],
                    help="sdpa: our sdpa_varlen; flash_attention_2: varlen kernels from position-id restarts")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (run with --device cpu --tiny for a smoke run)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {where}; peak bf16: {peak / 1e12 if peak else 'unknown'} TFLOP/s")
    out = {"bench": "gpu", "device": where}
    for name, fn in (("clip", bench_clip), ("llm", bench_llm)):
        if args.only and args.only != name:
            continue
        r = fn(args, device)
        achieved = r["flops_per_step"] / r["step_s"]
        r["tflops"] = achieved / 1e12
        r["mfu"] = achieved / peak if peak else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (give --peak-tflops)"
        rate = f"{r['samples_per_s']:.1f} samples/s" if name == "clip" else \
            f"{r['tokens_per_s']:.0f} tokens/s ({r['real_tokens_per_s']:.0f} real)"
        print(f"{name}: {rate}, {r['tflops']:.1f} TFLOP/s, MFU {mfu}; FLOPs/step = {r['formula']}")
        out[f"{name}_mfu"] = r["mfu"]
        out[name] = {k: v for k, v in r.items() if k != "formula"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
