"""The training loop under torchrun as shipped configs run it: FSDP2 with bf16, EMA and zero-shot evaluation;
SIGTERM reaching one rank; checkpoints of tied weights; fp32 master weights over a bf16 model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.checkpoint import model_weights

from conftest import REPO, free_port

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def clip_args(synth_dir, tiny32, out, steps, extra=()):
    z = synth_dir / "eval/zeroshot"
    return ["--config", str(REPO / "configs/clip/demo.yaml"), f"model.name={tiny32}",
            f"data.sources.0.path={synth_dir / 'pretrain'}", "data.batch_size=8", "data.num_workers=1",
            "data.shuffle_buffer=20", "data.image.size=32", f"train.output_dir={out}", f"train.steps={steps}",
            "train.log_every=1", "train.tensorboard=false", "train.progress=false", "optim.warmup_steps=2",
            f"zeroshot.0.folder={z / 'modality'}", f"zeroshot.1.folder={z / 'finding'}", *extra]


def torchrun_cmd(nproc: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", module, *args]


def test_fsdp_bf16_ema_and_zeroshot_eval(synth_dir, tiny32, tmp_path):
    """conceptclip.yaml's combination (FSDP2, bf16, EMA, concept loss) plus periodic zero-shot evaluation, on
    2 processes: the EMA saves with the model's shapes, and the numbers evaluated during training equal
    eval.zeroshot on the saved checkpoint."""
    out = tmp_path / "run"
    r = subprocess.run(torchrun_cmd(2, "train.clip", clip_args(
        synth_dir, tiny32, out, 4, ["train.parallel=fsdp", "train.precision=bf16", "optim.ema_decay=0.9",
                                    "train.save_every=2", "train.eval_every=2", "zeroshot.1.max_images=0"])),
        env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = out / "checkpoints/step_00000004"
    model, ema = model_weights(ckpt), model_weights(ckpt, ema=True)
    assert set(ema) == set(model) and all(ema[k].shape == model[k].shape for k in ema)  # a whole model
    assert all(v.dtype == torch.float32 for v in model.values() if v.is_floating_point())  # fp32 master weights
    assert any(not torch.equal(ema[k], model[k]) for k in ema)
    during = json.loads((out / "result.json").read_text())["zeroshot"]["modality"]
    from eval.zeroshot import main as zeroshot_main

    res = tmp_path / "zs.json"
    assert zeroshot_main(["--checkpoint", str(ckpt), "--folder", str(synth_dir / "eval/zeroshot/modality"),
                          "--prompts", str(REPO / "configs/prompts/synth_modality.yaml"), "--out", str(res)]) == 0
    after = json.loads(res.read_text())
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert during[k] == pytest.approx(after[k], abs=1e-6), k
    assert during["mean_auroc"] == pytest.approx(after["mean_auroc"], abs=1e-4)


def _workers(proc: subprocess.Popen, n: int, timeout: float = 60) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for c in psutil.Process(proc.pid).children():
            try:
                found[int(c.environ().get("RANK", -1))] = c.pid
            except (psutil.Error, ValueError):
                pass
        if len(found) == n and -1 not in found:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun workers not found")


@pytest.fixture(scope="module")
def some_corrupt(synth_dir, tmp_path_factory) -> Path:
    """The synthetic captions with a random 30% of the images corrupt: ranks skip different numbers of samples,
    so their data positions differ."""
    import random
    import io
    import tarfile

    from vlm.data.schema import Manifest, ShardInfo, read_manifest, sha256_file

    out = tmp_path_factory.mktemp("corrupt") / "pretrain"
    out.mkdir()
    infos, rng = [], random.Random(0)
    for shard in read_manifest(synth_dir / "pretrain").shards:
        path = out / shard.name
        with tarfile.open(synth_dir / "pretrain" / shard.name) as src, tarfile.open(path, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if m.name.endswith((".png", ".jpg")) and rng.random() < 0.3:
                    data = data[:40]  # a truncated image: skipped as bad_image
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
        infos.append(ShardInfo(path.name, shard.num_samples, path.stat().st_size, sha256_file(path)))
    Manifest(out, sum(i.num_samples for i in infos), infos).write()
    return out


def test_sigterm_on_one_rank_stops_all_and_resumes_exactly(synth_dir, tiny32, some_corrupt, tmp_path):
    """Slurm preemption: SIGTERM reaches rank 1 only (the old handler lived on rank 0). Every rank stops after
    the same step, one complete checkpoint is written, every process exits 0, and train.resume=latest ends
    with the weights of an uninterrupted run (each rank resuming at its own data position)."""
    steps = 16
    extra = ["train.save_every=4", "train.eval_every=0", "zeroshot=[]", f"data.sources.0.path={some_corrupt}"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run(torchrun_cmd(2, "train.clip", clip_args(synth_dir, tiny32, a, steps, extra)), env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(torchrun_cmd(2, "train.clip", clip_args(synth_dir, tiny32, b, steps, extra)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = _workers(proc, 2)
    deadline = time.time() + 300
    while not (b / "checkpoints/step_00000004/COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be preempted"
        time.sleep(0.05)
    os.kill(ranks[1], signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "SIGTERM: every rank stops at step" in log
    saved = sorted(p.name for p in (b / "checkpoints").iterdir())
    assert not any(n.endswith(".tmp") for n in saved) and f"step_{steps:08d}" not in saved
    assert not (b / "result.json").exists()  # the run is not finished
    stopped = json.loads((b / "checkpoints" / saved[-1] / "state.json").read_text())
    assert len(stopped["data"]) == 2 and stopped["data"][0] != stopped["data"][1]  # per-rank positions
    r = subprocess.run(torchrun_cmd(2, "train.clip", clip_args(synth_dir, tiny32, b, steps,
                                                               [*extra, "train.resume=latest"])),
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    wa = model_weights(a / f"checkpoints/step_{steps:08d}")
    wb = model_weights(b / f"checkpoints/step_{steps:08d}")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_interrupts_a_loader_that_finds_no_sample(synth_dir, tiny32, tmp_path):
    """Every sample skipped, resampled, no skip bound: both ranks' loaders keep looking. SIGTERM to rank 1 alone
    still stops the run cleanly (rank 0, which never got the signal and never reaches a step, learns of it
    through the process group's store): a checkpoint, exit 0, instead of a run deaf at 100% CPU."""
    out = tmp_path / "deaf"
    args = clip_args(synth_dir, tiny32, out, 10, ["data.resampled=true", "data.max_consecutive_skips=0",
                                                  "data.image.max_pixels=1", "train.eval_every=0", "zeroshot=[]"])
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(torchrun_cmd(2, "train.clip", args), env=ENV, stdout=log_file,
                                stderr=subprocess.STDOUT, text=True)
        ranks = _workers(proc, 2)
        deadline = time.time() + 120
        while log_path.read_text().count("image_too_large") < 2:  # training started; both loaders spin
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1)
        os.kill(ranks[1], signal.SIGTERM)
        proc.wait(timeout=120)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert (out / "checkpoints/step_00000000/COMPLETE").exists()


def test_all_skipped_stream_is_a_clear_error(synth_dir, tiny32, tmp_path):
    args = clip_args(synth_dir, tiny32, tmp_path / "x", 10, ["data.resampled=true", "data.max_consecutive_skips=50",
                                                             "data.image.max_pixels=1", "train.eval_every=0",
                                                             "zeroshot=[]"])
    r = subprocess.run([sys.executable, "-m", "train.clip", *args], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "image_too_large" in r.stderr and "max_consecutive_skips" in r.stderr, r.stderr[-2000:]


def test_checkpoint_of_tied_weights_round_trips(tmp_path):
    """An LLM whose head shares its input embedding: safetensors refuses shared memory; save copies it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm import checkpoint as ckpt

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, tie_word_embeddings=True))
    state = llm.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    path = ckpt.save(tmp_path, 1, state, {"x": torch.zeros(1)}, {"step": 1})
    weights, _, _, _ = ckpt.load(path)
    assert torch.equal(weights["lm_head.weight"], state["model.embed_tokens.weight"])
    ckpt.load_weights_into(llm, weights)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "checksums.json", "model.safetensors", "state.json",
                                                      "train_state.pt"]


@pytest.mark.parametrize("master", ["fp32", "bf16"])
def test_master_weights_of_a_bf16_model(master):
    """A bf16-stored model trains on fp32 master weights (small updates survive) unless train.master_dtype=bf16
    asks otherwise; both give one dtype, which FSDP2 needs."""
    from train.distributed import set_master_dtype

    model = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16), torch.nn.Linear(8, 8))
    dtype = torch.float32 if master == "fp32" else torch.bfloat16
    set_master_dtype(model, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    w = model[0].weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    model(torch.randn(4, 8, dtype=dtype)).sum().backward()
    opt.step()
    changed = float((model[0].weight != w).float().mean())
    assert changed > 0.9 if master == "fp32" else changed < 0.5


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Every data file, COMPLETE and the folder itself are fsynced before the atomic rename, and the parent
    folder after it (so neither a power loss nor a crash can leave a step_N whose files are empty)."""
    from vlm import checkpoint as ckpt

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    path = ckpt.save(tmp_path, 3, {"w": torch.ones(2)}, {"x": torch.zeros(1)}, {"step": 3}, {"w": torch.ones(2)})
    rename = events.index(("replace", str(path)))
    before = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"model.safetensors", "ema.safetensors", "train_state.pt", "state.json", "COMPLETE",
            "step_00000003.tmp"} <= before
    assert ("fsync", str(tmp_path)) in events[rename:]


def test_no_host_sync_between_logging_steps_and_nonfinite_steps_still_skipped(synth_dir, tiny32, tmp_path,
                                                                              monkeypatch):
    """Between logging steps the loop reads no tensor on the host (no .item(), float(), bool(), tolist()), and a
    step whose gradients are non-finite still leaves the weights, the AdamW states and the EMA untouched (the
    fused kernel skips it on the device); the skip is counted at the next logging step."""
    from train.clip import build_run
    from train.config import ClipRunConfig, parse_run_config
    from train.trainer import Trainer
    from vlm.utils import Dist

    cfg = parse_run_config("t", "", ClipRunConfig, clip_args(synth_dir, tiny32, tmp_path / "run", 8, [
        "train.log_every=4", "train.save_every=0", "optim.ema_decay=0.9", "zeroshot=[]", "optim.grad_clip=1.0"]))
    model, kwargs = build_run(cfg, Dist())
    trainer = Trainer(model, **kwargs)
    reads, inside = [], [False]
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if inside[0]:
                reads.append((trainer.step, _name))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    task_step, loop_step = trainer.task.train_step, trainer._train_step
    snapshots = {}

    def poisoned(model, batches, ctx):
        out = task_step(model, batches, ctx)
        if trainer.step == 5:  # the 6th step: non-finite gradients
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return out

    def watched(*a, **k):
        inside[0] = True
        try:
            loop_step(*a, **k)
        finally:
            inside[0] = False
        snapshots[trainer.step] = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                                   {k: v.clone() for k, v in trainer.ema.shadow.items()})
    trainer.task.train_step, trainer._train_step = poisoned, watched
    result = trainer.fit()
    assert result["step"] == 8
    assert {s for s, _ in reads} >= {4, 8}  # the logging steps read the metrics (the counter works)
    quiet = {s for s, _ in reads} - {1, 4, 8}  # the first step checks every parameter got a gradient
    assert not quiet, f"host reads outside logging steps: {[r for r in reads if r[0] in quiet][:10]}"
    w5, e5 = snapshots[5]
    w6, e6 = snapshots[6]
    assert all(torch.equal(w5[k], w6[k]) for k in w5) and all(torch.equal(e5[k], e6[k]) for k in e5)
    assert any(not torch.equal(snapshots[7][0][k], w6[k]) for k in w6)  # and training went on
    steps = {int(s["step"]) for s in trainer.opt.state.values()}
    assert steps == {7}  # AdamW counted 7 updates in 8 steps
    logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_steps"] for m in logged if "nonfinite_steps" in m] == [0, 1]


def test_compiled_blocks_train_as_eager(synth_dir, tiny32, tmp_path):
    """train.compile=true: every transformer block of both towers compiled (torch.compile, inductor on CPU);
    three steps give the eager run's losses and weights within float tolerance, under the same names."""
    from train.clip import build_run
    from train.config import ClipRunConfig, parse_run_config
    from train.distributed import repeated_blocks
    from train.trainer import Trainer
    from vlm.utils import Dist

    runs = {}
    for mode in ("eager", "compiled"):
        cfg = parse_run_config("t", "", ClipRunConfig, clip_args(synth_dir, tiny32, tmp_path / mode, 3, [
            "data.num_workers=0", "train.save_every=0", "zeroshot=[]", f"train.compile={mode == 'compiled'}"]))
        torch.manual_seed(0)
        model, kwargs = build_run(cfg, Dist())
        trainer = Trainer(model, **kwargs)
        trainer.fit()
        blocks = repeated_blocks(model)
        runs[mode] = ([json.loads(x)["loss"] for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()],
                      {k: v.detach().clone() for k, v in model.state_dict().items()},
                      sum("compile" in repr(getattr(b.forward, "__wrapped__", b.forward)) or
                          hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks))
    (le, we, ce), (lc, wc, cc) = runs["eager"], runs["compiled"]
    assert ce == 0 and cc == 4  # 2 image + 2 text blocks
    assert lc == pytest.approx(le, rel=1e-4, abs=1e-5)
    assert set(we) == set(wc) and all(torch.allclose(we[k], wc[k], atol=1e-5) for k in we)


def _tiny_trainer(synth_dir, tiny32, out, steps, extra=()):
    from train.clip import build_run
    from train.config import ClipRunConfig, parse_run_config
    from train.trainer import Trainer
    from vlm.utils import Dist

    cfg = parse_run_config("t", "", ClipRunConfig, clip_args(synth_dir, tiny32, out, steps, [
        "data.num_workers=0", "zeroshot=[]", *extra]))
    torch.manual_seed(0)
    model, kwargs = build_run(cfg, Dist())
    return Trainer(model, **kwargs)


def test_a_run_of_nonfinite_steps_between_logs_still_stops(synth_dir, tiny32, tmp_path):
    """Three skipped steps in a row that end before the next logging step: train.max_nonfinite=2 still stops the
    run (the longest run since the last log is kept on the device)."""
    from train.trainer import NonFiniteError

    trainer = _tiny_trainer(synth_dir, tiny32, tmp_path / "run", 8, ["train.log_every=5", "train.max_nonfinite=2",
                                                                     "train.save_every=0"])
    task_step = trainer.task.train_step

    def poisoned(model, batches, ctx):
        out = task_step(model, batches, ctx)
        if trainer.step in (1, 2, 3):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return out
    trainer.task.train_step = poisoned
    with pytest.raises(NonFiniteError, match="3 non-finite losses in a row"):
        trainer.fit()
    assert trainer.step == 5


def test_checkpoints_of_the_previous_format_resume(synth_dir, tiny32, tmp_path):
    """A checkpoint in the single-file format of earlier versions (model.safetensors + the whole optimizer in
    train_state.pt, written by a run whose AdamW was not fused) resumes on the same world size: the weights
    are loaded and training goes on (this run's fused kernel, not the saved flags)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from vlm import checkpoint as ckpt

    first = _tiny_trainer(synth_dir, tiny32, tmp_path / "a", 2, ["train.save_every=0"])
    first.fit()
    optim = get_optimizer_state_dict(first.model, first.opt, options=StateDictOptions(full_state_dict=True))
    for g in optim["param_groups"]:
        g["fused"], g["foreach"] = None, None  # what the previous version's CPU optimizer saved
    plain, tensors = ckpt.rng_state()
    old = ckpt.save(tmp_path / "old", 2, dict(first.model.state_dict()),
                    {"optimizer": optim, "scheduler": first.sched.state_dict(), "rng": [tensors]},
                    {"step": 2, "data": [first.loader.state_dict()], "rng": [plain], "world_size": 1,
                     "nonfinite_total": 0, "config": {}})
    second = _tiny_trainer(synth_dir, tiny32, tmp_path / "b", 4, ["train.save_every=0", f"train.resume={old}"])
    result = second.fit()
    assert result["step"] == 4 and all(g["fused"] for g in second.opt.param_groups)
    assert {int(s["step"]) for s in second.opt.state.values()} == {4}  # 2 saved + 2 new updates
