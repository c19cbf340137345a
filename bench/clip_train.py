"""CLIP training throughput: `train.clip` vs `python -m open_clip_train.main`, same architecture,
shards, batch size, precision, workers and loss (CLIP InfoNCE, no concept term).

    python bench/clip_train.py [--model tiny-vit-text] [--steps 200] [--batch-size 64] [--precision fp32]

Both stream the synthetic corpus's shards in resampled mode and log throughput; we report the
median samples/s after the first logging interval. The peer runs in its own environment (see
bench/common.py) with the architecture registered through open_clip.add_model_config. Last line:
{"bench": "clip_train", "ours": ..., "peer": ..., "ratio": ...}
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, peer_python, result_line  # noqa: E402

PEER_LAUNCH = "import open_clip, sys; open_clip.add_model_config(sys.argv[1]); " \
              "from open_clip_train.main import main; main(sys.argv[2:])"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-vit-text")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
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
    log_every = max(1, a.steps // 10)

    # ours
    out = work / "ours"
    subprocess.run([sys.executable, "-m", "train.clip", "--config", str(REPO / "configs/clip/demo.yaml"),
                    f"model.name={a.model}", f"data.sources.0.path={data / 'pretrain'}", "data.resampled=true",
                    f"data.samples_per_epoch={samples}", f"data.batch_size={a.batch_size}",
                    f"data.num_workers={a.workers}", f"data.image.size={size}", "loss.concept_weight=0",
                    f"train.output_dir={out}", f"train.steps={a.steps}", "train.save_every=0",
                    f"train.log_every={log_every}", "train.tensorboard=false", "train.progress=false",
                    "train.eval_every=0", f"train.precision={a.precision}", "zeroshot=[]", "optim.warmup_steps=10"],
                   check=True, env=env, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ours = statistics.median(r["samples_per_s"] for r in rows[1:] if "samples_per_s" in r)
    print(f"ours (train.clip): {ours:.0f} samples/s", file=sys.stderr)

    # peer
    cfg_dir = work / "peer_cfg"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{a.model}.json").write_text(json.dumps(arch))
    logs = work / "peer_logs"
    r = subprocess.run([peer_python(), "-c", PEER_LAUNCH, str(cfg_dir), "--model", a.model,
                        "--train-data", "::".join(m.paths), "--train-num-samples", str(samples),
                        "--dataset-type", "webdataset", "--dataset-resampled", "--batch-size", str(a.batch_size),
                        "--workers", str(a.workers), "--epochs", "1", "--precision",
                        "amp_bf16" if a.precision == "bf16" else "fp32", "--lr", "1e-3", "--warmup", "10",
                        "--logs", str(logs), "--name", f"bench{os.getpid()}", "--log-every-n-steps", str(log_every),
                        "--report-to", "", "--save-frequency", "0", "--seed", "0", "--device", "cpu"],
                       env=env, capture_output=True, text=True)
    text = r.stdout + r.stderr
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", text)]
    if r.returncode != 0 or len(rates) < 2:
        print(text[-3000:], file=sys.stderr)
        raise SystemExit("the peer run failed (output above)")
    peer = statistics.median(rates[1:])
    print(f"peer (open_clip_train.main): {peer:.0f} samples/s", file=sys.stderr)
    print(result_line("clip_train", ours, peer, unit="samples/s", model=a.model, batch_size=a.batch_size,
                      precision=a.precision, workers=a.workers, steps=a.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
