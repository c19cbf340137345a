"""Data position resume cost: seeking to the saved position (version 2) vs replaying up to it (the old format).

    python bench/resume.py [--positions 1000,10000,100000] [--workers 2] [--buffer 1000] [--mode both]

The shards: a synthetic corpus (data_prep.synth, 32 px images, --num-train samples) written once;
in ``epoch`` mode the source is --copies hard-linked copies of its shards under one manifest (an epoch
of copies x num-train samples: the same bytes on disk, read as distinct shards), so that positions of
1e5 samples lie inside one epoch without drawing 1e5 images; ``resampled`` mode draws the real shards
with replacement (samples_per_epoch large enough). Reaching a position does not decode anything: a
position of the old format (``raw`` counts, exactly what an uninterrupted run has after k rounds of
the loader's round-robin) is loaded and replayed, which is the old resume cost; one round of batches
later every worker has reported its new-format position, which a fresh loader then resumes from:
the new cost. Each cost is ``load_state_dict`` + the first batch, worker start-up included (the
``fresh`` row is a start at the epoch's beginning, for that constant: it fills the shuffle buffer too),
the best of --repeats runs (the machine may be shared). The first batch after the new
resume is checked to equal the batch the replaying run yields next. Last line:
{"bench": "resume", "positions": [...], "new_s": [...], "replay_s": [...], ...}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlm.data.schema import Manifest, ShardInfo, read_manifest  # noqa: E402
from vlm.data.shards import DataConfig, ShardLoader, SourceConfig  # noqa: E402
from vlm.data.transforms import ImageConfig  # noqa: E402


def make_shards(work: Path, num_train: int, copies: int) -> tuple[Path, Path]:
    """The synthetic pretraining shards, and a folder of ``copies`` hard-linked copies of them."""
    from data_prep.synth import main as synth

    corpus = work / f"synth{num_train}"
    if not (corpus / "pretrain" / "manifest.json").exists():
        synth(["--out", str(corpus), "--num-train", str(num_train), "--num-test", "1", "--image-size", "32",
               "--shard-size", "500", "--quiet", "--overwrite"])
    real = read_manifest(corpus / "pretrain")
    many = work / f"copies{num_train}x{copies}"
    if not (many / "manifest.json").exists():
        many.mkdir(parents=True, exist_ok=True)
        infos = []
        for c in range(copies):
            for s in real.shards:
                name = f"c{c:04d}-{s.name}"
                if not (many / name).exists():
                    os.link(real.folder / s.name, many / name)
                infos.append(ShardInfo(name, s.num_samples, s.bytes, s.sha256))
        Manifest(many, sum(s.num_samples for s in infos), infos).write()
    return corpus / "pretrain", many


def old_format(position: int, cfg: DataConfig) -> dict:
    """The old-format position after ``k`` whole rounds of the round-robin (clean data: no skips)."""
    w = max(1, cfg.num_workers)
    k = position // (cfg.batch_size * w)
    return {"epoch": 0, "raw": [k * cfg.batch_size] * w, "worker_batches": [k] * w, "next_worker": 0,
            "batches": k * w, "counts": [{} for _ in range(w)], "num_workers": w, "seed": cfg.seed}


def first_batch(loader: ShardLoader, state) -> tuple[float, list[str], iter]:
    t0 = time.perf_counter()
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    keys = next(it)["keys"]
    return time.perf_counter() - t0, keys, it


def measure(cfg: DataConfig, positions: list[int], repeats: int) -> list[dict]:
    """Per position: the old replay's and the new resume's cost, each the best of ``repeats`` runs."""
    w = max(1, cfg.num_workers)

    def best(state) -> float:
        times = []
        for _ in range(repeats):
            t, _, it = first_batch(ShardLoader(cfg), state)
            it.close()
            times.append(t)
        return min(times)

    fresh = best(None)
    rows = [{"position": 0, "new_s": round(fresh, 3), "replay_s": round(fresh, 3), "note": "fresh start"}]
    print(f"  fresh start     : {fresh:6.3f} s", file=sys.stderr)
    for pos in positions:
        old = old_format(pos, cfg)
        replay, _, it = first_batch(replaying := ShardLoader(cfg), old)
        for _ in range(w - 1):  # one round: every worker reports its position
            next(it)
        state = json.loads(json.dumps(replaying.state_dict()))
        expected = next(it)["keys"]
        it.close()
        _, keys, it = first_batch(ShardLoader(cfg), state)
        it.close()
        if keys != expected:
            raise SystemExit(f"position {pos}: the batch after the resume differs from the uninterrupted one")
        new, replay = best(state), min(replay, best(old) if repeats > 1 else replay)
        at = sum(state["raw"])
        rows.append({"position": at, "new_s": round(new, 3), "replay_s": round(replay, 3),
                     "state_kb": round(len(json.dumps(state)) / 1024, 1)})
        print(f"  position {at:>7}: resume {new:6.3f} s   old replay {replay:6.3f} s   "
              f"position JSON {rows[-1]['state_kb']} kB", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "medvlm-bench-resume"))
    ap.add_argument("--positions", default="1000,10000,100000")
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--copies", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--buffer", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="each cost is the best of this many runs")
    ap.add_argument("--mode", choices=["epoch", "resampled", "both"], default="both")
    a = ap.parse_args(argv)
    positions = [int(p) for p in a.positions.split(",")]
    real, many = make_shards(Path(a.work), a.num_train, a.copies)
    out = {"bench": "resume", "workers": a.workers, "batch_size": a.batch_size, "shuffle_buffer": a.buffer}
    for mode in (["epoch", "resampled"] if a.mode == "both" else [a.mode]):
        resampled = mode == "resampled"
        folder = real if resampled else many
        size = read_manifest(folder).num_samples
        if not resampled and max(positions) + a.batch_size * max(1, a.workers) * 2 > size:
            raise SystemExit(f"an epoch of {size} samples cannot hold position {max(positions)}: raise --copies")
        cfg = DataConfig(sources=[SourceConfig(str(folder))], batch_size=a.batch_size, num_workers=a.workers,
                         shuffle_buffer=a.buffer, resampled=resampled,
                         samples_per_epoch=10 * max(positions) if resampled else None, image=ImageConfig(size=32))
        print(f"{mode}: {folder} ({size} samples{', drawn with replacement' if resampled else ''})",
              file=sys.stderr)
        out[mode] = measure(cfg, positions, a.repeats)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
