"""train.instruct end to end on tiny models: stage 1 -> stage 2, bad conversations skipped and
counted, resume identity, and the transformers export giving the same logits in stock classes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.checkpoint import model_weights

from conftest import REPO, kill_after_checkpoint, save_tiny_vision, stand_in_images


@pytest.fixture(scope="module")
def assets(synth_dir, tmp_path_factory):
    """A 32 px open_clip export (the vision tower), a tokenizer trained on the corpus, a llava shard with bad rows."""
    from data_prep.shards import main as shards_main
    from data_prep.tokenizer import main as tok_main

    root = tmp_path_factory.mktemp("instruct")
    save_tiny_vision(root / "vision")
    assert tok_main(["--shards", str(synth_dir / "instruct"), "--out", str(root / "tok"), "--vocab-size", "600"]) == 0
    good = [{"id": f"g{i}", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                                                {"from": "gpt", "value": "A chest x-ray."}]}
            for i in range(6)]
    bad = [{"id": "no_token", "image": "a.png", "conversations": [{"from": "human", "value": "What is shown?"},
                                                                 {"from": "gpt", "value": "x"}]},
           {"id": "empty", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                              {"from": "gpt", "value": ""}]}]
    stand_in_images(root / "llava", ["a.png"])
    (root / "llava" / "data.json").write_text(json.dumps(good + bad))
    assert shards_main(["--format", "llava", "--input", str(root / "llava" / "data.json"), "--out",
                        str(root / "llava_shards"), "--workers", "0", "--quiet"]) == 0
    return root


def run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train.instruct", *args], env=env, capture_output=True, text=True, **kw)


def base_args(assets, stage: int, source: Path, out: Path, steps: int, extra=()):
    cfg = REPO / f"configs/instruct/demo_stage{stage}.yaml"
    return ["--config", str(cfg), f"model.vision={assets / 'vision'}", f"model.tokenizer={assets / 'tok'}",
            "model.llm_config.hidden_size=64", "model.llm_config.intermediate_size=128",
            f"data.sources.0.path={source}", "data.image.size=32", "data.num_workers=0", "data.batch_size=4",
            f"train.output_dir={out}", f"train.steps={steps}", "train.save_every=2", "train.progress=false",
            "train.tensorboard=false", "train.log_every=1", "optim.warmup_steps=1",
            *(["model.init_from=null"] if stage == 2 else []), *extra]


def test_stage1_then_stage2(assets, synth_dir, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    r = run(base_args(assets, 1, synth_dir / "pretrain", s1, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    w1 = model_weights(s1 / "checkpoints/step_00000004")
    w0 = model_weights(s1 / "checkpoints/step_00000002")
    moved = {k for k in w1 if not torch.equal(w0[k], w1[k])}
    assert moved and all(k.startswith("model.multi_modal_projector.") for k in moved)  # stage 1: projector only
    r = run(base_args(assets, 2, synth_dir / "instruct", s2, 12, [f"model.init_from={s1}", "chat.max_length=256"]))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (s2 / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    w2 = model_weights(s2 / "checkpoints/step_00000012")
    assert not torch.equal(w2["lm_head.weight"], w1["lm_head.weight"])


def test_bad_conversations_are_skipped_and_counted(assets, tmp_path):
    out = tmp_path / "bad"
    r = run(base_args(assets, 2, assets / "llava_shards", out, 2, ["chat.max_length=160"]))
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = json.loads((out / "result.json").read_text())["skipped"]
    assert skipped == {"image_token_mismatch": 1, "empty_assistant_turn": 1}
    assert "skipping sample llava-no_token: image_token_mismatch" in r.stderr


def test_no_chat_template_is_a_clear_error(assets, tmp_path, synth_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tok")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "notemplate")
    (tmp_path / "notemplate" / "chat_template.jinja").unlink(missing_ok=True)
    r = run(base_args(assets, 2, synth_dir / "instruct", tmp_path / "x", 2, [f"model.tokenizer={tmp_path / 'notemplate'}"]))
    assert r.returncode == 2 and "no chat template" in r.stderr


def test_resume_identity_and_transformers_export(assets, synth_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = lambda out, steps, extra=(): base_args(assets, 2, synth_dir / "instruct", out, steps,
                                                  ["chat.max_length=256", "data.num_workers=2", *extra])
    assert run(args(a, 6)).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kill_after_checkpoint([sys.executable, "-m", "train.instruct", *args(b, 6)], env,
                          b / "checkpoints" / "step_00000002")
    r = run(args(b, 6, ["train.resume=latest"]))
    assert r.returncode == 0 and "resumed from" in r.stderr
    wa = model_weights(a / "checkpoints/step_00000006")
    wb = model_weights(b / "checkpoints/step_00000006")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from train.config import InstructRunConfig
    from train.export import _from_dict, main as export_main
    from train.instruct import build_assistant
    from vlm.checkpoint import load_weights_into

    assert export_main(["--checkpoint", str(a), "--to", "transformers", "--out", str(tmp_path / "hf")]) == 0
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    state = json.loads((a / "checkpoints/step_00000006/state.json").read_text())
    cfg = _from_dict(InstructRunConfig, state["config"])
    cfg.model.init_from = None
    ours, tok = build_assistant(cfg)
    load_weights_into(ours, wa)
    ours.eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What imaging modality is this?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    from PIL import Image

    inputs = processor(images=Image.new("RGB", (32, 32), (90, 40, 40)), text=prompt, return_tensors="pt")
    with torch.no_grad():
        theirs = stock(**inputs).logits
        mine = ours(**inputs).logits
    assert torch.allclose(theirs, mine, atol=1e-4)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_instruct_step_matches_one_process(tmp_path, parallel):
    """Stage 2 under DDP / FSDP2 on 2 gloo processes, ranks holding different token counts: same loss
    and same weights after the step as one process with the whole batch."""
    from conftest import one_and_two_processes

    one, two = one_and_two_processes(REPO / "tests" / "dist" / "instruct_step.py", tmp_path, parallel)
    assert set(one) == set(two)
    assert torch.allclose(one["loss"], two["loss"], atol=1e-5), (one["loss"], two["loss"])
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), (k, (one[k] - two[k]).abs().max())


def shipped_7b_args(assets, synth_dir, name: str, llm: Path, out: Path, steps: int, extra=()):
    """A shipped 7B config as shipped except the model shrunk (tiny vision export, tiny LLM folder of the same
    family) and the data (the synthetic conversations for every source)."""
    from vlm.config import load_config
    from train.config import InstructRunConfig

    cfg = load_config(InstructRunConfig, REPO / f"configs/instruct/{name}")
    sources = [f"data.sources.{i}.path={synth_dir / 'instruct'}" for i in range(len(cfg.data.sources))]
    return ["--config", str(REPO / f"configs/instruct/{name}"), f"model.vision={assets / 'vision'}",
            f"model.llm={llm}", "model.init_from=null", "model.attn_impl=sdpa", *sources, "data.image.size=32",
            "data.num_workers=1", "data.batch_size=4", "chat.max_length=384", f"train.output_dir={out}",
            f"train.steps={steps}", "train.save_every=1", "train.progress=false", "train.tensorboard=false",
            "train.resume=null", *extra]


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """A 2-layer Mistral stored in bf16 (as Mistral-7B is) with a Metaspace BPE tokenizer and [INST] template."""
    from vlm.models.tiny import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("mistral") / "llm", "mistral", dtype="bfloat16")


def test_lora_stage2_trains_projector_and_adapters_only(assets, synth_dir, tiny_mistral, tmp_path):
    """llava_med_7b_lora.yaml as shipped (model shrunk): the projector trains fully, LoRA adapters train, the
    LLM base and the vision tower stay frozen (peft's injection used to freeze the projector)."""
    out = tmp_path / "lora"
    r = run(shipped_7b_args(assets, synth_dir, "llava_med_7b_lora.yaml", tiny_mistral, out, 2,
                            ["train.precision=bf16"]))
    assert r.returncode == 0, r.stderr[-3000:]
    w1 = model_weights(out / "checkpoints/step_00000001")
    w2 = model_weights(out / "checkpoints/step_00000002")
    moved = {k for k in w1 if not torch.equal(w1[k], w2[k])}
    proj = {k for k in w1 if "multi_modal_projector" in k}
    adapters = {k for k in w1 if "lora_" in k}
    assert proj and proj <= moved
    assert adapters and adapters <= moved
    assert moved == proj | adapters, sorted(moved - proj - adapters)[:5]
    # fp32 master weights for what trains (adapters included); the frozen base LLM stays as stored (bf16)
    assert all(w2[k].dtype == torch.float32 for k in proj | adapters)
    assert w2["model.language_model.layers.0.mlp.up_proj.base_layer.weight"].dtype == torch.bfloat16


def test_fsdp_full_finetuning_of_a_bf16_llm(assets, synth_dir, tiny_mistral, tmp_path):
    """llava_med_7b_full.yaml as shipped (FSDP2, bf16, lr 2e-5 with its warmup; model shrunk to a bf16-stored
    Mistral) on 2 processes: no dtype crash, fp32 master weights, and after two steps more than 90% of the
    LLM's weight elements changed (in pure bf16 such updates round away). The input embedding is left out of
    the count: only the rows of tokens in the two steps' batches get a gradient at all, and at this size it
    is a fifth of the LLM (at 7B, 2%)."""
    from conftest import torchrun

    out = tmp_path / "full"
    r = torchrun(2, ["-m", "train.instruct", *shipped_7b_args(assets, synth_dir, "llava_med_7b_full.yaml",
                                                              tiny_mistral, out, 2)],
                 {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    before = {("model.language_model." + k.removeprefix("model.") if k.startswith("model.") else k): v
              for k, v in load_file(tiny_mistral / "model.safetensors").items()}
    assert all(v.dtype == torch.bfloat16 for v in before.values())
    after = model_weights(out / "checkpoints/step_00000002")
    llm = {k: v for k, v in after.items() if k in before and "embed_tokens" not in k}
    assert llm and all(v.dtype == torch.float32 for v in llm.values())
    changed = sum(int((before[k].float() != v).sum()) for k, v in llm.items()) / sum(v.numel() for v in llm.values())
    assert changed > 0.9, changed
