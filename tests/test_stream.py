"""The streaming pipeline: exact counts, corrupt-data accounting, node/worker split, exact resume."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.schema import Manifest, ShardInfo, sha256_file
from vlm.data.shards import DataConfig, DataStreamError, ShardLoader, SourceConfig
from vlm.data.transforms import ImageConfig, MedicalImageTransform, decode_image


def png(value=100, size=(16, 12), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(folder: Path, shards: list[list[tuple[str, dict[str, bytes]]]]) -> Path:
    """Hand-written shards (members exactly as given), with a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, samples in enumerate(shards):
        path = folder / f"shard-{i:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, members in samples:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}" if not key.startswith("RAW:") else key[4:])
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        infos.append(ShardInfo(path.name, len(samples), path.stat().st_size, sha256_file(path)))
    Manifest(folder, sum(s.num_samples for s in infos), infos).write()
    return folder


def good(i: int) -> tuple[str, dict[str, bytes]]:
    return f"s{i:04d}", {"png": png(i % 250), "txt": f"caption {i}".encode(),
                         "json": json.dumps({"source": "t", "modality": "ct", "split": "train"}).encode()}


def cfg_for(*folders, **kw) -> DataConfig:
    kw.setdefault("image", ImageConfig(size=16))
    kw.setdefault("num_workers", 0)
    return DataConfig(sources=[SourceConfig(str(f)) for f in folders], **kw)


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["keys"]]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """7 shards of uneven sizes, 83 samples."""
    root = tmp_path_factory.mktemp("plain")
    sizes, n, shards = [10, 15, 8, 14, 12, 11, 13], 0, []
    for s in sizes:
        shards.append([good(n + j) for j in range(s)])
        n += s
    return write_folder(root / "p", shards)


def test_exact_counts_write_read(synth_dir):
    from vlm.data.schema import read_manifest

    cfg = cfg_for(synth_dir / "pretrain", batch_size=16, shuffle_buffer=50)
    keys = keys_of(ShardLoader(cfg))
    assert len(keys) == len(set(keys)) == read_manifest(synth_dir / "pretrain").num_samples


def test_batches_and_transform_shapes(plain):
    batch = next(iter(ShardLoader(cfg_for(plain, batch_size=5))))
    assert batch["images"].shape == (5, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["texts"][0].startswith("caption") and batch["meta"][0]["modality"] == "ct"


def test_tokenize_hook(plain):
    tok = lambda texts: torch.tensor([[len(t)] for t in texts])
    batch = next(iter(ShardLoader(cfg_for(plain, batch_size=4), tokenize=tok)))
    assert batch["tokens"].tolist() == [[len(t)] for t in batch["texts"]]


def corrupt_folder(folder: Path) -> Path:
    """Every kind of damage: 4 good samples (s0000-s0003) among them."""
    truncated_png = png(7)[:40]
    big = png(1, size=(300, 300))
    shard0 = [good(0),
              ("bad_img", {"png": truncated_png, "txt": b"t"}),
              ("bad_json", {"png": png(), "txt": b"t", "json": b"{not json"}),
              ("no_text", {"png": png(), "json": b"{}"}),
              ("no_image", {"txt": b"only text"}),
              ("RAW:../escape.png", {"x": png()}),
              ("RAW:/abs/path.png", {"x": png()}),
              ("huge", {"png": big, "txt": b"t"}),
              good(1)]
    write_folder(folder, [shard0, [good(2), good(3), good(4)]])
    # truncate the second shard inside the data of its last sample
    p = folder / "shard-000001.tar"
    with tarfile.open(p) as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("s0004")).offset_data + 10
    p.write_bytes(p.read_bytes()[:cut])
    return folder


CORRUPT_COUNTS = {"bad_image": 1, "bad_json": 1, "missing_text": 1, "missing_image": 1,
                  "unsafe_member_name": 2, "image_too_large": 1, "truncated_tar": 1}


def test_corrupt_samples_skipped_and_counted(tmp_path):
    folder = corrupt_folder(tmp_path / "c")
    loader = ShardLoader(cfg_for(folder, batch_size=4, image=ImageConfig(size=16, max_pixels=50_000)))
    keys = keys_of(loader)
    assert sorted(keys) == ["s0000", "s0001", "s0002", "s0003"]
    assert loader.skipped == CORRUPT_COUNTS


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_two_workers_see_every_sample_once(plain, workers):
    seen = Counter()
    for rank in range(2):
        cfg = cfg_for(plain, batch_size=4, num_workers=workers, shuffle_buffer=10)
        seen.update(keys_of(ShardLoader(cfg, rank=rank, world_size=2)))
    assert len(seen) == 83 and set(seen.values()) == {1}


def test_epochs_reshuffle_deterministically(plain):
    cfg = cfg_for(plain, batch_size=8, shuffle_buffer=20, seed=3)
    a = ShardLoader(cfg)
    e0 = keys_of(a)
    a.set_epoch(1)
    e1 = keys_of(a)
    assert sorted(e0) == sorted(e1) and e0 != e1
    b = ShardLoader(cfg)
    assert keys_of(b) == e0  # same seed, same epoch: same order


@pytest.mark.parametrize("workers,cut", [(0, 3), (2, 1), (2, 4), (2, 7), (3, 5)])
def test_resume_gives_identical_continuation(plain, workers, cut):
    cfg = cfg_for(plain, batch_size=4, num_workers=workers, shuffle_buffer=16, seed=1)
    full = keys_of(ShardLoader(cfg))
    first = ShardLoader(cfg)
    it, head = iter(first), []
    for _ in range(cut):
        head += next(it)["keys"]
    state = json.loads(json.dumps(first.state_dict()))  # it must survive serialisation
    del it
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(state)
    assert head + keys_of(resumed) == full


def test_resume_with_mixing_and_resampling(plain, tmp_path):
    other = write_folder(tmp_path / "o", [[good(1000 + i) for i in range(9)], [good(2000 + i) for i in range(9)]])
    cfg = cfg_for(plain, other, batch_size=4, num_workers=2, resampled=True, samples_per_epoch=64, seed=5)
    cfg.sources[1].weight = 3.0
    full = keys_of(ShardLoader(cfg))
    assert len(full) == 64  # 2 workers x 8 batches x 4
    src = Counter("o" if int(k[1:]) >= 1000 else "p" for k in full)
    assert src["o"] > src["p"]  # weight 3:1
    first = ShardLoader(cfg)
    it, head = iter(first), []
    for _ in range(5):
        head += next(it)["keys"]
    state = first.state_dict()
    del it
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(state)
    assert head + keys_of(resumed) == full


def test_resume_refuses_other_worker_count(plain):
    a = ShardLoader(cfg_for(plain, num_workers=2))
    b = ShardLoader(cfg_for(plain, num_workers=0))
    with pytest.raises(ValueError, match="num_workers"):
        b.load_state_dict(a.state_dict())


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        ShardLoader(cfg_for(tmp_path))


def test_sixteen_bit_decode_keeps_depth():
    arr = np.array([[0, 256], [1000, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    t = decode_image(buf.getvalue())
    assert t.shape == (1, 2, 2)
    assert torch.allclose(t[0], torch.from_numpy(arr.astype(np.float32) / 65535))
    assert t[0, 0, 1] > 0  # 256/65535 is not lost to 8-bit rounding


def test_transform_pads_with_mean_to_zero_and_keeps_content():
    tf = MedicalImageTransform(ImageConfig(size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    img = torch.ones(1, 4, 8)  # wide grayscale image of ones
    out = tf(img)
    assert out.shape == (3, 8, 8)
    assert torch.all(out[:, :2] == 0) and torch.all(out[:, -2:] == 0)  # pad rows = mean -> 0
    assert torch.allclose(out[:, 2:6], torch.full((3, 4, 8), 2.0))  # (1 - 0.5) / 0.25


# -- small sets: every rank gets its fair share whatever the shard count ----------------------------


def rank_keys(cfg: DataConfig, world: int, **kw) -> list[list[str]]:
    """Each simulated rank's keys for one epoch (ranks built in one process, as torchrun would)."""
    return [keys_of(ShardLoader(cfg, rank=r, world_size=world, **kw)) for r in range(world)]


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    """A SLAKE-like set: one shard of 300 samples."""
    return write_folder(tmp_path_factory.mktemp("one") / "o", [[good(i) for i in range(300)]])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_one_shard_is_split_fairly_among_ranks(one_shard, world, workers):
    cfg = cfg_for(one_shard, batch_size=16, num_workers=workers, shuffle_buffer=32)
    shares = rank_keys(cfg, world)
    assert [len(s) for s in shares] == [300 // world] * world
    seen = Counter(k for s in shares for k in s)
    assert len(seen) == 300 and set(seen.values()) == {1}
    cfg.seed = 1  # another epoch's (or seed's) deal gives the ranks other samples, still all of them once
    other = rank_keys(cfg, world)
    assert set(other[0]) != set(shares[0]) and sorted(k for s in other for k in s) == sorted(seen)


def test_a_shard_part_copies_only_its_own_members(plain, monkeypatch):
    from vlm.data import shards

    path = str(plain / "shard-000000.tar")
    every = [k for k, _ in shards._raw_samples(path, Counter())]
    copied, real = [], shards.iter_members

    def spy(p, want=None):
        for name, data in real(p, want):
            if data is not None:
                copied.append(name.split(".")[0])
            yield name, data

    monkeypatch.setattr(shards, "iter_members", spy)
    part = [k for k, _ in shards._raw_samples(path, Counter(), 2, 5)]
    assert part == every[2:5] and set(copied) == set(part)
    assert [k for k, _ in shards._raw_samples(path, Counter(), 7)] == every[7:]


@pytest.mark.parametrize("sizes", [[20] * 5, [30, 7, 25, 19, 19]])
def test_five_shards_four_global_workers(tmp_path, sizes):
    n, shards = 0, []
    for size in sizes:
        shards.append([good(n + j) for j in range(size)])
        n += size
    folder = write_folder(tmp_path / "f", shards)
    cfg = cfg_for(folder, batch_size=8, num_workers=2, shuffle_buffer=10)
    loaders = [ShardLoader(cfg, rank=r, world_size=2) for r in range(2)]
    shares = [keys_of(ld) for ld in loaders]
    assert [len(s) for s in shares] == [50, 50]  # 25 per global worker, whatever the shard sizes
    assert sorted(k for s in shares for k in s) == sorted(f"s{i:04d}" for i in range(100))
    assert abs(loaders[0].batches - loaders[1].batches) <= 1


def reject_every_seventh(sample: dict):
    return "rejected_for_test" if int(sample["key"][1:]) % 7 == 0 else sample


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_in_a_shared_shard(one_shard, workers):
    """Rank 1 of 2 reads half a shard; skips and dropped partial batches end a worker's epoch with a
    batch-less tail: resuming at any batch boundary continues exactly, counts included."""
    cfg = cfg_for(one_shard, batch_size=12, num_workers=workers, shuffle_buffer=16, seed=2, drop_last=True)

    def make():
        return ShardLoader(cfg, rank=1, world_size=2, sample_fn=reject_every_seventh)

    whole = make()
    full = [b["keys"] for b in whole]
    kept = sum(len(k) for k in full)
    assert sum(whole.raw) == 150 and 0 < whole.skipped["rejected_for_test"] < 150 - kept  # and some dropped
    for cut in sorted({1, len(full) // 2, len(full)}):
        first = make()
        it = iter(first)
        head = [next(it)["keys"] for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        it.close()
        resumed = make()
        resumed.load_state_dict(state)
        assert head + [b["keys"] for b in resumed] == full
        assert resumed.state_dict() == whole.state_dict()  # same final position and skip counts


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_one_shard(one_shard, workers):
    cfg = cfg_for(one_shard, batch_size=8, num_workers=workers, resampled=True, samples_per_epoch=64)
    shares = rank_keys(cfg, 2)
    assert [len(s) for s in shares] == [32, 32]
    assert all(k in {f"s{i:04d}" for i in range(300)} for s in shares for k in s)


def test_epoch_without_resampling_is_one_pass_whatever_the_weights(plain, tmp_path, caplog):
    other = write_folder(tmp_path / "o", [[good(1000 + i) for i in range(9)], [good(2000 + i) for i in range(30)]])
    cfg = cfg_for(plain, other, batch_size=4, num_workers=2, shuffle_buffer=8)
    cfg.sources[1].weight = 5.0
    with caplog.at_level("WARNING", logger="vlm.data.shards"):
        shares = rank_keys(cfg, 2)
    assert caplog.text.count("only shape the interleaving") == 2  # once per loader built
    seen = Counter(k for s in shares for k in s)
    assert len(seen) == 83 + 39 and set(seen.values()) == {1}


@pytest.mark.parametrize("world,workers", [(2, 0), (3, 0), (2, 2)])
def test_shared_shards_count_each_problem_once(tmp_path, world, workers):
    """Damaged shards read by several workers: each problem is counted by one of them only. (The
    manifest overstates the first shard, whose escaping members are no samples: nothing is lost.)"""
    folder = corrupt_folder(tmp_path / "c")
    cfg = cfg_for(folder, batch_size=4, num_workers=workers, shuffle_shards=False,
                  image=ImageConfig(size=16, max_pixels=50_000))
    loaders = [ShardLoader(cfg, rank=r, world_size=world) for r in range(world)]
    keys = sorted(k for ld in loaders for k in keys_of(ld))
    assert keys == ["s0000", "s0001", "s0002", "s0003"]
    total = Counter()
    for ld in loaders:
        total.update(ld.skipped)
    assert dict(total) == CORRUPT_COUNTS


# -- streams that cannot make batches stop with a clear error --------------------------------------


def masking_fails(sample: dict):
    return "masking_failed"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_all_skipped_resampled_stream_stops(one_shard, workers):
    cfg = cfg_for(one_shard, batch_size=4, num_workers=workers, resampled=True, max_consecutive_skips=50)
    with pytest.raises(DataStreamError) as e:
        next(iter(ShardLoader(cfg, sample_fn=masking_fails)))
    msg = str(e.value)  # from a worker process, torch re-raises the type with the original message in it
    assert "51 samples in a row were skipped" in msg and "max_consecutive_skips=50" in msg
    assert f"{one_shard} (51)" in msg and "Main reason: masking_failed (51); other reasons: none" in msg
    assert "chat template" in msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_all_skipped_short_epoch_stops(tmp_path, workers):
    folder = write_folder(tmp_path / "s", [[good(i) for i in range(40)]])
    loader = ShardLoader(cfg_for(folder, batch_size=4, num_workers=workers), sample_fn=masking_fails)
    with pytest.raises(DataStreamError, match=r"rank 0 found no usable sample in epoch 0 \(40 read, all skipped\)"
                                              r".*masking_failed \(40\)"):
        keys_of(loader)
    assert loader.skipped == {"masking_failed": 40} and loader.batches == 0


def two_of_three_fail(sample: dict):
    return sample if int(sample["key"][1:]) % 3 == 0 else "masking_failed"


def test_skip_bound_counts_runs_not_totals(one_shard):
    cfg = cfg_for(one_shard, batch_size=4, shuffle_buffer=0, shuffle_shards=False, max_consecutive_skips=2)
    loader = ShardLoader(cfg, sample_fn=two_of_three_fail)
    assert len(keys_of(loader)) == 100 and loader.skipped == {"masking_failed": 200}
    cfg.max_consecutive_skips = 1
    with pytest.raises(DataStreamError, match="2 samples in a row"):
        keys_of(ShardLoader(cfg, sample_fn=two_of_three_fail))
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        cfg_for(one_shard, max_consecutive_skips=-1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled", [True, False])
def test_source_without_any_readable_sample(tmp_path, resampled):
    folder = write_folder(tmp_path / "u", [[("RAW:../a.png", {"x": png()})]])
    with pytest.raises(DataStreamError, match="unsafe_member_name") as e:
        keys_of(ShardLoader(cfg_for(folder, resampled=resampled)))
    assert ("none of the 1 shards" if resampled else "0 read, all skipped") in str(e.value)


# -- an interruption (the trainer's SIGTERM handler) reaches a loader still looking for a sample ------


class Interrupted(BaseException):
    """What a signal handler raises to interrupt the wait (a BaseException, like KeyboardInterrupt)."""


class Preempted(Exception):
    """The same, derived from Exception."""


class AcceptFirst:
    """Keep the first ``n`` samples (in each process), then reject every one, slowly, forever."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, sample: dict):
        self.n -= 1
        if self.n >= 0:
            return sample
        time.sleep(0.005)
        return "rejected"


def new_children(before: set) -> list:
    return [p for p in multiprocessing.active_children() if p.pid not in before]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers,exc", [(0, Interrupted), (2, Interrupted), (2, Preempted)])
def test_interrupt_while_looking_for_a_sample(one_shard, workers, exc):
    cfg = cfg_for(one_shard, batch_size=4, num_workers=workers, resampled=True, max_consecutive_skips=0)
    loader = ShardLoader(cfg, sample_fn=AcceptFirst(4))
    before = {p.pid for p in multiprocessing.active_children()}
    sent = {}

    def handler(*_):
        raise exc()

    def interrupt():
        sent["t"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGUSR1)

    prev = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(1.5, interrupt)
    try:
        positions = []
        with pytest.raises(exc):
            for _ in loader:  # each worker yields one batch, then looks for a sample forever
                positions.append(loader.state_dict())
                if len(positions) == 1:
                    timer.start()
        took = time.monotonic() - sent["t"]
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, prev)
    assert 1 <= len(positions) <= max(1, workers)
    assert took < 4.0, f"the interruption took {took:.1f} s to come through"  # torch alone: 5 s a worker
    assert loader.state_dict() == positions[-1]  # the position of the last batch yielded
    assert not new_children(before)  # the workers are gone already, not left to the garbage collector


@pytest.mark.timeout(60)
def test_dropping_the_iterator_stops_busy_workers_at_once(one_shard):
    cfg = cfg_for(one_shard, batch_size=4, num_workers=2, resampled=True, max_consecutive_skips=0)
    loader = ShardLoader(cfg, sample_fn=AcceptFirst(4))
    before = {p.pid for p in multiprocessing.active_children()}
    it = iter(loader)
    next(it), next(it)
    time.sleep(0.3)  # both workers are now rejecting samples, never back in torch's loop
    t0 = time.monotonic()
    it.close()
    assert time.monotonic() - t0 < 4.0 and not new_children(before)  # torch alone: 5 s a worker
    assert loader.batches == 2
