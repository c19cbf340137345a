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
    from vlm.data import position

    path = str(plain / "shard-000000.tar")
    every = [k for k, *_ in position.raw_samples(path, Counter())]
    copied, real = [], position.iter_entries

    def spy(p, want=None, start=0):
        for off, name, data in real(p, want, start):
            if data is not None:
                copied.append(name.split(".")[0])
            yield off, name, data

    monkeypatch.setattr(position, "iter_entries", spy)
    part = [k for k, *_ in position.raw_samples(path, Counter(), 2, 5)]
    assert part == every[2:5] and set(copied) == set(part)
    assert [k for k, *_ in position.raw_samples(path, Counter(), 7)] == every[7:]


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


# -- positions: resume without replaying, and redeal onto another world size -------------------------


def take(loader, n: int) -> list[str]:
    """The keys of ``loader``'s next ``n`` batches; the iterator (and its workers) is closed after."""
    it, keys = iter(loader), []
    for _ in range(n):
        keys += next(it)["keys"]
    it.close()
    return keys


def legacy(state: dict) -> dict:
    """A position as versions before 2 wrote it: raw counts per worker, replayed on resume."""
    return {k: state[k] for k in ("epoch", "raw", "worker_batches", "next_worker", "batches", "counts",
                                  "num_workers", "seed")}


@pytest.fixture(scope="module")
def six_hundred(tmp_path_factory) -> Path:
    """6 shards of 100 samples."""
    return write_folder(tmp_path_factory.mktemp("six") / "s", [[good(100 * j + i) for i in range(100)]
                                                               for j in range(6)])


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_entries_resume_from_their_offsets(tmp_path, fmt):
    """A member's offset is that of its first header (long-name or PAX header included): walking from it
    gives exactly the rest of the archive."""
    from vlm.data.tario import TruncatedTar, iter_entries

    p = tmp_path / "x.tar"
    with tarfile.open(p, "w", format=fmt) as tar:
        for i, name in enumerate(["a.txt", "deep/" * 30 + "b.png", "c.json", "d" * 120 + ".txt"]):
            info = tarfile.TarInfo(name)
            info.size = 700 * i
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    every = list(iter_entries(str(p)))
    assert len(every) == 4 and every[0][0] == 0
    for i, (off, _, _) in enumerate(every):
        assert list(iter_entries(str(p), start=off)) == every[i:]
    with pytest.raises(TruncatedTar, match="not a header boundary"):
        list(iter_entries(str(p), start=100))


def test_resume_reads_only_the_buffer(six_hundred, monkeypatch):
    """Resuming late in an epoch reads the buffer's samples and the next batch's, not the epoch so far
    (counted in tar members read, headers included); the old format's replay reads all of it."""
    from vlm.data import position

    cfg = cfg_for(six_hundred, batch_size=4, shuffle_buffer=20, seed=4)
    first = ShardLoader(cfg)
    head = take(first, 130)  # 520 samples in
    state = json.loads(json.dumps(first.state_dict()))
    assert len(json.dumps(state)) < 6000  # references and RNG states, no sample bytes
    real, read = position.iter_entries, Counter()

    def counting(p, want=None, start=0):
        for entry in real(p, want, start):
            read["members"] += 1
            yield entry

    monkeypatch.setattr(position, "iter_entries", counting)
    for saved, bound in ((state, 4 * (20 + 4)), (legacy(state), None)):
        read.clear()
        resumed = ShardLoader(cfg)
        resumed.load_state_dict(saved)
        nxt = take(resumed, 1)
        if bound is not None:
            assert read["members"] <= bound  # 3 members a sample, plus the next sample's first header
        else:
            assert read["members"] >= 3 * 520  # replay: everything before the position again
        assert head + nxt + keys_of(resumed) == keys_of(ShardLoader(cfg))


@pytest.mark.parametrize("workers", [0, 2])
def test_old_format_positions_still_resume_exactly(plain, workers):
    cfg = cfg_for(plain, batch_size=4, num_workers=workers, shuffle_buffer=16, seed=1)
    full = keys_of(ShardLoader(cfg))
    first = ShardLoader(cfg)
    head = take(first, 5)
    resumed = ShardLoader(cfg)
    resumed.load_state_dict(legacy(first.state_dict()))
    it = iter(resumed)
    head += next(it)["keys"]
    later = resumed.state_dict()  # written in the new format once every worker has reported
    assert head + [k for b in it for k in b["keys"]] == full
    again = ShardLoader(cfg)
    again.load_state_dict(json.loads(json.dumps(later)))
    assert head + keys_of(again) == full


def test_positions_that_do_not_fit_are_refused_clearly(plain, tmp_path):
    from vlm.data.position import PositionError

    cfg = cfg_for(plain, batch_size=4, shuffle_buffer=16, seed=1)
    first = ShardLoader(cfg)
    take(first, 2)
    state = first.state_dict()
    for change, match in ((dict(seed=2), "data.seed=1, this run has 2"),
                          (dict(shuffle_buffer=8), "shuffle_buffer=16, this run has 8.*load_state_dicts"),
                          (dict(resampled=True), "data.resampled=False")):
        with pytest.raises(PositionError, match=match):
            other = cfg_for(plain, batch_size=4, **{"shuffle_buffer": 16, "seed": 1, **change})
            ShardLoader(other).load_state_dict(state)
    with pytest.raises(PositionError, match="saved by rank 0 of 1, this loader is rank 1 of 2"):
        ShardLoader(cfg, rank=1, world_size=2).load_state_dict(state)
    copy = write_folder(tmp_path / "c", [[good(i) for i in range(83)]])  # other shards
    with pytest.raises(PositionError, match="saved for other shards"):
        ShardLoader(cfg_for(copy, batch_size=4, shuffle_buffer=16, seed=1)).load_state_dict(state)
    with pytest.raises(PositionError, match="old format.*2 ranks x 1 workers; this run: 3 x 1"):
        ShardLoader(cfg, rank=0, world_size=3).load_state_dicts([legacy(state), legacy(state)])


def ranks_read(cfg, world: int, batches: list[int], **kw) -> tuple[list[str], list[dict]]:
    """Simulated ranks (one loader each, as torchrun would run them) read a few batches and save."""
    seen, states = [], []
    for r in range(world):
        ld = ShardLoader(cfg, rank=r, world_size=world, **kw)
        seen += take(ld, batches[r])
        states.append(json.loads(json.dumps(ld.state_dict())))
    return seen, states


def ranks_resume(cfg, world: int, states: list[dict], **kw) -> tuple[list[str], list[ShardLoader]]:
    keys, loaders = [], []
    for r in range(world):
        ld = ShardLoader(cfg, rank=r, world_size=world, **kw)
        ld.load_state_dicts(states)
        keys += keys_of(ld)
        loaders.append(ld)
    return keys, loaders


@pytest.mark.parametrize("world,workers", [(1, 2), (3, 2), (2, 3), (3, 0)])
def test_redeal_onto_another_world_covers_the_epoch_once(plain, tmp_path, world, workers):
    """2 ranks x 2 workers read part of an epoch (one rank far into its buffer's drain, one barely
    begun); the rest continues on another world size or worker count: every sample of the epoch is
    handed on exactly once, before or after, every skip counted once; the next epoch is a fresh one."""
    other = write_folder(tmp_path / "o", [[good(1000 + i) for i in range(9)], [good(2000 + i) for i in range(30)]])
    everything = Counter(f"s{i:04d}" for i in list(range(83)) + list(range(1000, 1009)) + list(range(2000, 2030)))
    rejected = sum(1 for k in everything if int(k[1:]) % 7 == 0)

    def cfg(w):
        c = cfg_for(plain, other, batch_size=4, num_workers=w, shuffle_buffer=10, seed=1)
        c.sources[1].weight = 2.0
        return c

    seen, states = ranks_read(cfg(2), 2, [2, 11], sample_fn=reject_every_seventh)
    after, loaders = ranks_resume(cfg(workers), world, states, sample_fn=reject_every_seventh)
    both = Counter(seen + after)
    assert set(both.values()) == {1} and set(both) == {k for k in everything if int(k[1:]) % 7}
    assert sum(ld.skipped.get("rejected_for_test", 0) for ld in loaders) == rejected
    assert sum(sum(ld.raw) for ld in loaders) == len(everything)  # raw counts carried over too
    for ld in loaders:  # the next epoch: a fresh deal on the new world size
        ld.set_epoch(1)
    nxt = Counter(k for ld in loaders for k in keys_of(ld))
    assert set(nxt.values()) == {1} and len(nxt) == len(everything) - rejected


@pytest.mark.parametrize("world,workers", [(3, 0), (1, 2)])
def test_redeal_counts_every_problem_once(tmp_path, world, workers):
    """Damaged shards, cut with problems in the buffers and in the shard parts left: each counted once
    (re-reading a buffered sample counts nothing again: the escaping members inside one here)."""
    folder = corrupt_folder(tmp_path / "c")
    for seed in range(4):
        cfg = cfg_for(folder, batch_size=1, num_workers=0, shuffle_shards=False, shuffle_buffer=3, seed=seed,
                      image=ImageConfig(size=16, max_pixels=50_000))
        seen, states = ranks_read(cfg, 2, [1, 1])
        cfg.num_workers = workers
        after, loaders = ranks_resume(cfg, world, states)
        assert sorted(seen + after) == ["s0000", "s0001", "s0002", "s0003"]
        total = Counter()
        for ld in loaders:
            total.update(ld.skipped)
        assert dict(total) == CORRUPT_COUNTS, seed


def test_redeal_with_the_same_shape_is_exact_and_redealt_epochs_resume(one_shard):
    cfg = cfg_for(one_shard, batch_size=8, num_workers=2, shuffle_buffer=16, seed=3)
    seen, states = ranks_read(cfg, 2, [3, 5])
    for r in range(2):
        a, b = ShardLoader(cfg, rank=r, world_size=2), ShardLoader(cfg, rank=r, world_size=2)
        a.load_state_dict(states[r])
        b.load_state_dicts(states)
        assert a.state_dict() == b.state_dict() and keys_of(a) == keys_of(b)
    # a redealt epoch (3 ranks x 1 worker) is itself resumable exactly, and redealt again (to 2 x 2)
    cfg1 = cfg_for(one_shard, batch_size=8, num_workers=0, shuffle_buffer=16, seed=3)
    mid, mid_states = [], []
    for r in range(3):
        ld = ShardLoader(cfg1, rank=r, world_size=3)
        ld.load_state_dicts(states)
        mid += take(ld, 2)
        mid_states.append(json.loads(json.dumps(ld.state_dict())))
        whole = ShardLoader(cfg1, rank=r, world_size=3)
        whole.load_state_dicts(states)
        again = ShardLoader(cfg1, rank=r, world_size=3)
        again.load_state_dict(mid_states[-1])
        assert keys_of(whole)[16:] == keys_of(again)
    after, _ = ranks_resume(cfg, 2, mid_states)
    both = Counter(seen + mid + after)
    assert len(both) == 300 and set(both.values()) == {1}


def test_redeal_resampled_continues(one_shard):
    cfg = cfg_for(one_shard, batch_size=4, num_workers=2, resampled=True, samples_per_epoch=96, seed=5)
    seen, states = ranks_read(cfg, 2, [3, 5])  # 32 of the epoch's 96 samples
    after, loaders = ranks_resume(cfg, 3, states)
    assert len(after) == 3 * 2 * 3 * 4  # the 64 left, rounded up to whole batches per new worker
    assert set(after) <= {f"s{i:04d}" for i in range(300)} and len(set(after)) > 40
    assert ranks_resume(cfg, 3, states)[0] == after  # deterministic
    for ld in loaders:
        ld.set_epoch(1)
        assert len(keys_of(ld)) == 2 * 4 * 4  # ceil(96 / (6 workers x 4)) batches a worker


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
