"""Every shipped training config, rehearsed as shipped (train.rehearse: the model shrunk to a tiny one of the
same family, everything else kept): 2 gloo processes for the configs documented for torchrun or that set a
parallel mode, one otherwise. A new YAML under configs/clip/, configs/instruct/ or configs/preference/ is
covered without a new test. QLoRA configs need CUDA and are skipped with that reason elsewhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, torchrun

CONFIGS = sorted([*(REPO / "configs/clip").glob("*.yaml"), *(REPO / "configs/instruct").glob("*.yaml"),
                  *(REPO / "configs/preference").glob("*.yaml")])
# `make test` rehearses one config per family (open_clip text tower; Hugging Face text tower with FSDP2, bf16,
# EMA and concepts; stage 1; LoRA stage 2; full FSDP2 stage 2; stock Qwen2.5-VL and Gemma 3 VLMs with LoRA;
# LoRA DPO of the assembly; GRPO of a stock VLM); `make test-all` every one of them
PER_FAMILY = {"clip/demo.yaml", "clip/conceptclip.yaml", "instruct/demo_stage1.yaml", "instruct/llava_med_7b_lora.yaml",
              "instruct/llava_med_7b_full.yaml", "instruct/qwen2_5_vl_7b_lora.yaml", "instruct/medgemma_4b_lora.yaml",
              "preference/llava_med_7b_report_dpo.yaml", "preference/vqa_grpo_qwen2_5_vl_7b.yaml"}


def _param(path):
    name = path.relative_to(REPO / "configs").as_posix()
    return pytest.param(path, id=name, marks=() if name in PER_FAMILY else pytest.mark.slow)


def processes(path) -> int:
    text = path.read_text()
    return 2 if "torchrun" in text or "parallel:" in text else 1


def rehearse(path, synth_dir, tmp_path, *overrides: str, nproc: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    args = ["-m", "train.rehearse", "--config", str(path), "--synthetic-data", str(synth_dir), "--max-workers", "1",
            "--max-batch-size", "8", "--report", str(report), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if (nproc or processes(path)) == 2:
        r = torchrun(2, args, env)
    else:
        r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    return r, (json.loads(report.read_text()) if report.is_file() else {})


@pytest.mark.parametrize("path", [_param(p) for p in CONFIGS])
def test_shipped_config_rehearses(path, synth_dir, tmp_path):
    if "llm_quantize: 4bit" in path.read_text() or "llm_quantize: 8bit" in path.read_text():
        if not torch.cuda.is_available():
            pytest.skip("QLoRA (bitsandbytes) needs a CUDA GPU")
    r, rep = rehearse(path, synth_dir, tmp_path)
    assert r.returncode == 0 and rep.get("passed"), (r.stdout + r.stderr)[-4000:]
    assert rep["world_size"] == processes(path)
    checks = {c["name"]: c for c in rep["checks"]}
    assert {"loss", "checkpoint", "resume", "eval"} <= set(checks)
    if path.name == "llava_med_7b_lora.yaml":  # the projector and the adapters train and move; the LLM does not
        assert "config: all   model: all" in checks["projector"]["detail"]
        assert "config: all   model: all" in checks["LLM adapters"]["detail"]
        assert "config: none  model: none    changed after 2 steps: 0.0%" in checks["LLM"]["detail"]
        print("\n".join(r.stdout.splitlines()[-16:]))
    if path.name == "llava_med_7b_report_dpo.yaml":  # LoRA DPO: only the adapters (the reference is them off)
        assert "config: all   model: all" in checks["LLM adapters"]["detail"]
        for group in ("projector", "LLM", "vision tower"):
            assert "config: none  model: none    changed after 2 steps: 0.0%" in checks[group]["detail"]
        assert checks["loss"]["detail"].startswith("0.69")  # ~log 2: the first steps compare the SFT model with itself
    if path.name in ("qwen2_5_vl_7b_lora.yaml", "medgemma_4b_lora.yaml"):  # stock VLM: its own parts, as configured
        assert "config: none  model: none    changed after 2 steps: 0.0%" in checks["vision tower"]["detail"]
        assert "config: all   model: all" in checks["projector"]["detail"]
        assert "config: all   model: all" in checks["LLM adapters"]["detail"]
        assert "config: none  model: none    changed after 2 steps: 0.0%" in checks["LLM"]["detail"]


def test_grpo_of_a_stock_vlm_under_fsdp2(synth_dir, tmp_path):
    """The shipped GRPO config (stock Qwen2.5-VL, LoRA) with FSDP2 on 2 processes: generation runs the vision
    blocks (FSDP units of their own) before any forward through the root, which FSDP2 refuses unless the root
    is settled first."""
    r, rep = rehearse(REPO / "configs/preference/vqa_grpo_qwen2_5_vl_7b.yaml", synth_dir, tmp_path,
                      "train.parallel=fsdp", nproc=2)
    assert r.returncode == 0 and rep.get("passed"), (r.stdout + r.stderr)[-4000:]
    assert rep["world_size"] == 2 and "parallel=fsdp" in r.stdout
