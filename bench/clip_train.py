"""CLIP training throughput: `train.clip` vs `python -m open_clip_train.main`, same architecture,
shards, batch size, precision, workers, device and loss (CLIP InfoNCE, no concept term).

    python bench/clip_train.py [--model tiny-vit-text] [--steps 200] [--batch-size 64] [--precision fp32]
                               [--device auto|cpu|cuda] [--compile]

Both stream the synthetic corpus's shards in resampled mode on the same device (the GPU when there is one,
unless --device says otherwise), with --compile both compile (ours: train.compile=true, per transformer
block; the peer: --torchcompile, the whole model). Both are timed the same way, from outside: the benchmark
reads each run's progress as it is written (our metrics.jsonl, the peer's log lines), stamps the moment each
logged step appears, and reports samples per second of wall clock between the first log after the warm-up
(--warmup steps) and the last one: the same steps, the same warm-up, the same clock. The peer runs in its
own environment (bench/common.py). Last line: {"bench": "clip_train", "ours": ..., "peer": ..., "ratio": ...}
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, peer_python, result_line  # noqa: E402

PEER_LAUNCH = "import open_clip, sys; open_clip.add_model_config(sys.argv[1]); " \
              "from open_clip_train.main import main; main(sys.argv[2:])"
PEER_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")  # samples seen so far in the epoch


def timed(cmd: list[str], env: dict, progress) -> tuple[list[tuple[float, int]], str]:
    """Run ``cmd``; ``progress(line_or_None)`` -> samples seen (or None) is asked for every output line and,
    every 20 ms, with None (to poll a file). Returns [(wall time, samples seen)] as they appeared, and the
    output."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    marks, lines, lock = [], [], threading.Lock()

    def note(n):
        if n is not None and (not marks or n > marks[-1][1]):
            marks.append((time.perf_counter(), n))

    def read():
        for line in proc.stdout:
            lines.append(line)
            with lock:
                note(progress(line))
    t = threading.Thread(target=read, daemon=True)
    t.start()
    while proc.poll() is None:
        with lock:
            note(progress(None))
        time.sleep(0.02)
    t.join(timeout=10)
    with lock:
        note(progress(None))
    return marks, "".join(lines)


def rate(marks: list[tuple[float, int]], warmup_samples: int, what: str) -> float:
    after = [(t, n) for t, n in marks if n >= warmup_samples]
    if len(after) < 2:
        raise SystemExit(f"{what}: fewer than two progress marks after the warm-up ({marks})")
    (t0, n0), (t1, n1) = after[0], after[-1]
    return (n1 - n0) / (t1 - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-vit-text")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    p.add_argument("--warmup", type=int, default=20, help="steps before the timed span (compilation included)")
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "medvlm_bench_clip"))
    a = p.parse_args(argv)
    work = Path(a.work)
    from vlm.registry import get_model_config

    arch = get_model_config(a.model)
    size = arch["vision_cfg"]["image_size"]
    data = work / f"synth{size}"
    if not (data / "pretrain" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data_prep.synth", "--out", str(data), "--num-train", str(a.num_train),
                        "--num-test", "8", "--image-size", str(size), "--shard-size", "500", "--overwrite", "--quiet"],
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    from vlm.data.schema import read_manifest

    m = read_manifest(data / "pretrain")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    samples = a.steps * a.batch_size
    log_every = max(1, min(a.warmup, a.steps // 10))

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    cuda_env = {} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}  # ours picks the GPU when it sees one
    warmup_samples = a.warmup * a.batch_size

    # ours
    out = work / "ours"
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()

    def ours_progress(line):
        if line is not None or not metrics.exists():
            return None
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        return rows[-1]["step"] * a.batch_size if rows else None
    marks, text = timed([sys.executable, "-m", "train.clip", "--config", str(REPO / "configs/clip/demo.yaml"),
                         f"model.name={a.model}", f"data.sources.0.path={data / 'pretrain'}", "data.resampled=true",
                         f"data.samples_per_epoch={samples}", f"data.batch_size={a.batch_size}",
                         f"data.num_workers={a.workers}", f"data.image.size={size}", "loss.concept_weight=0",
                         f"train.output_dir={out}", f"train.steps={a.steps}", "train.save_every=0",
                         "train.consolidate=false", f"train.log_every={log_every}", "train.tensorboard=false",
                         "train.progress=false", "train.eval_every=0", f"train.precision={a.precision}",
                         f"train.compile={str(a.compile).lower()}", "zeroshot=[]", "optim.warmup_steps=10"],
                        {**env, **cuda_env}, ours_progress)
    ours = rate(marks, warmup_samples, f"ours:\n{text[-3000:]}")
    print(f"ours (train.clip, {device}{', compiled' if a.compile else ''}): {ours:.0f} samples/s", file=sys.stderr)

    # peer
    cfg_dir = work / "peer_cfg"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{a.model}.json").write_text(json.dumps(arch))
    logs = work / "peer_logs"

    def peer_progress(line):
        m = PEER_STEP.search(line) if line else None
        return int(m.group(1)) if m else None
    marks, text = timed([peer_python(), "-c", PEER_LAUNCH, str(cfg_dir), "--model", a.model,
                         "--train-data", "::".join(m.paths), "--train-num-samples", str(samples),
                         "--dataset-type", "webdataset", "--dataset-resampled", "--batch-size", str(a.batch_size),
                         "--workers", str(a.workers), "--epochs", "1", "--precision",
                         "amp_bf16" if a.precision == "bf16" else "fp32", "--lr", "1e-3", "--warmup", "10",
                         "--logs", str(logs), "--name", f"bench{os.getpid()}", "--log-every-n-steps", str(log_every),
                         "--report-to", "", "--save-frequency", "0", "--seed", "0", "--device", device,
                         *(["--torchcompile"] if a.compile else [])], env, peer_progress)
    peer = rate(marks, warmup_samples, f"the peer:\n{text[-3000:]}")
    print(f"peer (open_clip_train.main, {device}{', --torchcompile' if a.compile else ''}): {peer:.0f} samples/s",
          file=sys.stderr)
    print(result_line("clip_train", ours, peer, unit="samples/s (wall clock, from outside)", model=a.model,
                      batch_size=a.batch_size, precision=a.precision, workers=a.workers, steps=a.steps,
                      warmup=a.warmup, device=device, compile=a.compile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
