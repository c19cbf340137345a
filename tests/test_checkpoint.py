"""Sharded checkpoints (torch.distributed.checkpoint): every rank writes its own shards, the final weights are
consolidated for stock loaders, a run resumes on another world size with the weights, optimizer states and
EMA resharded, and reading a checkpoint never unpickles foreign objects."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm import checkpoint as ckpt

from conftest import REPO, torchrun

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
GLOBAL_BATCH = 12


def clip_args(synth_dir, tiny32, out, steps, nproc, extra=()):
    return ["--config", str(REPO / "configs/clip/demo.yaml"), f"model.name={tiny32}",
            f"data.sources.0.path={synth_dir / 'pretrain'}", f"data.batch_size={GLOBAL_BATCH // nproc}",
            "data.num_workers=1", "data.shuffle_buffer=20", "data.image.size=32", f"train.output_dir={out}",
            f"train.steps={steps}", "train.log_every=1", "train.tensorboard=false", "train.progress=false",
            "train.eval_every=0", "zeroshot=[]", "optim.warmup_steps=2", "optim.lr=1e-3", "optim.ema_decay=0.9",
            "train.parallel=fsdp", "train.precision=bf16", *extra]


def metrics(run) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


@pytest.fixture(scope="module")
def saved_run(synth_dir, tiny32, tmp_path_factory):
    """conceptclip.yaml's mode (FSDP2, bf16, EMA) on 2 processes, 4 steps, checkpoints at 2 (in the background)
    and 4."""
    out = tmp_path_factory.mktemp("dcp") / "run"
    r = torchrun(2, ["-m", "train.clip", *clip_args(synth_dir, tiny32, out, 4, 2, ["train.save_every=2",
                                                                                  "train.async_checkpoint=true"])], ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_every_rank_writes_its_shards_and_the_last_is_consolidated(saved_run):
    mid, last = saved_run / "checkpoints/step_00000002", saved_run / "checkpoints/step_00000004"
    assert (mid / "COMPLETE").exists() and (last / "COMPLETE").exists()
    assert not list((saved_run / "checkpoints").glob("*.tmp"))
    for step in (mid, last):
        parts = sorted(p.name for p in (step / "dcp").glob("*.distcp"))
        assert parts == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank, written by that rank
        sizes = [(step / "dcp" / p).stat().st_size for p in parts]
        assert min(sizes) > 0.3 * max(sizes)  # the optimizer states split between the ranks, not all on rank 0
        # checksums of every file (step 2 async: rank 0 hashed the shards; step 4: each rank its own), the
        # ranks' digest files merged away; the consolidated weights added to step 4's
        sums = json.loads((step / "checksums.json").read_text())["files"]
        expected = {"state.json", "train_state.pt", "dcp/.metadata", *(f"dcp/{p}" for p in parts)}
        if step == last:
            expected |= {"model.safetensors", "ema.safetensors"}
        assert set(sums) == expected and not list((step / "dcp").glob(".sha256*"))
        assert ckpt.verify(step) is None and ckpt.verify(step, (1, 2)) is None
    assert not (mid / "model.safetensors").exists()  # intermediate checkpoints are shards only
    names = ckpt.shard_metadata(mid)
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg") for k in names)
    assert any(k.startswith("ema.") for k in names)
    # the consolidated files equal the weights assembled from the shards, with the model's names
    for ema in (False, True):
        whole = load_file(last / ("ema.safetensors" if ema else "model.safetensors"))
        assert set(whole) == set(ckpt.model_weights(mid, ema=ema))
        shards = ckpt._read_full(last, "model.")
        if ema:
            shards.update(ckpt._read_full(last, "ema."))
        assert all(torch.equal(whole[k], shards[k]) for k in shards)
        assert all(v.dtype == torch.float32 for v in whole.values())  # fp32 master weights under bf16 compute


@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_on_another_world_size(saved_run, synth_dir, tiny32, tmp_path, nproc):
    """The step-2 checkpoint of 2 processes, resumed by 1 and by 3: the model, every AdamW state and the EMA
    gathered from the new shards equal the saved tensors; training goes on from step 3 with the schedule's
    learning rates and a loss in line with the uninterrupted run's."""
    report, out = tmp_path / "report.json", tmp_path / "run"
    args = [str(REPO / "tests/dist/reshard.py"), str(saved_run / "checkpoints/step_00000002"), str(report),
            *clip_args(synth_dir, tiny32, out, 4, nproc)]
    if nproc == 1:
        r = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True)
    else:
        r = torchrun(nproc, args, ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    rep = json.loads(report.read_text())
    assert rep["differ"] == [] and rep["missing"] == [] and rep["tensors"] > 40, rep
    assert rep["step"] == 2
    before, after = metrics(saved_run), metrics(out)
    assert sorted(after) == [3, 4]
    for s in (3, 4):
        assert after[s]["lr"] == pytest.approx(before[s]["lr"], rel=1e-9)
        # the loss of a 12-sample step of a tiny model moves by up to ~25% with which samples it holds (the
        # redealt epoch gives other ranks other samples); what was loaded is checked exactly above
        assert abs(after[s]["loss"] - before[s]["loss"]) < 0.4 * before[1]["loss"]
    assert (out / "checkpoints/step_00000004/model.safetensors").exists()


def as_earlier_version(step: Path) -> None:
    """Make a checkpoint look like one of a version before checksums (none, and state.json does not ask)."""
    (step / "checksums.json").unlink()
    state = json.loads((step / "state.json").read_text())
    del state["integrity"]
    (step / "state.json").write_text(json.dumps(state))


def test_foreign_objects_in_checkpoint_metadata_are_refused(saved_run, tmp_path):
    """DCP's metadata file is a pickle: one that names anything but DCP's own classes is refused unread."""
    bad = tmp_path / "step_00000002"
    shutil.copytree(saved_run / "checkpoints/step_00000002", bad)
    as_earlier_version(bad)  # no checksums: the reader itself must refuse

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (bad / "dcp/.metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ckpt.CheckpointError, match="refusing"):
        ckpt.model_weights(bad)
    assert not (tmp_path / "pwned").exists()

    def short(b: bytes) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(b)]) + b
    # protocol 4 resolves dotted names: os.system reached through a DCP module that imports os
    for module, name in ((b"torch.distributed.checkpoint.filesystem", b"os.system"),
                         (b"torch.distributed.checkpoint.metadata", b"dataclasses.sys.modules"),
                         (b"torch.distributed.checkpoint.filesystem", b"_write_item")):
        (bad / "dcp/.metadata").write_bytes(
            pickle.PROTO + b"\x04" + short(module) + short(name) + pickle.STACK_GLOBAL
            + short(("echo pwned > " + str(tmp_path / "pwned")).encode()) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
        with pytest.raises(ckpt.CheckpointError, match="refusing"):
            ckpt.model_weights(bad)
        assert not (tmp_path / "pwned").exists()
    (bad / "dcp/.metadata").write_bytes(pickle.dumps(3))
    with pytest.raises(ckpt.CheckpointError, match="not DCP metadata"):
        ckpt.model_weights(bad)
    (bad / "dcp/.metadata").write_bytes(b"\x80\x04truncated")
    with pytest.raises(ckpt.CheckpointError, match="unreadable checkpoint metadata"):
        ckpt.model_weights(bad)


def test_truncated_shard_is_a_checkpoint_error(saved_run, tmp_path):
    bad = tmp_path / "step_00000004"
    shutil.copytree(saved_run / "checkpoints/step_00000004", bad)
    (bad / "model.safetensors").unlink()
    (bad / "ema.safetensors").unlink()
    as_earlier_version(bad)  # no checksums: DCP's own read fails, named
    part = bad / "dcp/__1_0.distcp"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="step_00000004: its shards could not be read"):
        ckpt.model_weights(bad, ema=True)
