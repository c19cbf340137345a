"""The pydicom-corpus PHI scan (issue 12, drill suite; item 15).

Every test file pydicom ships (``pydicom.data.get_testdata_files()``: all of those on disk, DICOMDIRs and
non-DICOM files included) is copied under a patient-named folder, ``DOE^JOHN_MRN00123456/``, and run
through ``python -m data_prep.shards --format dicom`` and ``--format pairs`` (a table pointing at a few of
them). Every PHI value of every header (the attributes ``data_prep.phi`` lists from PS3.15's Basic Profile
and the other identifying ones below, in sequences too; whole values and the parts of person names, of 4
characters or more) and the folder name's parts are searched for in every output byte: each member name
and member of every shard, the manifest, the key secret file, stdout and stderr. Values made only of digits
(times, serial numbers) shorter than 8 characters, or of one repeated character, occur in any number or tar
header and are searched for only if longer; in image members (compressed pixels, random-looking bytes)
only values of 8 characters or more are searched for, as shorter ones occur by chance.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from data_prep.phi import BASIC_PROFILE_EXAMPLES

REPO = Path(__file__).resolve().parents[2]
PATIENT = "DOE^JOHN_MRN00123456"
FOLDER_PARTS = (PATIENT, "DOE^JOHN", "DOE", "JOHN", "MRN00123456", "00123456")
MORE_PHI = ("OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
            "IssuerOfPatientID", "RequestingPhysician", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
            "InstitutionalDepartmentName", "SeriesTime", "AcquisitionTime", "ContentTime", "AcquisitionDateTime",
            "InstanceCreationDate", "InstanceCreationTime", "PatientComments", "ImageComments",
            "RequestedProcedureDescription", "PerformedProcedureStepDescription", "AdmissionID", "PatientBirthTime")
PHI_KEYWORDS = set(BASIC_PROFILE_EXAMPLES) | set(MORE_PHI)
PAIRS_FILES = ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "badVR.dcm", "MR_truncated.dcm")
# what the dicom reader makes of pydicom 3.0.2's 176 files (167 of them DICOM by name or preamble)
PINNED = {"3.0.2": {"files": 167, "read": 241, "written": 154, "skipped": {"bad_dicom": 17, "no_pixels": 70}}}


def _searchable(value: str) -> bool:
    if len(value) < 4 or len(set(value)) == 1:
        return False
    return len(value) >= 8 or not re.fullmatch(r"[\d.\s+-]+", value)


def phi_values(files: list[Path]) -> dict[str, str]:
    """PHI value -> the attribute it came from, over every element (sequences included) of every file."""
    import pydicom

    found: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
                elements = list(ds.iterall())
            except Exception:
                continue
            for el in elements:
                if el.keyword not in PHI_KEYWORDS or el.value in (None, "", b""):
                    continue
                for item in (list(el.value) if el.VM > 1 else [el.value]):
                    text = str(item).strip()
                    parts = [text] + (text.replace("^", " ").replace("=", " ").split() if el.VR == "PN" else [])
                    for p in parts:
                        if _searchable(p):
                            found.setdefault(p, el.keyword)
    for p in FOLDER_PARTS:
        found[p] = "folder name"
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from pydicom.data import get_testdata_files
    import pydicom

    base = Path(pydicom.__file__).parent / "data" / "test_files"
    files = [Path(f) for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 100  # whatever count this pydicom has on disk (176 for 3.0.2)
    root = tmp_path_factory.mktemp("phi") / "data"
    for f in files:
        dst = root / PATIENT / f.relative_to(base)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    values = phi_values(files)
    assert "JFK IMAGING CENTER" in values and "CompressedSamples^CT1" in values  # the scan sees real PHI
    ct = (base / "CT_small.dcm").read_bytes()
    assert len(leaks(values, {"CT_small.dcm": ct}, {})) >= 5  # and finds it where it is
    return {"root": root, "files": files, "values": values, "version": pydicom.__version__}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.shards", *args, "--workers", "2"], cwd=REPO,
                          capture_output=True, timeout=300)


def output_bytes(out: Path, proc: subprocess.CompletedProcess) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(text-like blobs: names, json, txt, manifest, key secret, stdout, stderr; image members)."""
    text = {"<stdout>": proc.stdout, "<stderr>": proc.stderr}
    images = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            (images if p.suffix == ".tar" else text)[p.name] = p.read_bytes()  # a whole tar: headers too
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                data = tar.extractfile(m).read()
                text[f"{shard.name}: name of {m.name}"] = m.name.encode()
                (text if m.name.endswith((".json", ".txt")) else images)[f"{shard.name}: {m.name}"] = data
    return text, images


def leaks(values: dict[str, str], text: dict[str, bytes], images: dict[str, bytes]) -> list[tuple[str, str, str]]:
    found = []
    for value, attr in values.items():
        needle = value.encode("utf-8", "replace")
        for where, blob in text.items():
            if needle in blob:
                found.append((value, attr, where))
        if len(value) >= 8:
            found += [(value, attr, where) for where, blob in images.items() if needle in blob]
    return found


def _is_dicom(p: Path) -> bool:
    with open(p, "rb") as f:
        return p.suffix.lower() in (".dcm", ".dicom") or f.read(132)[128:132] == b"DICM"


def test_dicom_corpus_leaks_nothing(corpus, tmp_path, drill):
    out = tmp_path / "dicom"
    n_dicom = sum(_is_dicom(f) for f in corpus["files"])
    with drill.hole(f"dicom: all {len(corpus['files'])} pydicom test files under {PATIENT}/, "
                    f"{len(corpus['values'])} PHI values searched in every output byte"):
        proc = run("--format", "dicom", "--input", str(corpus["root"]), "--out", str(out))
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        s = json.loads((out / "manifest.json").read_text())["summary"]
        assert s["read"] == s["written"] + sum(s["skipped"].values()) + s["duplicates"]
        assert set(s["skipped"]) <= {"bad_dicom", "no_pixels", "image_too_large", "non_finite"}
        assert all(f"of {n_dicom} (key dicom-" in o for names in s["offenders"].values() for o in names)
        pinned = PINNED.get(corpus["version"])
        if pinned:  # exact counts for the pydicom this suite was written against
            assert (n_dicom, s["read"], s["written"], s["skipped"]) == (
                pinned["files"], pinned["read"], pinned["written"], pinned["skipped"])
        assert leaks(corpus["values"], *output_bytes(out, proc)) == []


def test_pairs_table_of_corpus_files_leaks_nothing(corpus, tmp_path, drill):
    table = corpus["root"] / "pairs.csv"
    table.write_text("image,caption\n" + "".join(f"{PATIENT}/{n},Chest CT.\n" for n in PAIRS_FILES))
    out = tmp_path / "pairs"
    with drill.hole(f"pairs: a table of {len(PAIRS_FILES)} pydicom files under {PATIENT}/: no PHI in any output byte"):
        proc = run("--format", "pairs", "--input", str(table), "--out", str(out))
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        s = json.loads((out / "manifest.json").read_text())["summary"]
        # badVR.dcm (NumberOfFrames '1A') and MR_truncated.dcm: counted skips; rtdose gives its frame 0
        assert (s["read"], s["written"], s["skipped"]) == (6, 4, {"bad_dicom": 2})
        assert s["offenders"]["bad_dicom"] == ["pairs.csv line 6 (NumberOfFrames is not a whole number)",
                                               "pairs.csv line 7 (ValueError)"]
        assert leaks(corpus["values"], *output_bytes(out, proc)) == []
