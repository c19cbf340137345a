"""bench/gpu.py: the FLOP formula behind its MFU figures agrees with torch's own FLOP counter, and the
script's code path runs (on CPU, tiny models; the figures themselves need a GPU)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu  # noqa: E402


def counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


def test_formula_matches_torch_flop_counter():
    """Image tower (bidirectional) training FLOPs: 6*N*T + 12*L*d*T^2 per image vs FlopCounterMode's count of
    the real forward and backward (within 5%: the formula also counts the patch embedding's input gradient,
    which nobody computes, 3% of this tiny tower and 0.7% of ViT-B/16)."""
    from vlm.models.attention import set_attention
    from vlm.models.clip import MedCLIP

    arch = json.loads((REPO / "configs/model/vit-b16-clip.json").read_text())
    arch.pop("_comment")
    arch["vision_cfg"].update(image_size=64, patch_size=8, layers=2, width=64)
    arch["text_cfg"].update(width=64, heads=2, layers=2, context_length=16, vocab_size=1000)
    arch["embed_dim"] = 64
    model = MedCLIP(arch)
    set_attention(model, "eager")  # explicit matmuls: torch's counter has no formula for CPU's fused SDPA kernel
    x = torch.randn(4, 3, 64, 64)
    got = counted(lambda: model.encode_image(x).sum().backward())
    v = arch["vision_cfg"]
    ours = 4 * gpu.tower_flops(gpu.matmul_params(model.clip.visual), v["layers"], v["width"], 65, causal=False)
    assert ours == pytest.approx(got, rel=0.05)


def test_smoke_run_prints_the_result_line(capsys):
    assert gpu.main(["--device", "cpu", "--tiny", "--peak-tflops", "1", "--warmup", "0", "--steps", "1",
                     "--clip-batch", "8", "--llm-batch", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads(out[-1])
    assert result["bench"] == "gpu" and result["clip"]["flops_per_step"] > 0 and result["llm"]["conversations"] >= 2
    assert 0 < result["clip_mfu"] < 1 and 0 < result["llm_mfu"] < 1
    assert any(line.startswith("clip:") and "FLOPs/step = B * (6*N_img" in line for line in out)


def test_packed_rows_fill_rows_with_real_lengths():
    rows = gpu.packed_rows(4 * 4096, 4096, 576)
    assert all(sum(r) <= 4096 for r in rows) and sum(map(sum, rows)) >= 4 * 4096
    assert all(n >= 576 + 24 for r in rows for n in r)
