"""Checkpoint drills: damaged files (flipped bytes, truncation, a broken safetensors header, an invalid
state.json, a malicious pickle) are found by their checksums; resume=latest falls back to the previous intact
checkpoint with a warning naming the file; readers give one line naming the file; a SIGKILL during a save
leaves the previous checkpoint as latest and the resumed run ends bit-identical."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.clip import main as clip_main
from vlm import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def clip_args(synth_dir, tiny32, out, steps, extra=()):
    return ["--config", str(REPO / "configs/clip/demo.yaml"), f"model.name={tiny32}",
            f"data.sources.0.path={synth_dir / 'pretrain'}", "data.batch_size=16", "data.num_workers=0",
            "data.shuffle_buffer=50", "data.image.size=32", f"train.output_dir={out}", f"train.steps={steps}",
            "train.save_every=2", "train.keep_last=3", "train.log_every=1", "train.tensorboard=false",
            "train.progress=false", "train.eval_every=0", "optim.warmup_steps=1", "zeroshot=[]", *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs compute as the subprocesses do (OMP_NUM_THREADS=1), so weights compare bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run4(synth_dir, tiny32, tmp_path_factory):
    """An uninterrupted 6-step run: checkpoints at steps 2, 4 and 6 (6 consolidated)."""
    out = tmp_path_factory.mktemp("ck") / "run"
    assert clip_main(clip_args(synth_dir, tiny32, out, 6)) == 0
    return out


def shard_of(step_dir):
    return sorted((step_dir / "dcp").glob("*.distcp"))[0]


def flip(path, offset=None, n=4096):
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_PICKLE_RAN",))


# case -> (damage done to the checkpoint folder, the file its warning must name: "" = any file of the folder)
DAMAGE = {
    "4 KiB of flipped shard bytes": (lambda s: flip(shard_of(s)), ""),
    "truncated shard": (lambda s: truncate(shard_of(s)), ""),
    "truncated train_state.pt": (lambda s: truncate(s / "train_state.pt"), ""),
    "invalid state.json": (lambda s: (s / "state.json").write_text("{not json"), ""),
    "missing shard": (lambda s: shard_of(s).unlink(), ""),
    "DCP metadata flipped": (lambda s: flip(s / "dcp" / ".metadata", 0, 64), ""),
    # losing checksums.json must not switch verification off: state.json says the checkpoint had one
    "checksums.json deleted, shard flipped": (lambda s: ((s / "checksums.json").unlink(), flip(shard_of(s))),
                                              "checksums.json"),
    "malformed checksums entry": (lambda s: (s / "checksums.json").write_text(
        json.dumps({"algorithm": "sha256", "files": {"state.json": "x"}})), "checksums.json"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_previous_checkpoint(case, run4, synth_dir, tiny32, tmp_path, capsys, drill):
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    shutil.rmtree(out / "checkpoints/step_00000006")  # step 4 is the latest
    damaged = out / "checkpoints/step_00000004"
    damage, named = DAMAGE[case]
    damage(damaged)
    with drill.fault(f"checkpoint damage, resume=latest: {case}") as info:
        assert clip_main(clip_args(synth_dir, tiny32, out, 6, ["train.resume=latest"])) == 0
        log = capsys.readouterr().err.splitlines()
        warned = [x for x in log if "falling back" in x]
        assert len(warned) == 1 and str(damaged / named if named else damaged) in warned[0], warned
        assert any("resumed from" in x and "step_00000002" in x for x in log)
        # the run redid steps 3-6 from step 2: its final weights equal the uninterrupted run's
        a, b = ckpt.model_weights(run4 / "checkpoints/step_00000006"), ckpt.model_weights(out / "checkpoints/step_00000006")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        info["bytes_lost"] = 0


def test_every_checkpoint_damaged_is_one_clear_error(run4, synth_dir, tiny32, tmp_path, capsys, drill):
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    for step in ckpt.list_checkpoints(out / "checkpoints"):
        flip(shard_of(step))
    with drill.input("every checkpoint damaged, resume=latest"):
        rc = clip_main(clip_args(synth_dir, tiny32, out, 8, ["train.resume=latest"]))
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert rc == 2 and len(err) == 1 and "no intact checkpoint" in err[0] and "checksum mismatch" in err[0], err


def test_an_explicit_damaged_checkpoint_is_an_error_naming_the_file(run4, synth_dir, tiny32, tmp_path, capsys, drill):
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    step = out / "checkpoints/step_00000004"
    truncate(step / "train_state.pt")
    with drill.input("train.resume=<damaged path>"):
        rc = clip_main(clip_args(synth_dir, tiny32, out, 8, [f"train.resume={step}"]))
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert rc == 2 and len(err) == 1 and str(step / "train_state.pt") in err[0] and "truncated" in err[0], err


READERS = {
    "safetensors header": lambda s: flip(s / "model.safetensors", 0, 16),
    "truncated safetensors": lambda s: truncate(s / "model.safetensors"),
    "4 KiB flipped in safetensors": lambda s: flip(s / "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(READERS))
def test_readers_name_the_damaged_file(case, run4, tmp_path, capsys, drill):
    """model_weights (init_from, eval.*, train.export) verifies what it reads; the CLI prints one line."""
    from train.export import main as export_main

    step = tmp_path / "step_00000006"
    shutil.copytree(run4 / "checkpoints/step_00000006", step)
    READERS[case](step)
    with drill.input(f"damaged consolidated weights: {case}"):
        with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
            ckpt.model_weights(step)
        rc = export_main(["--checkpoint", str(step), "--to", "open_clip", "--out", str(tmp_path / "exp")])
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert rc == 2 and len(err) == 1 and str(step / "model.safetensors") in err[0], err
        assert not (tmp_path / "exp").exists()


def test_a_malicious_pickle_with_forged_checksums_is_refused(run4, synth_dir, tiny32, tmp_path, capsys, drill,
                                                            monkeypatch):
    """An attacker who also rewrites checksums.json: torch.load(weights_only=True) still refuses to run it."""
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    step = out / "checkpoints/step_00000006"
    with open(step / "train_state.pt", "wb") as f:
        pickle.dump({"scheduler": Evil(), "rng": []}, f)
    sums = json.loads((step / "checksums.json").read_text())
    sums["files"]["train_state.pt"] = ckpt._digest(step / "train_state.pt")
    (step / "checksums.json").write_text(json.dumps(sums))
    monkeypatch.chdir(tmp_path)
    with drill.hole("malicious pickle in train_state.pt, checksums forged"):
        rc = clip_main(clip_args(synth_dir, tiny32, out, 8, ["train.resume=latest"]))
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert not (tmp_path / "EVIL_PICKLE_RAN").exists()
        assert rc == 2 and len(err) == 1 and str(step / "train_state.pt") in err[0], err


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(run4, synth_dir, tiny32, tmp_path, drill):
    """SIGKILL the moment step 4's checkpoint folder appears (its shards being written): step 2 stays the
    latest complete one, nothing half-written is picked, and the resumed run ends bit-identical."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train.clip", *clip_args(synth_dir, tiny32, out, 6)]
    with drill.fault("SIGKILL of train.clip during a checkpoint save") as info:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp_ckpt, deadline = out / "checkpoints/step_00000004.tmp", time.time() + 120
        while not tmp_ckpt.exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before the save"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000002"]
        assert clip_main(clip_args(synth_dir, tiny32, out, 6, ["train.resume=latest"])) == 0
        a, b = ckpt.model_weights(run4 / "checkpoints/step_00000006"), ckpt.model_weights(out / "checkpoints/step_00000006")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not list((out / "checkpoints").glob("*.tmp"))
        info["bytes_lost"] = 0


def test_weights_planted_after_the_checksums_are_refused(run4, tmp_path, capsys, drill):
    """A model.safetensors copied into an intermediate (shards-only) checkpoint is not what it was written with:
    readers refuse it; an interrupted consolidation's unlisted file is written again by consolidate."""
    from train.export import main as export_main

    step = tmp_path / "step_00000004"
    shutil.copytree(run4 / "checkpoints/step_00000004", step)
    shutil.copy(run4 / "checkpoints/step_00000006/model.safetensors", step / "model.safetensors")
    with drill.hole("model.safetensors planted into a checkpoint"):
        rc = export_main(["--checkpoint", str(step), "--to", "open_clip", "--out", str(tmp_path / "exp")])
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert rc == 2 and len(err) == 1 and f"{step / 'model.safetensors'}: not in checksums.json" in err[0], err
    with drill.fault("kill between a consolidated file's rename and the checksums update") as info:
        assert ckpt.consolidate(step) == [step / "model.safetensors"]  # rewritten from the verified shards
        assert ckpt.verify(step) is None
        shards = ckpt._read_full(step, "model.")
        whole = ckpt.model_weights(step)
        assert all(torch.equal(whole[k], shards[k]) for k in shards)
        info["bytes_lost"] = 0
