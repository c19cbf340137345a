"""Skip counts in training logs are the run's, not the epoch's: bad samples met in every epoch add up across
epoch boundaries and across a resume (the loader counts per epoch; the trainer carries the earlier epochs)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def with_bad_images(src: Path, dst: Path, bad: int) -> None:
    """A copy of a shard folder whose first shard has ``bad`` images replaced by bytes of the same length that
    decode as nothing (the tar stays valid: headers are untouched)."""
    shutil.copytree(src, dst)
    shard = dst / "shard-000000.tar"
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    done = 0
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            if m.name.endswith(".jpg") and done < bad:
                data, done = b"\x00" * len(data), done + 1
            t.addfile(m, io.BytesIO(data))


def run_args(data, tiny32, out, steps, extra=()):
    return ["--config", str(REPO / "configs/clip/demo.yaml"), f"model.name={tiny32}", f"data.sources.0.path={data}",
            "data.batch_size=16", "data.num_workers=2", "data.shuffle_buffer=20", "data.image.size=32",
            f"train.output_dir={out}", f"train.steps={steps}", "train.save_every=10", "train.log_every=1",
            "train.tensorboard=false", "train.progress=false", "train.eval_every=0", "zeroshot=[]",
            "optim.warmup_steps=1", *extra]


def skip_counts(out: Path) -> list[int]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["skipped_samples"], x.get("skipped/bad_image", 0)) for x in lines if "loss" in x]


def test_skips_add_up_across_epochs_and_a_resume(synth_dir, tiny32, tmp_path, drill):
    """3 undecodable images in 237 good samples at batch 16: the first epoch ends near step 14, so 20 steps
    cross a boundary; a run stopped at step 10 and resumed logs exactly what the uninterrupted run logs."""
    from train.clip import main

    data = tmp_path / "data"
    with_bad_images(synth_dir / "pretrain", data, 3)
    with drill.input("3 undecodable images met in two epochs and across a resume"):
        assert main(run_args(data, tiny32, tmp_path / "a", 20)) == 0
        assert main(run_args(data, tiny32, tmp_path / "b", 10)) == 0
        assert main(run_args(data, tiny32, tmp_path / "b", 20, ["train.resume=latest"])) == 0
        a, b = skip_counts(tmp_path / "a"), skip_counts(tmp_path / "b")
        assert [x[0] for x in a] == list(range(1, 21)) and a == b
        totals = [x[1] for x in a]
        assert totals == sorted(totals) and totals[-1] >= 3  # the first epoch's 3 are never forgotten
        assert all(total == bad for _, total, bad in a)  # nothing else was skipped
