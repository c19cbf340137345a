"""Kill drills of data_prep.shards and the writer's failure rules (issue 12, items 5, 7, 9, 11, 15).

A run is SIGKILLed at every step of writing and of swapping the new set in (a test-only hook,
``MEDVLM_TEST_KILL_AT``, kills the process at an exact point; one more drill kills a real
``python -m data_prep.shards`` by the clock), with and without ``--overwrite``: the old set must stay
intact (every byte of its manifest and shards found again: ``bytes_lost``), readable as is when the kill
came before the swap, and restored by the repair every run starts with when it came during the swap; a
rerun then completes with the same keys. Then: a reader whose generator raises, loaders that raise
anything in this process or in a worker, skip details that quote paths, keys longer than USTAR's 100
characters, and every numeric option's bad values (exit 2 before anything exists).
"""
from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import writer as writer_mod
from data_prep.inspect import scan_shard
from data_prep.shards import main as shards_main
from data_prep.synth import main as synth_main
from data_prep.writer import (KILL_AT_ENV, MAX_KEY_CHARS, ImageRef, Pixels, Record, Rejected, ShardWriter, SkipSample,
                              Summary, WriteAborted, prepare_output, safe_detail, shorten_key, write_shards)
from vlm.data.schema import read_manifest, sha256_file
from vlm.data.tario import iter_members

from .test_medical_volumes import make_dicom

REPO = Path(__file__).resolve().parents[2]
OLD_ARGS = ("--shard-size", "50")  # 600 samples: 12 shards
NEW_ARGS = {"more": ("--shard-size", "40", "--bit-depth", "8"),  # 15 shards, other bytes
            "fewer": ("--shard-size", "100", "--bit-depth", "8")}  # 6 shards


def argv(src: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    return ["--format", "dicom", "--input", str(src), "--out", str(out), "--workers", str(workers), "--quiet", *extra]


def shard_set(out: Path) -> tuple:
    """The complete set in ``out``, verified: every listed shard present with its size and sha256, no other
    shard file; -> (num_samples, ((name, sha256), ...))."""
    m = read_manifest(out)
    for s in m.shards:
        p = out / s.name
        assert p.stat().st_size == s.bytes and sha256_file(p) == s.sha256, s.name
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(s.name for s in m.shards)
    return m.num_samples, tuple((s.name, s.sha256) for s in m.shards)


def keys(out: Path) -> set[str]:
    m = read_manifest(out)
    return {k for s in m.shards for k, _ in scan_shard(out / s.name)}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith((".incoming-", ".old-")) or p.name.endswith(".tmp"))


def set_files(out: Path) -> dict[str, tuple[str, int]]:
    """The files of the set in ``out``: name -> (sha256, size)."""
    m = read_manifest(out)
    names = ["manifest.json", *(s.name for s in m.shards)]
    return {n: (sha256_file(out / n), (out / n).stat().st_size) for n in names}


def bytes_lost(out: Path, files: dict[str, tuple[str, int]]) -> int:
    """Bytes of a set's files found intact nowhere: not in ``out``, not in a swap's ``.old-*`` folder."""
    found: dict[str, set[str]] = {}
    for p in [*out.iterdir(), *(q for d in out.glob(".old-*") for q in d.iterdir())]:
        if p.is_file():
            found.setdefault(p.name, set()).add(sha256_file(p))
    return sum(size for name, (sha, size) in files.items() if sha not in found.get(name, set()))


def _child(point: str, args: list[str]) -> None:
    os.environ[KILL_AT_ENV] = point
    try:
        rc = shards_main(args)
    except BaseException:
        rc = 99
    os._exit(rc or 0)


def killed_at(point: str, args: list[str]) -> int:
    """Run data_prep.shards in a forked process that SIGKILLs itself at ``point``; its exit code."""
    p = mp.get_context("fork").Process(target=_child, args=(point, args))
    p.start()
    p.join(120)
    return p.exitcode


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("kill") / "in"
    for i in range(6):  # 600 frames of 8x8: 600 samples
        make_dicom(src / f"s{i}.dcm", frames=100, rows=8, cols=8, seed=i)
    return src


@pytest.fixture(scope="module")
def sets(corpus, tmp_path_factory) -> dict:
    """A pristine old set (600 samples in 12 shards, with its .key_secret) and the sets that --overwrite with
    NEW_ARGS makes from it."""
    base = tmp_path_factory.mktemp("sets")
    old = base / "old"
    assert shards_main(argv(corpus, old, *OLD_ARGS)) == 0
    out = {"old_dir": old, "old": shard_set(old), "old_files": set_files(old), "keys": keys(old)}
    for name, args in NEW_ARGS.items():
        d = base / name
        shutil.copytree(old, d)
        assert shards_main(argv(corpus, d, *args, "--overwrite")) == 0
        out[name] = shard_set(d)
        assert keys(d) == out["keys"]  # the same secret: the same keys
    assert out["old"][0] == 600 and len(out["old"][1]) == 12 and len(out["more"][1]) == 15
    return out


WRITE_POINTS = ("shard-closed#1", "shard-closed#7", "staged")
SWAP_POINTS = ("old-manifest-moved", "old-shard-moved#1", "old-shard-moved#12", "old-moved", "new-shard-moved#1",
               "new-shard-moved#9", "committed")
OVERWRITE_CASES = ([(p, "more", 0) for p in WRITE_POINTS + SWAP_POINTS]
                   + [("shard-closed#7", "more", 2), ("new-shard-moved#1", "more", 2),
                      ("old-shard-moved#12", "fewer", 0), ("new-shard-moved#3", "fewer", 0), ("committed", "fewer", 2)])


@pytest.mark.parametrize("point,new,workers", OVERWRITE_CASES)
def test_overwrite_killed(tmp_path, corpus, sets, drill, point, new, workers):
    out = tmp_path / "out"
    shutil.copytree(sets["old_dir"], out)
    secret = (out / ".key_secret").read_bytes()
    args = argv(corpus, out, *NEW_ARGS[new], "--overwrite", workers=workers)
    with drill.fault(f"data_prep.shards --overwrite of a 600-sample set SIGKILLed at {point} "
                     f"({new} shards, {workers} workers)") as info:
        assert killed_at(point, args) == -signal.SIGKILL
        info["bytes_lost"] = lost = bytes_lost(out, sets["old_files"])
        assert lost == 0
        if point in WRITE_POINTS:  # before the swap the folder is untouched: readable as is
            assert shard_set(out) == sets["old"]
        prepare_output(out, overwrite=True)  # the repair every run starts with
        assert leftovers(out) == []
        assert shard_set(out) == (sets[new] if point == "committed" else sets["old"])
        assert shards_main(args) == 0  # the rerun completes
        assert shard_set(out) == sets[new] and leftovers(out) == []
        assert (out / ".key_secret").read_bytes() == secret and keys(out) == sets["keys"]


@pytest.mark.parametrize("point", ["shard-closed#3", "staged", "new-shard-moved#2", "committed"])
def test_first_run_killed(tmp_path, corpus, sets, drill, point):
    secret = tmp_path / "secret"
    shutil.copy(sets["old_dir"] / ".key_secret", secret)
    out = tmp_path / "fresh"
    args = argv(corpus, out, *OLD_ARGS, "--key-secret", str(secret))
    with drill.fault(f"data_prep.shards into an empty folder SIGKILLed at {point}") as info:
        assert killed_at(point, args) == -signal.SIGKILL
        info["bytes_lost"] = 0  # nothing existed before
        if point == "committed":
            assert shard_set(out) == sets["old"]
            return
        assert not (out / "manifest.json").exists()  # no manifest: never mistaken for a set
        assert shards_main(args) == 0  # a rerun without --overwrite completes
        assert shard_set(out) == sets["old"] and leftovers(out) == []


def test_overwrite_killed_by_the_clock(tmp_path, sets, drill):
    """A real `python -m data_prep.shards --overwrite --workers 2`, SIGKILLed as soon as its first new shard
    exists; its workers die with it (nothing holds the folder), the old set is intact as is."""
    import psutil

    src = tmp_path / "in"
    for i in range(6):  # 600 frames of 128x128: about a second of encoding
        make_dicom(src / f"s{i}.dcm", frames=100, rows=128, cols=128, seed=i)
    out = tmp_path / "out"
    assert shards_main(argv(src, out, *OLD_ARGS)) == 0
    old_state, old_files = shard_set(out), set_files(out)
    cmd = [sys.executable, "-m", "data_prep.shards", *argv(src, out, *NEW_ARGS["more"], "--overwrite", workers=2)]
    with drill.fault("python -m data_prep.shards --overwrite --workers 2 SIGKILLed by the clock mid-write") as info:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children: list = []
        try:
            deadline = time.monotonic() + 60
            while not list(out.glob(".incoming-*/shard-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL  # killed mid-write, not finished
            gone, alive = psutil.wait_procs(children, timeout=10)
            assert alive == []  # workers die with the main process
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for c in children:
                with __import__("contextlib").suppress(psutil.NoSuchProcess):
                    c.kill()
        info["bytes_lost"] = lost = bytes_lost(out, old_files)
        assert lost == 0 and shard_set(out) == old_state
        assert shards_main(argv(src, out, *NEW_ARGS["more"], "--overwrite")) == 0
        assert shard_set(out)[0] == 600 and leftovers(out) == []


def test_concurrent_run_is_refused(tmp_path, corpus, sets, drill, capsys, monkeypatch):
    monkeypatch.setattr(writer_mod, "LOCK_WAIT_S", 0.2)
    out = tmp_path / "out"
    shutil.copytree(sets["old_dir"], out)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a run in progress holds it
        with drill.fault("a second data_prep.shards into a folder another run is writing"):
            assert shards_main(argv(corpus, out, "--overwrite")) == 2
            assert capsys.readouterr().err.splitlines() == [
                f"error: --out {out} is being written by another run (wait for it to finish)"]
            assert shard_set(out) == sets["old"] and leftovers(out) == []
    finally:
        os.close(fd)


def test_overwrite_that_writes_nothing_keeps_the_old_set(tmp_path, corpus, sets, drill, capsys):
    out = tmp_path / "out"
    shutil.copytree(sets["old_dir"], out)
    with drill.fault("--overwrite whose every input is skipped (--frame 500): the old set is kept") as info:
        assert shards_main(argv(corpus, out, "--overwrite", "--frame", "500")) == 1
        err = capsys.readouterr().err
        assert "skipped 6 (no_such_frame)" in err
        assert err.splitlines()[-1] == f"error: no samples were written; the previous shard set in {out} is kept " \
                                       "(see the skip reasons above)"
        info["bytes_lost"] = bytes_lost(out, sets["old_files"])
        assert info["bytes_lost"] == 0 and shard_set(out) == sets["old"] and leftovers(out) == []



# --- item 5: a run without --overwrite never replaces a set committed after its start ----------------------------

def _tagged(tag: str, n: int):
    for i in range(n):
        yield Record(f"{tag}-{i:03d}", [ImageRef(_pixels, (i + (100 if tag == "b" else 0),))], f"{tag} {i}",
                     {"source": tag}, f"row {i}")


@pytest.mark.parametrize("workers", [0, 2])
def test_run_committed_since_prepare_output_is_kept(tmp_path, drill, workers):
    """Runs A and B (neither with --overwrite) both pass prepare_output on an empty folder; A commits first.
    B must then refuse, under the lock, exactly as prepare_output would, and write nothing."""
    out = tmp_path / "out"
    refusal = f"--out {out} is not empty; pass --overwrite to replace its shards"
    assert prepare_output(out, False) == out  # run A starts
    assert prepare_output(out, False) == out  # run B starts: the folder is still empty
    write_shards(_tagged("a", 6), out, shard_size=4, workers=workers, progress=False, overwrite=False)  # A commits
    a_state, a_files = shard_set(out), set_files(out)
    assert a_state[0] == 6 and len(a_state[1]) == 2
    with drill.fault(f"two runs without --overwrite into one empty folder, the second commits last ({workers} "
                     "workers)") as info:
        with pytest.raises(FileExistsError) as e:
            write_shards(_tagged("b", 3), out, shard_size=4, workers=workers, progress=False, overwrite=False)
        assert str(e.value) == refusal
        with pytest.raises(FileExistsError) as again:  # the same words as the check at the start
            prepare_output(out, False)
        assert str(again.value) == refusal
        info["bytes_lost"] = bytes_lost(out, a_files)
        assert info["bytes_lost"] == 0 and shard_set(out) == a_state and set_files(out) == a_files
        assert keys(out) == {f"a-{i:03d}" for i in range(6)} and leftovers(out) == []
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    with drill.input(f"the second run with overwrite=True replaces that set ({workers} workers)"):
        m, s = write_shards(_tagged("b", 3), out, shard_size=4, workers=workers, progress=False, overwrite=True)
        assert (s.written, m.num_samples) == (3, 3) and shard_set(out)[0] == 3
        assert keys(out) == {"b-000", "b-001", "b-002"} and leftovers(out) == []


def test_cli_run_refuses_a_set_committed_since_its_start(tmp_path, capsys, drill, monkeypatch):
    """data_prep.shards without --overwrite: another run commits between this run's prepare_output and its
    write (injected right after prepare_output); this run exits 2 with prepare_output's message."""
    from data_prep import shards as shards_mod

    src = tmp_path / "in"
    make_dicom(src / "a.dcm", frames=2, rows=8, cols=8)
    out = tmp_path / "out"
    real_prepare = shards_mod.prepare_output

    def prepare_then_other_run_commits(path, overwrite):
        got = real_prepare(path, overwrite)
        write_shards(_tagged("a", 5), got, shard_size=2, progress=False)  # the other run, into an empty folder
        return got

    monkeypatch.setattr(shards_mod, "prepare_output", prepare_then_other_run_commits)
    with drill.fault("data_prep.shards without --overwrite, another run committing into --out meanwhile") as info:
        assert shards_main(argv(src, out)) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: --out {out} is not empty; pass --overwrite to replace its shards"]
        info["bytes_lost"] = 0 if keys(out) == {f"a-{i:03d}" for i in range(5)} else 1
        assert info["bytes_lost"] == 0 and shard_set(out)[0] == 5 and leftovers(out) == []

# --- item 7: a reader's generator that raises, loaders that raise ------------------------------------------------

def _pixels(i: int) -> Pixels:
    return Pixels(np.full((4, 4), i, dtype=np.uint8))


def _oserror(path: str) -> Pixels:
    raise FileNotFoundError(2, "No such file or directory", path)


def _valueerror(name: str) -> Pixels:
    raise ValueError(f"unexpected value {name!r} in the header")


def _skip_with_path(path: str) -> Pixels:
    raise SkipSample("bad_image", f"cannot decode {path}")


def _frames_of_three() -> list:
    return [_pixels(1), SkipSample("non_finite", "frame 1"), _pixels(3)]


def _records(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise KeyError("DOE^JOHN")  # a reader bug: its generator dies here
        yield Record(f"t-{i:03d}", [ImageRef(_pixels, (i,))], f"caption {i}", {"source": "t"}, f"row {i}")


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_generator_that_raises(tmp_path, corpus, sets, drill, workers):
    out = tmp_path / "out"
    shutil.copytree(sets["old_dir"], out)
    with drill.input(f"a reader's generator raising KeyError at its 6th row, over an old set ({workers} workers)"):
        with pytest.raises(WriteAborted) as e:
            write_shards(_records(10, fail_at=5), out, shard_size=2, workers=workers, progress=False)
        assert str(e.value) == (f"the reader stopped with KeyError after 5 inputs (last: row 4); this is a bug in the "
                                f"reader, since one bad input should be one counted skip; nothing was written, {out} "
                                "is unchanged")
        assert "DOE" not in str(e.value)
        assert shard_set(out) == sets["old"] and leftovers(out) == []
    empty = tmp_path / "empty"
    with drill.input(f"a reader's generator raising KeyError, into an empty folder ({workers} workers)"):
        with pytest.raises(WriteAborted):
            write_shards(_records(10, fail_at=5), empty, shard_size=2, workers=workers, progress=False)
        assert sorted(p.name for p in empty.iterdir()) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_exceptions_are_counted_skips(tmp_path, drill, workers):
    patient = "/data/DOE^JOHN_MRN00123456/chest.png"
    items = [Record("t-ok", [ImageRef(_pixels, (1,))], "a", {"source": "t"}, "row 1"),
             Record("t-os", [ImageRef(_oserror, (patient,))], "b", {"source": "t"}, "row 2"),
             Record("t-val", [ImageRef(_valueerror, ("DOE^JOHN",))], "c", {"source": "t"}, "row 3"),
             Record("t-skip", [ImageRef(_skip_with_path, (patient,))], "d", {"source": "t"}, "row 4"),
             Record("t bad key", [ImageRef(_pixels, (2,))], "e", {"source": "t"}, "row 5"),
             Rejected("bad_row", "row 6", "not valid JSON: Expecting ',' delimiter"),
             writer_mod.Group([Record(f"t-g{k}", [], None, {"source": "t"}, f"row 7 frame {k}") for k in range(3)],
                              ImageRef(_frames_of_three), "row 7")]
    out = tmp_path / "out"
    with drill.input(f"loaders raising OSError/ValueError/SkipSample with patient text, a bad key ({workers} workers)"):
        m, s = write_shards(items, out, shard_size=10, workers=workers, progress=False)
        assert (s.read, s.written, m.num_samples) == (9, 3, 3)
        assert s.offenders == {
            "error": ["row 2 (FileNotFoundError: [Errno 2] No such file or directory: '…')",
                      "row 3 (ValueError: unexpected value '…' in the header)"],
            "bad_image": ["row 4 (cannot decode <path>)"],
            "bad_key": ["row 5 (a key holds only letters, digits, '_' and '-')"],
            "bad_row": ["row 6 (not valid JSON: Expecting ',' delimiter)"],
            "non_finite": ["row 7 frame 1 (frame 1)"]}
        assert b"DOE" not in (out / "manifest.json").read_bytes() and keys(out) == {"t-ok", "t-g0", "t-g2"}


@pytest.mark.parametrize("text,expected", [
    ("[Errno 2] No such file or directory: '/data/DOE^JOHN/x.dcm'", "[Errno 2] No such file or directory: <path>"),
    ("cannot open /data/DOE^JOHN_MRN00123456/chest.png for reading", "cannot open <path> for reading"),
    ("cannot open C:\\scans\\DOE\\a.dcm", "cannot open <path>"),
    ("cannot identify image file DOE^JOHN_MRN00123456.dcm", "cannot identify image file <file>"),
    ("bad file 'MRN00123456_broken.nii.gz'", "bad file <path>"),
    ("instance 1.2.840.113619.2.55.3.604688119 not found", "instance <uid> not found"),
    ("cannot identify image file <_io.BytesIO object at 0x7f3a2c1d0e50>", "cannot identify image file"),
    ("field 2 is longer than 16777216 characters", "field 2 is longer than 16777216 characters"),
    ("not valid JSON: Expecting ',' delimiter: line 1 column 9 (char 8)",
     "not valid JSON: Expecting ',' delimiter: line 1 column 9 (char 8)"),
])
def test_details_lose_path_text(drill, text, expected):
    with drill.hole(f"a skip detail quoting a path or name: {text[:40]}"):
        assert safe_detail(text) == expected
        s = Summary()
        s.note_skip("r", "row 1", text)
        assert s.offenders == {"r": [f"row 1 ({expected})"]}


# --- item 9: keys longer than USTAR's 100 characters ----------------------------------------------------------

def test_long_keys(tmp_path, drill):
    long_a = "llava-" + "a" * 294  # 300 characters
    long_b = "llava-" + "a" * 293 + "b"  # the same first 299
    items = [Record(k, [ImageRef(_pixels, (i,))], "x", {"source": "llava"}, f"row {i}")
             for i, k in enumerate((long_a, long_b, "llava-short"))]
    with drill.input("keys of 300 characters (two differing only in the last one)"):
        short = {k: shorten_key(k) for k in (long_a, long_b)}
        assert len(set(short.values())) == 2 and all(len(v) == MAX_KEY_CHARS for v in short.values())
        for run in ("one", "two"):
            out = tmp_path / run
            m, s = write_shards(items, out, progress=False)
            assert (s.written, s.shortened_keys) == (3, 2)
            assert keys(out) == {short[long_a], short[long_b], "llava-short"}  # stable between runs
            assert all(len(name) <= 100 for name, *_ in iter_members(str(out / m.shards[0].name)))


def test_pax_names_for_keys_over_100(tmp_path, drill):
    """ShardWriter itself never fails on a long name: PAX 'path' records, read back by vlm.data's reader."""
    w = ShardWriter(tmp_path, shard_size=10)
    key = "k" * 150
    with drill.input("ShardWriter.write with a 150-character key"):
        w.write(key, {"json": b"{}", "png": b"\x89PNG"})
        w.write("short", {"json": b"{}"})
        m = w.finish({})
        names = [name for name, *_ in iter_members(str(tmp_path / m.shards[0].name))]
        assert names == [f"{key}.json", f"{key}.png", "short.json"]
        assert [k for k, _ in scan_shard(tmp_path / m.shards[0].name)] == [key, "short"]


def test_300_character_path(tmp_path, capsys, drill):
    rel = Path(*(["p" * 95] * 3), "scan_" + "x" * 15 + ".dcm")  # 3 x 96 + 24 = 312 characters
    assert len(str(rel)) >= 300
    make_dicom(tmp_path / "in" / rel, frames=2)
    out = tmp_path / "out"
    with drill.input("dicom: a 312-character relative path"):
        assert shards_main(argv(tmp_path / "in", out)) == 0, capsys.readouterr().err
        assert read_manifest(out).num_samples == 2 and all(len(k) < MAX_KEY_CHARS for k in keys(out))


# --- item 11: numeric options are checked before anything is written -------------------------------------------

OPTION_CASES = [
    (("--max-size", "-5"), "--max-size must be a positive number of pixels (got -5)"),
    (("--max-size", "0"), "--max-size must be a positive number of pixels (got 0)"),
    (("--workers", "-1"), "--workers must be >= 0 (0: encode in this process; got -1)"),
    (("--max-pixels", "-1"), "--max-pixels must be a positive number of pixels (got -1)"),
    (("--max-pixels", "0"), "--max-pixels must be a positive number of pixels (got 0)"),
    (("--shard-size", "0"), "--shard-size must be >= 1 (got 0)"),
    (("--shard-size", "-3"), "--shard-size must be >= 1 (got -3)"),
    (("--window", "nan,400"), "--window 'nan,400': CENTER and WIDTH must be finite numbers"),
    (("--window", "40,inf"), "--window '40,inf': CENTER and WIDTH must be finite numbers"),
    (("--window", "40,0"), "--window width must be > 0"),
    (("--window", "40"), "--window '40' must be CENTER,WIDTH"),
    (("--frame", "-1"), "--frame must be >= 0 (frames are counted from 0; got -1)"),
    (("--volume", "-2"), "--volume must be >= 0 (volumes are counted from 0; got -2)"),
    (("--slices", "every:0"), "--slices 'every:0': use all, middle or every:N (N >= 1)"),
]


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
@pytest.mark.parametrize("extra,message", OPTION_CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_bad_option_values(tmp_path, corpus, capsys, drill, fmt, extra, message):
    out = tmp_path / "never"
    with drill.input(f"data_prep.shards --format {fmt} {' '.join(extra)}"):
        rc = shards_main(["--format", fmt, "--input", str(corpus), "--out", str(out), "--quiet", *extra])
        assert rc == 2 and capsys.readouterr().err.splitlines() == [f"error: {message}"]
        assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (("--shard-size", "0"), "--shard-size must be >= 1 (got 0)"),
    (("--workers", "-1"), "--workers must be >= 0 (0: encode in this process; got -1)"),
    (("--seed", "-1"), "--seed must be >= 0 (got -1)"),
    (("--num-train", "0"), "--num-train and --num-test must be >= 1"),
    (("--image-size", "8"), "--image-size must be within 16..1024"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_bad_synth_option_values(tmp_path, capsys, drill, extra, message):
    out = tmp_path / "never"
    with drill.input(f"data_prep.synth {' '.join(extra)}"):
        assert synth_main(["--out", str(out), "--quiet", *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
        assert not out.exists()
