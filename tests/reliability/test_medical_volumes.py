"""DICOM and NIfTI inputs that used to abort a run, decode a file once per frame, ignore the frame count in
--max-pixels or turn NaN into black slices (issue 12, items 7, 13, 14, 15). Every case asserts the exact
counts by reason and the exact first offender; keys are keyed hashes that carry no path text."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_prep.inspect import scan_shard
from data_prep.keys import hashed_key
from data_prep.shards import main as shards_main
from vlm.data.schema import read_manifest

PYDICOM_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
PATIENT = "DOE^JOHN_MRN00123456"


def make_dicom(path: Path, frames: int = 1, rows: int = 16, cols: int = 16, *, seed: int = 0,
               number_of_frames=None, slope=None) -> np.ndarray:
    """A native (explicit VR little endian) 16-bit MONOCHROME2 file with a patient name and id; returns its
    stored values (frames, rows, cols)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "DOE^JOHN", "MRN00123456", "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = number_of_frames if number_of_frames is not None else frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, "0"
    values = np.random.default_rng(seed).integers(0, 4096, (frames, rows, cols), dtype=np.uint16)
    ds.PixelData = values.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return values


def run(capsys, *args, workers: int = 0) -> tuple[int, str]:
    rc = shards_main([*map(str, args), "--workers", str(workers), "--quiet"])
    return rc, capsys.readouterr().err


def summary(out: Path) -> dict:
    return read_manifest(out).extra["summary"]


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    m = read_manifest(out)
    got = {k: parts for s in m.shards for k, parts in scan_shard(out / s.name)}
    assert len(got) == m.num_samples
    return got


def key_of(out: Path, source: str, rel: str) -> str:
    return hashed_key(source, rel, SimpleNamespace(out=str(out), key_secret=None))


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# --- item 7: badVR.dcm (NumberOfFrames '1A') is one counted skip, the run completes ---------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_bad_vr_file_is_one_skip(tmp_path, capsys, drill, workers):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "badVR.dcm", "rtdose.dcm"):
        shutil.copy(PYDICOM_FILES / name, src / name)
    out = tmp_path / "out"
    with drill.input(f"dicom: badVR.dcm (NumberOfFrames '1A') among good files, {workers} workers"):
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out, workers=workers)
        assert rc == 0, err
        s = summary(out)
        assert (s["read"], s["written"], s["skipped"]) == (18, 17, {"bad_dicom": 1})  # 1 CT + 1 MR + 15 dose frames
        # files sort as CT_small, MR_small, badVR, rtdose: badVR is the third
        assert s["offenders"] == {"bad_dicom": [f"file #3 of 4 (key {key_of(out, 'dicom', 'badVR.dcm')}) "
                                                "(NumberOfFrames is not a whole number)"]}
        assert sorted(p.name for p in out.iterdir()) == [".key_secret", "manifest.json", "shard-000000.tar"]


# --- item 14: a multi-frame file is read and decoded once, frames land under their own keys -------------------

def test_multiframe_file_decoded_once(tmp_path, capsys, drill, monkeypatch):
    import pydicom

    src = tmp_path / "in"
    values = {n: make_dicom(src / f"cine{n}.dcm", frames=n, seed=n) for n in (25, 50, 100)}
    reads: dict[str, int] = {}
    real = pydicom.dcmread

    def counting(path, *a, **kw):  # the real reader, counted: full reads (pixels included) per file
        if not kw.get("stop_before_pixels"):
            reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
        return real(path, *a, **kw)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    out = tmp_path / "out"
    with drill.input("dicom: 25-, 50- and 100-frame files: each decoded once, every frame a sample"):
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out, "--shard-size", "64")
        assert rc == 0, err
        assert reads == {"cine25.dcm": 1, "cine50.dcm": 1, "cine100.dcm": 1}
        s = summary(out)
        assert (s["read"], s["written"], s["skipped"]) == (175, 175, {})
        got = samples(out)
        for n, k in ((100, 0), (100, 99), (50, 17), (25, 24)):
            parts = got[f"{key_of(out, 'dicom', f'cine{n}.dcm')}-f{k:04d}"]
            assert json.loads(parts["json"])["frame"] == k
            v = values[n][k].astype(np.float64)  # no window in the file: min-max to the 16-bit range
            expected = ((v - v.min()) / (v.max() - v.min()) * 65535).round().astype(np.uint16)
            assert np.array_equal(png(parts["png"]), expected)


def test_multiframe_decode_is_linear(tmp_path, drill):
    """100 frames cost about what one decode costs, not 100 decodes (was 1.05 s for 256x256, now 0.04 s)."""
    from data_prep.sources.dicom import load_dicom_frame, load_dicom_frames

    path = tmp_path / "cine.dcm"
    make_dicom(path, frames=100, rows=128, cols=128)
    opts = {"window": None, "bit_depth": 16, "max_pixels": 64_000_000}
    with drill.input("dicom: 100 frames of 128x128 decoded in one pass"):
        load_dicom_frame(str(path), 0, opts)  # warm up (imports)
        t = time.perf_counter()
        one = load_dicom_frame(str(path), 0, opts)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        frames = load_dicom_frames(str(path), None, opts)
        t_all = time.perf_counter() - t
        assert len(frames) == 100 and np.array_equal(frames[0].array, one.array)
        assert t_all < 40 * max(t_one, 0.002), (t_all, t_one)  # 100 separate decodes cost >= 100 x t_one


# --- item 14: --max-pixels counts the frames decoded -----------------------------------------------------------

def test_max_pixels_counts_frames(tmp_path, capsys, drill):
    src = tmp_path / "in"
    make_dicom(src / "cine.dcm", frames=100)
    with drill.input("dicom: 100 frames of 16x16 (25,600 pixels) against --max-pixels 10000"):
        out = tmp_path / "all"
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out, "--max-pixels", "10000")
        assert rc == 1, err
        s = summary(out)
        assert (s["written"], s["skipped"]) == (0, {"image_too_large": 1})
        assert s["offenders"]["image_too_large"] == [
            f"file #1 of 1 (key {key_of(out, 'dicom', 'cine.dcm')}) (16x16x100 frames > --max-pixels 10000)"]
    with drill.input("dicom: one frame (--frame 3) of that file within --max-pixels 10000"):
        out = tmp_path / "one"
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out, "--max-pixels", "10000",
                      "--frame", "3")
        assert rc == 0, err
        assert list(samples(out)) == [f"{key_of(out, 'dicom', 'cine.dcm')}-f0003"]


def test_frames_beyond_the_data_and_past_the_last(tmp_path, capsys, drill):
    src = tmp_path / "in"
    make_dicom(src / "a_liar.dcm", frames=2, number_of_frames=1_000_000)
    make_dicom(src / "b_cine.dcm", frames=4)
    out = tmp_path / "out"
    with drill.input("dicom: NumberOfFrames 1000000 in a 2-frame file: one skip, no million samples"):
        t = time.perf_counter()
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out)
        assert rc == 0 and time.perf_counter() - t < 30, err
        s = summary(out)
        assert (s["written"], s["skipped"]) == (4, {"bad_dicom": 1})
        assert s["offenders"]["bad_dicom"] == [f"file #1 of 2 (key {key_of(out, 'dicom', 'a_liar.dcm')}) "
                                               "(NumberOfFrames 1000000 exceeds what the file holds)"]
    with drill.input("dicom: --frame 7 of a 4-frame file (no_such_frame), a 1-frame file kept"):
        shutil.copy(PYDICOM_FILES / "CT_small.dcm", src / "c_ct.dcm")
        out = tmp_path / "frame7"
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out, "--frame", "7")
        assert rc == 0, err
        s = summary(out)
        assert (s["written"], s["skipped"]) == (1, {"bad_dicom": 1, "no_such_frame": 1})
        assert s["offenders"]["no_such_frame"] == [
            f"file #2 of 3 (key {key_of(out, 'dicom', 'b_cine.dcm')}) (frame 7 of 4)"]


def _corrupt_rle(src: Path, dst: Path) -> None:
    """SC_rgb_rle_2frame.dcm with the first frame's RLE segment count set to 99 (at most 15 exist)."""
    import pydicom

    ds = pydicom.dcmread(src)
    data = bytearray(ds.PixelData)
    bot_len = struct.unpack_from("<I", data, 4)[0]
    first = 8 + bot_len + 8  # after the basic offset table item and the first fragment's item header
    struct.pack_into("<I", data, first, 99)
    ds.PixelData = bytes(data)
    ds.save_as(dst)


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_multiframe_is_one_skip(tmp_path, capsys, drill, workers):
    src = tmp_path / "in"
    src.mkdir()
    _corrupt_rle(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm", src / "a_rle.dcm")
    shutil.copy(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm", src / "b_rle.dcm")
    out = tmp_path / "out"
    with drill.input(f"dicom: a 2-frame RLE file whose pixels do not decode: one skip, {workers} workers"):
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out, workers=workers)
        assert rc == 0, err
        s = summary(out)
        assert (s["read"], s["written"], s["skipped"]) == (3, 2, {"bad_dicom": 1})
        assert s["offenders"]["bad_dicom"][0].startswith(f"file #1 of 2 (key {key_of(out, 'dicom', 'a_rle.dcm')}) (")


def test_infinite_rescale_slope_is_non_finite(tmp_path, capsys, drill):
    src = tmp_path / "in"
    make_dicom(src / "a_inf.dcm", frames=3, slope="1e400")
    make_dicom(src / "b_ok.dcm", frames=1)
    out = tmp_path / "out"
    with drill.input("dicom: RescaleSlope 1e400 (infinite modality values) in a 3-frame file"):
        rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out)
        assert rc == 0, err
        s = summary(out)
        assert (s["written"], s["skipped"]) == (1, {"non_finite": 3})
        assert s["offenders"]["non_finite"][0] == (f"file #1 of 2 (key {key_of(out, 'dicom', 'a_inf.dcm')}) frame 0 "
                                                   "(modality values that are not finite)")


# --- item 15: keyed keys --------------------------------------------------------------------------------------

def test_dicom_keys_are_keyed_hashes(tmp_path, capsys, drill):
    src = tmp_path / "in"
    rel = f"{PATIENT}/chest.dcm"
    make_dicom(src / rel)
    secret_a, secret_b = tmp_path / "a.secret", tmp_path / "b.secret"
    secret_a.write_bytes(b"a" * 32)
    secret_b.write_bytes(b"b" * 32)
    with drill.hole("dicom: keys of DOE^JOHN_MRN00123456/chest.dcm are keyed (no dictionary over MRN paths)"):
        keys = {}
        for name, secret in (("a1", secret_a), ("a2", secret_a), ("b", secret_b)):
            out = tmp_path / name
            rc, err = run(capsys, "--format", "dicom", "--input", src, "--out", out, "--key-secret", secret)
            assert rc == 0, err
            (keys[name],) = samples(out)
            assert not (out / ".key_secret").exists()  # the named secret is used, none is created
        unkeyed = "dicom-" + hashlib.blake2b(rel.encode(), digest_size=8).hexdigest()  # the old, reversible key
        assert keys["a1"] == keys["a2"] != keys["b"] and unkeyed not in keys.values()
        assert all(k.startswith("dicom-") and len(k) == len("dicom-") + 20 for k in keys.values())


# --- item 13: NIfTI volumes with non-finite voxels ------------------------------------------------------------

def _nifti(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))


@pytest.mark.parametrize("workers", [0, 2])
def test_all_nan_volume_is_skipped(tmp_path, capsys, drill, workers):
    src = tmp_path / "in"
    _nifti(src / PATIENT / "a_nan.nii.gz", np.full((4, 4, 4), np.nan))
    _nifti(src / PATIENT / "b_ok.nii.gz", np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    out = tmp_path / "out"
    with drill.input(f"nifti: an all-NaN 4x4x4 volume beside a finite one, {workers} workers"):
        rc, err = run(capsys, "--format", "nifti", "--input", src, "--out", out, workers=workers)
        assert rc == 0, err
        s = summary(out)
        assert (s["read"], s["written"], s["skipped"]) == (8, 4, {"non_finite": 4})
        vid = key_of(out, "nifti", f"{PATIENT}/a_nan.nii.gz")
        assert s["offenders"]["non_finite"][0] == f"volume #1 of 2 (key {vid}) slice 0 (no finite voxel in the volume)"
        blobs = b"".join(p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".key_secret")
        assert b"DOE" not in blobs and b"MRN" not in blobs and b"a_nan" not in blobs and "DOE" not in err


def test_partly_non_finite_slices(tmp_path, capsys, drill):
    data = np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    data[:, :, 1] = np.nan  # slice 1: nothing finite
    data[0, 0, 2], data[1, 0, 2] = np.nan, np.inf  # slice 2: two non-finite voxels
    src = tmp_path / "vol.nii"
    _nifti(src, data)
    out = tmp_path / "out"
    with drill.input("nifti: an all-NaN slice (skipped) and a slice with a NaN and an inf (kept, counted)"):
        rc, err = run(capsys, "--format", "nifti", "--input", src, "--out", out, "--window", "20,40")
        assert rc == 0, err
        s = summary(out)
        assert (s["written"], s["skipped"]) == (2, {"non_finite": 1})
        vid = key_of(out, "nifti", "vol.nii")
        assert s["offenders"]["non_finite"] == [f"volume #1 of 1 (key {vid}) slice 1 (no finite voxel in the slice)"]
        got = samples(out)
        meta0, meta2 = (json.loads(got[f"{vid}-a{k:04d}"]["json"]) for k in (0, 2))
        assert "non_finite_voxels" not in meta0 and meta2["non_finite_voxels"] == 2 and meta2["volume"] == vid
        img = np.rot90(png(got[f"{vid}-a0002"]["png"]), -1)  # back to voxel order
        assert img[0, 0] == 0 and img[1, 0] == 65535  # NaN: the window's low end; +inf: its high end


def test_unreadable_nifti_names_no_path(tmp_path, capsys, drill):
    src = tmp_path / "in"
    (src / PATIENT).mkdir(parents=True)
    (src / PATIENT / f"{PATIENT}.nii.gz").write_bytes(b"DOE^JOHN not a gzip file")
    _nifti(src / "ok.nii", np.ones((2, 2, 2)))
    out = tmp_path / "out"
    with drill.input("nifti: a .nii.gz that is not gzip, named after the patient: one bad_nifti, no path text"):
        rc, err = run(capsys, "--format", "nifti", "--input", src, "--out", out)
        assert rc == 0, err
        s = summary(out)
        assert (s["written"], s["skipped"]) == (2, {"bad_nifti": 1})
        vid = key_of(out, "nifti", f"{PATIENT}/{PATIENT}.nii.gz")
        assert s["offenders"]["bad_nifti"][0].startswith(f"volume #1 of 2 (key {vid}) (")
        assert "DOE" not in (out / "manifest.json").read_text() and "DOE" not in err


# --- item 2: links that leave a dicom/nifti --input --------------------------------------------------------------

_WATCHED: list[str] = []  # folders no run may list or open anything under (while set)
_TOUCHED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCHED and event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, Path)):
        path = os.path.realpath(os.fspath(args[0]))  # a link's target: the event names the link
        if any(path == w or path.startswith(w + os.sep) for w in _WATCHED):
            _TOUCHED.append(f"{event} {path}")


sys.addaudithook(_audit)  # once per process; idle unless a test fills _WATCHED


def _linked_input(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """INPUT with one file of ``fmt`` inside (``sub/in.<ext>``), a file link ``f.<ext>`` and a folder link ``d``
    leaving it (to ELSEWHERE, which holds 1 + 1 files), a link loop inside (``sub/loop -> ..``) and a link to a
    folder inside (``sub/again -> ../sub``); -> (INPUT, ELSEWHERE)."""
    ext = ".dcm" if fmt == "dicom" else ".nii.gz"
    src, other = tmp_path / "in", tmp_path / "elsewhere"

    def make(path: Path, seed: int) -> None:
        if fmt == "dicom":
            make_dicom(path, seed=seed, rows=8, cols=8)
        else:
            _nifti(path, np.arange(8, dtype=np.float32).reshape(2, 2, 2) + seed)

    make(src / "sub" / f"in{ext}", 0)
    make(other / f"{PATIENT}{ext}", 1)
    make(other / "folder" / f"x{ext}", 2)
    (src / f"f{ext}").symlink_to(other / f"{PATIENT}{ext}")
    (src / "d").symlink_to(other / "folder")
    (src / "sub" / "loop").symlink_to("..")
    (src / "sub" / "again").symlink_to("../sub")
    return src, other


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_links_leaving_the_input_are_outside_root(tmp_path, capsys, drill, fmt, workers):
    src, other = _linked_input(tmp_path, fmt)
    ext = ".dcm" if fmt == "dicom" else ".nii.gz"
    per_file = 1 if fmt == "dicom" else 2  # a 2x2x2 volume: 2 axial slices
    out = tmp_path / "out"
    # the sorted walk: d, f<ext>, sub/in<ext> (the loop and sub/again lead back to folders read already)
    with drill.hole(f"{fmt}: a file link and a folder link leaving --input, a link loop inside ({workers} workers)"):
        _TOUCHED.clear()
        _WATCHED.append(os.path.realpath(other))
        try:
            rc, err = run(capsys, "--format", fmt, "--input", src, "--out", out, workers=workers)
        finally:
            _WATCHED.clear()
        assert rc == 0, err
        assert _TOUCHED == []  # nothing behind the links was listed or opened
        s = summary(out)
        assert (s["read"], s["written"], s["skipped"]) == (2 + per_file, per_file, {"outside_root": 2})
        assert s["offenders"] == {"outside_root": ["entry 1", "entry 2"]}
        want = {key_of(out, fmt, f"sub/in{ext}")}
        got = {k.rsplit("-", 1)[0] if fmt == "nifti" else k for k in samples(out)}
        assert got == want
        blob = (out / "manifest.json").read_text()
        assert "DOE" not in blob and "elsewhere" not in blob and "DOE" not in err


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_links_leaving_the_input_with_allow_outside_root(tmp_path, capsys, drill, fmt):
    src, _ = _linked_input(tmp_path, fmt)
    ext = ".dcm" if fmt == "dicom" else ".nii.gz"
    per_file = 1 if fmt == "dicom" else 2
    out = tmp_path / "out"
    with drill.input(f"{fmt}: links leaving --input followed with --allow-outside-root, a link loop inside"):
        rc, err = run(capsys, "--format", fmt, "--input", src, "--out", out, "--allow-outside-root")
        assert rc == 0, err
        s = summary(out)
        assert (s["read"], s["written"], s["skipped"]) == (3 * per_file, 3 * per_file, {})
        got = {k.rsplit("-", 1)[0] if fmt == "nifti" else k for k in samples(out)}
        # keys of the files as walked: through the links' names, the file inside under its own path
        assert got == {key_of(out, fmt, rel) for rel in (f"d/x{ext}", f"f{ext}", f"sub/in{ext}")}


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_link_loops_inside_the_input_end(tmp_path, capsys, drill, fmt):
    """Links that point back up (a -> .., b/c -> ../..) and at each other: the walk ends, every file read once."""
    ext = ".dcm" if fmt == "dicom" else ".nii.gz"
    src = tmp_path / "in"
    for i, rel in enumerate((f"a/one{ext}", f"b/two{ext}")):
        if fmt == "dicom":
            make_dicom(src / rel, seed=i, rows=8, cols=8)
        else:
            _nifti(src / rel, np.arange(8, dtype=np.float32).reshape(2, 2, 2) + i)
    (src / "a" / "up").symlink_to("..")
    (src / "b" / "c").mkdir()
    (src / "b" / "c" / "top").symlink_to("../..")
    (src / "a" / "to_b").symlink_to("../b")
    (src / "b" / "to_a").symlink_to("../a")
    (src / "self").symlink_to("self")  # a link to itself: leaves nothing, names nothing
    for allow in ((), ("--allow-outside-root",)):
        out = tmp_path / f"out{len(allow)}"
        with drill.input(f"{fmt}: link loops inside --input ({'with' if allow else 'without'} --allow-outside-root)"):
            t0 = time.monotonic()
            rc, err = run(capsys, "--format", fmt, "--input", src, "--out", out, *allow)
            assert rc == 0, err
            assert time.monotonic() - t0 < 30
            s = summary(out)
            n = 2 if fmt == "dicom" else 4
            skipped = {} if allow else {"outside_root": 1}  # "self" resolves nowhere: refused, never followed
            assert (s["read"], s["written"], s["skipped"]) == (n + len(skipped), n, skipped)
            got = {k.rsplit("-", 1)[0] if fmt == "nifti" else k for k in samples(out)}
            assert got == {key_of(out, fmt, rel) for rel in (f"a/one{ext}", f"b/two{ext}")}
