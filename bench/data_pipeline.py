"""Data pipeline throughput: ours (vlm.data.shards) vs open_clip_train's WebDataset pipeline.

    python bench/data_pipeline.py [--image-size 224] [--source-size 256] [--workers 2] [--samples 4000]

Both pipelines read the same shards (synthetic corpus JPEGs at --source-size px), decode, apply
their training transform to --image-size, tokenize the caption with the same open_clip tokenizer,
and batch; we count samples/s after a warm-up. The peer is `open_clip_train.data.get_wds_dataset`
with its training preprocess (RandomResizedCrop + normalise), run in its own environment (see
bench/common.py). A second line gives the peer the same work per image as ours (our resize to fit,
bilinear on uint8, pad and normalise, as a PIL transform in its pipeline) instead of its own
RandomResizedCrop + bicubic: pipeline against pipeline, not transform against transform. Then our
pipeline's peak memory (PSS of main + workers) while streaming 10, 100 and 300 shards: the run fails
unless the 300-shard peak is within 10% of the 100-shard one. Last line:
{"bench": "data_pipeline", "ours": ..., "peer": ..., "ratio": ours/peer, "equal_work": {...}, ...}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, peer_python, result_line, run_json  # noqa: E402


def make_shards(out: Path, n: int, size: int, shard_size: int) -> Path:
    from data_prep.synth import main as synth

    if not (out / "pretrain" / "manifest.json").exists():
        synth(["--out", str(out), "--num-train", str(n), "--num-test", "1", "--image-size", str(size),
               "--shard-size", str(shard_size), "--quiet", "--overwrite"])
    return out / "pretrain"


def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")  # open_clip's BPE tokenizer (ships with the package)


def measure(loader, warmup: int, max_samples: int) -> float:
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == warmup:
            t0, n = time.perf_counter(), 0
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["keys"])
        if t0 is not None and n >= max_samples:
            break
    if t0 is None:
        raise RuntimeError("not enough batches for the warm-up; use more --samples")
    return n / (time.perf_counter() - t0)


def run_ours(a) -> dict:
    from vlm.data.shards import DataConfig, ShardLoader, SourceConfig
    from vlm.data.transforms import ImageConfig

    cfg = DataConfig(sources=[SourceConfig(a.shards)], batch_size=a.batch_size, num_workers=a.workers,
                     shuffle_buffer=1000, image=ImageConfig(size=a.image_size), drop_last=True)
    rates = []
    for epoch in range(a.repeats):
        loader = ShardLoader(cfg, tokenize=tokenizer())
        loader.set_epoch(epoch)
        rates.append(measure(loader, a.warmup, a.samples))
    return {"samples_per_s": max(rates), "all": rates}


class OursOnPil:
    """Our training transform's work (vlm.data.transforms.MedicalImageTransform.from_bytes: resize to fit,
    bilinear on uint8, normalise with one multiply-add into a zero-padded square) on the PIL image the peer's
    pipeline decodes: the equal-work comparison."""

    def __init__(self, size: int):
        from vlm.data.transforms import ImageConfig, MedicalImageTransform

        self.t = MedicalImageTransform(ImageConfig(size=size))

    def __call__(self, img):
        import numpy as np
        import torch
        from PIL import Image

        t, s = self.t, self.t.size
        img = img.convert("RGB") if img.mode != "RGB" else img
        nh, nw = t._target(img.height, img.width)
        if (img.height, img.width) != (nh, nw):
            img = img.resize((nw, nh), Image.BILINEAR)
        arr = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        out = torch.zeros(3, s, s)
        top, left = (s - nh) // 2, (s - nw) // 2
        torch.addcmul(t._shift, arr, t._scale, out=out[:, top:top + nh, left:left + nw])
        return out


def run_peer(a) -> dict:
    from types import SimpleNamespace

    import open_clip
    from open_clip_train.data import get_wds_dataset

    from vlm.data.schema import read_manifest

    m = read_manifest(a.shards)
    urls = "::".join(m.paths)
    args = SimpleNamespace(train_data=urls, val_data=None, train_num_samples=m.num_samples, dataset_resampled=False,
                           train_data_upsampling_factors=None, seed=0, batch_size=a.batch_size, workers=a.workers,
                           world_size=1)
    preprocess = open_clip.image_transform(a.image_size, is_train=True) if a.peer_transform == "open_clip" \
        else OursOnPil(a.image_size)
    rates = []
    for epoch in range(a.repeats):
        data = get_wds_dataset(args, preprocess, is_train=True, epoch=epoch, tokenizer=tokenizer())
        data.set_epoch(epoch)
        rates.append(measure(data.dataloader, a.warmup, a.samples))
    return {"samples_per_s": max(rates), "all": rates}


def peak_rss(a, n_shards: int) -> dict:
    """Stream n_shards (of a.rss_shard_size samples) through our pipeline; peak memory of main + workers.

    PSS (proportional set size) is summed, so pages the workers share with the main process
    (torch's libraries, mostly) are counted once rather than once per process.
    """
    import psutil

    from vlm.data.shards import DataConfig, ShardLoader, SourceConfig
    from vlm.data.transforms import ImageConfig

    folder = make_shards(Path(a.work) / f"rss{n_shards}", n_shards * a.rss_shard_size, a.source_size,
                         a.rss_shard_size) if n_shards else None
    cfg = DataConfig(sources=[SourceConfig(str(folder))], batch_size=a.batch_size, num_workers=a.workers,
                     shuffle_buffer=1000, image=ImageConfig(size=a.image_size))
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                rss = proc.memory_full_info().pss + sum(c.memory_full_info().pss
                                                        for c in proc.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    n = sum(len(b["keys"]) for b in ShardLoader(cfg, tokenize=tokenizer()))
    done.set()
    t.join()
    return {"shards": n_shards, "samples": n, "peak_rss_mb": round(peak[0] / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--source-size", type=int, default=256, help="pixel size of the JPEGs in the shards")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=3000, help="samples timed per run (after the warm-up)")
    p.add_argument("--num-train", type=int, default=4000, help="samples in the benchmark shards")
    p.add_argument("--warmup", type=int, default=4, help="batches before timing starts")
    p.add_argument("--repeats", type=int, default=2, help="runs per pipeline; the best is reported")
    p.add_argument("--rss-shard-size", type=int, default=100)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "medvlm_bench_data"))
    p.add_argument("--role", choices=["main", "ours", "peer", "rss"], default="main", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--rss-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peer-transform", choices=["open_clip", "ours"], default="open_clip", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role == "ours":
        print(json.dumps(run_ours(a)))
        return 0
    if a.role == "peer":
        print(json.dumps(run_peer(a)))
        return 0
    if a.role == "rss":
        print(json.dumps(peak_rss(a, a.rss_n)))
        return 0
    shards = make_shards(Path(a.work) / f"bench{a.source_size}_{a.num_train}", a.num_train, a.source_size, 250)
    common = [__file__, "--shards", str(shards), "--image-size", str(a.image_size), "--workers", str(a.workers),
              "--batch-size", str(a.batch_size), "--samples", str(a.samples), "--warmup", str(a.warmup),
              "--repeats", str(a.repeats), "--source-size", str(a.source_size), "--work", a.work,
              "--rss-shard-size", str(a.rss_shard_size)]
    env = {"PYTHONPATH": str(REPO)}
    ours = run_json([sys.executable, *common, "--role", "ours"], env)
    print(f"ours: {ours['samples_per_s']:.0f} samples/s {['%.0f' % r for r in ours['all']]}", file=sys.stderr)
    peer = run_json([peer_python(), *common, "--role", "peer"], env)
    print(f"peer (open_clip_train): {peer['samples_per_s']:.0f} samples/s {['%.0f' % r for r in peer['all']]}",
          file=sys.stderr)
    equal = run_json([peer_python(), *common, "--role", "peer", "--peer-transform", "ours"], env)
    print(f"peer with our per-image work: {equal['samples_per_s']:.0f} samples/s "
          f"{['%.0f' % r for r in equal['all']]}; ratio {ours['samples_per_s'] / equal['samples_per_s']:.3f}",
          file=sys.stderr)
    rss = [run_json([sys.executable, *common, "--role", "rss", "--rss-n", str(n)], env) for n in (10, 100, 300)]
    for r in rss:
        print(f"rss: {r['shards']} shards, {r['samples']} samples: peak {r['peak_rss_mb']} MB", file=sys.stderr)
    if rss[2]["peak_rss_mb"] > 1.1 * rss[1]["peak_rss_mb"]:
        raise SystemExit(f"memory grows with the shard count: {rss[2]['peak_rss_mb']} MB at 300 shards vs "
                         f"{rss[1]['peak_rss_mb']} MB at 100 (more than 10%)")
    print(result_line("data_pipeline", ours["samples_per_s"], peer["samples_per_s"], unit="samples/s",
                      image_size=a.image_size, source_size=a.source_size, workers=a.workers,
                      batch_size=a.batch_size, rss_mb={str(r["shards"]): r["peak_rss_mb"] for r in rss},
                      equal_work={"ours": round(ours["samples_per_s"], 2), "peer": round(equal["samples_per_s"], 2),
                                  "ratio": round(ours["samples_per_s"] / equal["samples_per_s"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
