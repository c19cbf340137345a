"""Shared benchmark helpers: the peer's virtual environment and JSON result lines.

open_clip_train 3.3 crashes on webdataset 1.x (KeyError: 'fname', open_clip issue #935) and runs
with webdataset 0.2.86. The peer therefore runs in `.peer-venv`, created on first use: a bare
venv into which the packages open_clip_train imports are installed (webdataset 0.2.86, pandas,
braceexpand, fsspec), its site-packages first, with our `.venv` site-packages appended by a .pth
file (torch, torchvision and open_clip are shared, not reinstalled: gigabytes). Our webdataset is
never pinned down.
"""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_VENV = REPO / ".peer-venv"
PEER_WDS = "webdataset==0.2.86"
# everything open_clip_train imports beyond what it shares with us (torch, torchvision, open_clip, timm,
# transformers come from our environment): its `training` extra, with webdataset at the version it runs with
PEER_PACKAGES = [PEER_WDS, "braceexpand", "pandas", "fsspec"]
PEER_IMPORTS = "import webdataset, pandas, braceexpand, open_clip_train.data, open_clip_train.main, open_clip_train.train"
PEER_STAMP = "2\n"  # bump when PEER_PACKAGES changes: an older .peer-venv is rebuilt


def peer_python() -> str:
    """The peer's interpreter, its environment built on first use from nothing but a bare venv: the packages
    open_clip_train imports are installed into it (not borrowed from ours), and every module the peer's
    training entry point imports is imported once to prove it."""
    import shutil

    py = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".ready"
    if not marker.exists() or marker.read_text() != PEER_STAMP:
        if PEER_VENV.exists():
            shutil.rmtree(PEER_VENV)
        print(f"[bench] creating the peer environment {PEER_VENV} ({', '.join(PEER_PACKAGES)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        peer_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
        ours = [p for p in site.getsitepackages() if p.endswith("site-packages")][0]
        Path(peer_site, "zz_medvlm_shared.pth").write_text(ours + "\n")  # torch & co., after the peer's own
        # pip sees what ours provides (numpy, ...) and installs the rest into the peer's site-packages
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        check = subprocess.run([str(py), "-c", PEER_IMPORTS + "; print(webdataset.__version__)"],
                               check=True, capture_output=True, text=True).stdout.strip()
        if check != PEER_WDS.split("==")[1]:
            raise RuntimeError(f"peer venv has webdataset {check}, expected {PEER_WDS}")
        marker.write_text(PEER_STAMP)
    return str(py)


def run_json(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> dict:
    """Run a command whose last stdout line is a JSON object; return it."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON from {cmd}:\n{out.stdout}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def result_line(bench: str, ours: float, peer: float, **extra) -> str:
    return json.dumps({"bench": bench, "ours": round(ours, 2), "peer": round(peer, 2),
                       "ratio": round(ours / peer, 3) if peer else None, **extra})
