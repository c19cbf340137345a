"""train.clip end to end on tiny configs: kill -9 and resume ends bit-identical, checkpoints are
atomic and pruned, wrong architectures are named, bad configs exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from vlm.checkpoint import model_weights

from conftest import REPO, kill_after_checkpoint


def args_for(synth_dir, tiny32, out, steps=20, extra=()):
    return ["--config", str(REPO / "configs/clip/demo.yaml"), f"model.name={tiny32}",
            f"data.sources.0.path={synth_dir / 'pretrain'}", "data.batch_size=16", "data.num_workers=2",
            "data.shuffle_buffer=50", "data.image.size=32", f"train.output_dir={out}", f"train.steps={steps}",
            "train.save_every=2", "train.keep_last=2", "train.log_every=1", "train.tensorboard=false",
            "train.progress=false", "train.eval_every=0", "optim.warmup_steps=3", "zeroshot=[]", *extra]


def run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train.clip", *args], env=env, capture_output=True, text=True, **kw)


def test_kill_and_resume_is_bit_identical(synth_dir, tiny32, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = run(args_for(synth_dir, tiny32, a))  # 20 steps of 16 from 240 samples: crosses an epoch
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kill_after_checkpoint([sys.executable, "-m", "train.clip", *args_for(synth_dir, tiny32, b)], env,
                          b / "checkpoints" / "step_00000008")
    done = sorted(p.name for p in (b / "checkpoints").iterdir())
    assert "step_00000020" not in done
    r = run(args_for(synth_dir, tiny32, b, extra=["train.resume=latest"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    wa = model_weights(a / "checkpoints/step_00000020")
    wb = model_weights(b / "checkpoints/step_00000020")
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = json.loads((a / "checkpoints/step_00000020/state.json").read_text())
    sb = json.loads((b / "checkpoints/step_00000020/state.json").read_text())
    assert sa["data"] == sb["data"] and sa["data"][0]["epoch"] == 1  # one position per rank
    # keep_last=2, complete ones only
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step_00000018", "step_00000020"]
    lines = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "samples_per_s", "data_time", "logit_scale", "loss_concept"} <= set(lines[-1])


def test_wrong_architecture_is_named(synth_dir, tiny32, tmp_path):
    a = tmp_path / "a"
    assert run(args_for(synth_dir, tiny32, a, steps=2)).returncode == 0
    weights = a / "checkpoints/step_00000002/model.safetensors"
    r = run(args_for(synth_dir, tiny32, tmp_path / "b", steps=1,
                     extra=["model.name=tiny-timm-text", f"model.pretrained={weights}", "data.image.size=160"]))
    assert r.returncode != 0
    assert "does not match this architecture" in r.stderr and "clip.visual" in r.stderr


def test_config_errors_exit_2(tmp_path, synth_dir, tiny32):
    r = run(args_for(synth_dir, tiny32, tmp_path / "x", extra=["optim.lrate=1"]))
    assert r.returncode == 2 and "lrate" in r.stderr
    assert not (tmp_path / "x").exists()


def test_nonfinite_losses_stop_with_checkpoint_intact(synth_dir, tiny32, tmp_path):
    out = tmp_path / "nf"
    r = run(args_for(synth_dir, tiny32, out, steps=6, extra=["optim.lr=1e30", "optim.warmup_steps=0",
                                                              "train.save_every=1", "train.max_nonfinite=2",
                                                              "optim.grad_clip=0"]))
    assert r.returncode != 0 and "non-finite losses in a row" in r.stderr
    # the skipped steps left the weights as they were: every checkpoint holds step 1's finite weights
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved[0] == "step_00000001" and all((out / "checkpoints" / p / "COMPLETE").exists() for p in saved)
    first = model_weights(out / "checkpoints/step_00000001")
    assert all(torch.isfinite(v).all() for v in first.values())
    for p in saved[1:]:
        w = model_weights(out / "checkpoints" / p)
        assert all(torch.equal(w[k], first[k]) for k in first)


def test_bf16_locked_image_tower_and_lora_text(synth_dir, tiny32, tmp_path):
    """bf16 autocast, a locked image tower and LoRA on the text tower: only what should train moves."""
    out = tmp_path / "lk"
    r = run(args_for(synth_dir, tiny32, out, steps=3, extra=["train.precision=bf16", "model.lock_image=true",
                                                              "model.lora_text.r=4", "optim.warmup_steps=0"]))
    assert r.returncode == 0, r.stderr[-3000:]
    w1 = model_weights(out / "checkpoints/step_00000002")
    w2 = model_weights(out / "checkpoints/step_00000003")
    moved = {k for k in w1 if not torch.equal(w1[k], w2[k])}
    assert moved and not any(k.startswith("clip.visual.") for k in moved)
    text_moved = {k for k in moved if k.startswith("clip.transformer.")}
    assert text_moved and all("lora_" in k for k in text_moved)
    # the export merges the adapters: stock open_clip keys only
    from train.export import main as export_main

    assert export_main(["--checkpoint", str(out), "--to", "open_clip", "--out", str(tmp_path / "exp")]) == 0
    keys = load_file(tmp_path / "exp" / "open_clip_model.safetensors").keys()
    assert not any("lora" in k for k in keys)
