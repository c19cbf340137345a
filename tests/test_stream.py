"""The streaming pipeline: exact counts, corrupt-data accounting, node/worker split, exact resume."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.schema import Manifest, ShardInfo, sha256_file
from vlm.data.shards import DataConfig, ShardLoader, SourceConfig
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


def test_corrupt_samples_skipped_and_counted(tmp_path):
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
    folder = write_folder(tmp_path / "c", [shard0, [good(2), good(3), good(4)]])
    # truncate the second shard inside the data of its last sample
    p = folder / "shard-000001.tar"
    with tarfile.open(p) as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("s0004")).offset_data + 10
    p.write_bytes(p.read_bytes()[:cut])
    loader = ShardLoader(cfg_for(folder, batch_size=4, image=ImageConfig(size=16, max_pixels=50_000)))
    keys = keys_of(loader)
    assert sorted(keys) == ["s0000", "s0001", "s0002", "s0003"]
    assert loader.skipped == {"bad_image": 1, "bad_json": 1, "missing_text": 1, "missing_image": 1,
                              "unsafe_member_name": 2, "image_too_large": 1, "truncated_tar": 1}


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
