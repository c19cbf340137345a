"""Shared fixtures: the repository root, the real annotation fixtures, a small synthetic corpus."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: longer end-to-end tests")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic corpus (data_prep.synth), shared by the whole session: read, never modify."""
    from data_prep.synth import main

    out = tmp_path_factory.mktemp("synth") / "corpus"
    assert main(["--out", str(out), "--num-train", "240", "--num-test", "40", "--image-size", "32",
                 "--shard-size", "50", "--workers", "0", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory) -> Path:
    """tiny-vit-text at 32 px (patch 8) with a 32-token context: the smallest train.clip model."""
    arch = json.loads((REPO / "configs/model/tiny-vit-text.json").read_text())
    arch["vision_cfg"].update(image_size=32, patch_size=8)
    arch["text_cfg"]["context_length"] = 32
    p = tmp_path_factory.mktemp("arch") / "tiny32.json"
    p.write_text(json.dumps(arch))
    return p


def save_tiny_vision(folder: Path) -> Path:
    """A tiny open_clip ViT (tiny-vit-text at 32 px, patch 8, seed 0) exported as a train.clip run would be: the
    assembly's vision tower in the instruct / preference / GRPO tests."""
    import torch

    from vlm.hub import export_open_clip
    from vlm.models.clip import MedCLIP

    arch = json.loads((REPO / "configs/model/tiny-vit-text.json").read_text())
    arch.pop("_comment")
    arch["vision_cfg"].update(image_size=32, patch_size=8)
    torch.manual_seed(0)
    export_open_clip(MedCLIP(arch), folder, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    return folder


def kill_after_checkpoint(cmd: list[str], env: dict, checkpoint: Path, timeout: float = 120) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``checkpoint`` is complete (mid-run, no clean-up)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (checkpoint / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], env: dict, cwd=None, tries: int = 3):
    """``python -m torch.distributed.run --nproc_per_node N ARGS`` on a free port; tried again on a new
    port when another process took the port between choosing and binding it, and when a rank aborted in
    the C++ runtime's teardown ("terminate called without an active exception": a gloo thread still joinable
    at interpreter exit; seen once, in a clean-clone CI run of the whole suite on 2 cores)."""
    import subprocess
    import sys

    for _ in range(tries):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                            "--master_port", str(free_port()), *args], env=env, cwd=cwd, capture_output=True, text=True)
        out = (r.stderr + r.stdout).lower()
        if r.returncode == 0 or ("address already in use" not in out
                                 and "terminate called without an active exception" not in out):
            return r
    return r


def one_and_two_processes(script: Path, tmp_path: Path, *args: str, nproc: int = 2) -> tuple[dict, dict]:
    """Run a tests/dist script plainly and under torchrun with ``nproc`` (2) gloo processes; each saves a
    safetensors file -> (one process's tensors, the processes' tensors)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.st"), *args], check=True, env=env)
    r = torchrun(nproc, [str(script), str(tmp_path / "two.st"), *args], env)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(tmp_path / "one.st"), load_file(tmp_path / "two.st")


def stand_in_images(root: Path, names, size=(32, 32), mode="RGB"):
    """Draw a distinct stand-in image for each relative name under root (fixtures ship no images)."""
    for i, name in enumerate(names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            Image.new(mode, size, (i * 37 % 255, 40, 90) if mode == "RGB" else i * 37 % 255).save(p)


def load_fixture(rel: str):
    return json.loads((FIXTURES / rel).read_text())
