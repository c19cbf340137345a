"""data_prep.shards: every source format, from real fixture records, exact counts and skip reasons."""
from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, load_fixture, stand_in_images
from data_prep.inspect import scan_shard
from data_prep.shards import main as shards_main
from vlm.data.schema import read_manifest

PYDICOM_DATA = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
NIBABEL_DATA = Path(__import__("nibabel").__file__).parent / "tests" / "data"


def run(*args) -> int:
    return shards_main([*map(str, args), "--workers", "0", "--quiet"])


def samples(folder) -> dict[str, dict]:
    m = read_manifest(folder)
    out = {}
    for s in m.shards:
        for key, parts in scan_shard(Path(folder) / s.name):
            out[key] = parts
    assert len(out) == m.num_samples
    return out


def summary(folder) -> dict:
    return read_manifest(folder).extra["summary"]


def private_key(folder, source: str, rel: str) -> str:
    """The key pairs/imagefolder give the image at ``rel``: a keyed hash with the folder's own secret."""
    from types import SimpleNamespace

    from data_prep.keys import hashed_key

    return hashed_key(source, rel, SimpleNamespace(out=str(folder), key_secret=None))


# --- SLAKE (real records) -------------------------------------------------------------------

def test_slake_real_records(tmp_path):
    recs = load_fixture("slake/train.json")
    d = tmp_path / "slake"
    d.mkdir()
    shutil.copy(FIXTURES / "slake/train.json", d / "train.json")
    stand_in_images(d / "imgs", {r["img_name"] for r in recs})
    assert run("--format", "slake", "--input", d / "train.json", "--out", tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    en = [r for r in recs if r["q_lang"] == "en"]
    assert len(got) == len({r["img_name"] for r in en})
    qas = [qa for s in got.values() for qa in json.loads(s["json"])["qa"]]
    assert sorted(q["qid"] for q in qas) == sorted(r["qid"] for r in en)
    meta = json.loads(next(iter(got.values()))["json"])
    assert meta["split"] == "train" and meta["conversations"][0]["value"].startswith("<image>\n")
    assert len(meta["conversations"]) == 2 * len(meta["qa"])
    # Chinese questions by option
    assert run("--format", "slake", "--input", d / "train.json", "--out", tmp_path / "zh", "--lang", "zh") == 0
    zh = [qa for s in samples(tmp_path / "zh").values() for qa in json.loads(s["json"])["qa"]]
    assert len(zh) == sum(r["q_lang"] == "zh" for r in recs)


def test_missing_image_is_skipped_counted_and_named(tmp_path):
    recs = load_fixture("slake/validate.json")
    d = tmp_path / "slake"
    d.mkdir()
    shutil.copy(FIXTURES / "slake/validate.json", d / "validate.json")
    names = sorted({r["img_name"] for r in recs if r["q_lang"] == "en"})
    stand_in_images(d / "imgs", names[1:])  # the first image is missing
    assert run("--format", "slake", "--input", d / "validate.json", "--out", tmp_path / "o") == 0
    s = summary(tmp_path / "o")
    assert s["written"] == len(names) - 1 and s["skipped"] == {"missing_image": 1}
    assert names[0] in s["offenders"]["missing_image"][0]
    assert json.loads(next(iter(samples(tmp_path / "o").values()))["json"])["split"] == "val"


# --- R2Gen / IU X-Ray (real records, multi-view) ----------------------------------------------

def test_r2gen_multiview(tmp_path):
    ann = load_fixture("iu_xray/annotation.json")
    d = tmp_path / "iu"
    shutil.copytree(FIXTURES / "iu_xray", d)
    stand_in_images(d / "images", {p for s in ann.values() for r in s for p in r["image_path"]}, mode="L")
    assert run("--format", "r2gen", "--input", d / "annotation.json", "--out", tmp_path / "o", "--split", "train",
               "--concepts", Path(__file__).parent.parent / "configs/concepts/medical.yaml") == 0
    got = samples(tmp_path / "o")
    assert len(got) == len(ann["train"])
    rec = ann["train"][0]
    parts = got[f"r2gen-{rec['id']}"]
    assert parts["txt"].decode() == rec["report"].strip()
    assert ("view1.png" in parts) == (len(rec["image_path"]) > 1)
    meta = json.loads(parts["json"])
    assert meta["split"] == "train" and meta["image_names"] == rec["image_path"]
    assert any(c["name"] == "effusion" and c.get("negated") for c in meta["concepts"])  # "no effusion"
    assert run("--format", "r2gen", "--input", d / "annotation.json", "--out", tmp_path / "all") == 0
    assert len(samples(tmp_path / "all")) == sum(len(v) for v in ann.values())


def test_r2gen_unknown_split_fails_before_writing(tmp_path):
    d = tmp_path / "iu"
    shutil.copytree(FIXTURES / "iu_xray", d)
    (d / "images").mkdir()
    assert run("--format", "r2gen", "--input", d / "annotation.json", "--out", tmp_path / "o", "--split", "dev") == 2
    assert not (tmp_path / "o").exists()


# --- VQA-RAD: official JSON and parquet --------------------------------------------------------

VQA_RAD_RECORDS = [  # the official file's fields; values written for the test
    {"qid": 1, "phrase_type": "freeform", "qid_linked_id": "a", "image_case_url": "u", "image_name": "synpic1.jpg",
     "image_organ": "HEAD", "evaluation": "given", "question": "Is there a bleed?", "question_rephrase": "NULL",
     "question_relation": "NULL", "question_frame": "NULL", "question_type": "PRES", "answer": "Yes",
     "answer_type": "CLOSED"},
    {"qid": 2, "phrase_type": "test_freeform", "qid_linked_id": "b", "image_case_url": "u",
     "image_name": "synpic1.jpg", "image_organ": "HEAD", "evaluation": "given", "question": "Where is the lesion?",
     "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL", "question_type": "POS",
     "answer": "left frontal lobe", "answer_type": "OPEN"},
    {"qid": 3, "phrase_type": "test_para", "qid_linked_id": "b", "image_case_url": "u", "image_name": "synpic2.jpg",
     "image_organ": "CHEST", "evaluation": "given", "question": "Is the heart enlarged?",
     "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL", "question_type": "SIZE",
     "answer": "No", "answer_type": "CLOSED"},
    {"qid": 4, "phrase_type": "para", "qid_linked_id": "c", "image_case_url": "u", "image_name": "synpic3.jpg",
     "image_organ": "ABD", "evaluation": "given", "question": "", "question_rephrase": "NULL",
     "question_relation": "NULL", "question_frame": "NULL", "question_type": "PRES", "answer": "no",
     "answer_type": "CLOSED"},
]


def test_vqa_rad_official_json(tmp_path):
    d = tmp_path / "vqarad"
    d.mkdir()
    (d / "VQA_RAD Dataset Public.json").write_text(json.dumps(VQA_RAD_RECORDS))
    stand_in_images(d / "VQA_RAD Image Folder", ["synpic1.jpg", "synpic2.jpg", "synpic3.jpg"])
    assert run("--format", "vqa_rad", "--input", d / "VQA_RAD Dataset Public.json", "--out", tmp_path / "o") == 0
    got = {k: json.loads(v["json"]) for k, v in samples(tmp_path / "o").items()}
    splits = {k: m["split"] for k, m in got.items()}
    assert splits == {"vqa_rad-train-synpic1": "train", "vqa_rad-test-synpic1": "test",
                      "vqa_rad-test-synpic2": "test"}
    assert summary(tmp_path / "o")["skipped"] == {"bad_row": 1}  # the empty question
    assert run("--format", "vqa_rad", "--input", d / "VQA_RAD Dataset Public.json", "--out", tmp_path / "t",
               "--split", "test") == 0
    assert sum(len(json.loads(s["json"])["qa"]) for s in samples(tmp_path / "t").values()) == 2


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (value, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", ["vqa_rad", "pathvqa"])
def test_hf_parquet(tmp_path, fmt):
    img_a, img_b = _png_bytes(1), _png_bytes(2)
    rows = [{"image": {"bytes": img_a, "path": None}, "question": "is this normal?", "answer": "no"},
            {"image": {"bytes": img_a, "path": None}, "question": "what organ?", "answer": "lung"},
            {"image": {"bytes": img_b, "path": None}, "question": "is there a mass?", "answer": "yes"}]
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", rows[:1])
    assert run("--format", fmt, "--input", tmp_path / "data", "--out", tmp_path / "o") == 0
    got = [json.loads(s["json"]) for s in samples(tmp_path / "o").values()]
    assert sorted((m["split"], len(m["qa"])) for m in got) == [("test", 1), ("test", 2), ("train", 1)]
    test_qids = sorted(qa["qid"] for m in got if m["split"] == "test" for qa in m["qa"])
    assert test_qids == [0, 1, 2]


# --- PathVQA original pkl (safe unpickling) ----------------------------------------------------

def test_pathvqa_pkl_and_malicious_pickle_refused(tmp_path):
    qas = tmp_path / "pvqa" / "qas" / "test"
    qas.mkdir(parents=True)
    data = [{"image": "test_0001", "question": "What is present?", "answer": "necrosis"},
            {"image": "test_0001", "question": "Is this benign?", "answer": "no"},
            {"image": "test_0002", "question": "What stain?", "answer": "h&e"}]
    (qas / "test_qa.pkl").write_bytes(pickle.dumps(data))
    stand_in_images(tmp_path / "pvqa" / "images" / "test", ["test_0001.jpg", "test_0002.jpg"])
    assert run("--format", "pathvqa", "--input", qas / "test_qa.pkl", "--out", tmp_path / "o") == 0
    got = {k: json.loads(v["json"]) for k, v in samples(tmp_path / "o").items()}
    assert {k: len(m["qa"]) for k, m in got.items()} == {"pathvqa-test_0001": 2, "pathvqa-test_0002": 1}

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (qas / "evil_qa.pkl").write_bytes(pickle.dumps([Evil()]))
    assert run("--format", "pathvqa", "--input", qas / "evil_qa.pkl", "--out", tmp_path / "e") == 2
    assert not (tmp_path / "e").exists()


# --- pairs: CSV and JSONL with bad rows --------------------------------------------------------

def test_pairs_csv_exact_skip_counts(tmp_path):
    stand_in_images(tmp_path / "img", ["a.png", "b.png", "c.png", "d.png"])
    (tmp_path / "img" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt image
    (tmp_path / "pairs.csv").write_text(
        "image,caption,modality,labels\n"
        "a.png,Chest x-ray with a left nodule.,chest x-ray,nodule\n"
        "b.png,,chest x-ray,\n"  # empty caption
        "missing.png,A caption.,ct,\n"  # missing image
        "c.png,Head CT: no abnormality.,ct,none;normal\n"
        "d.png,Corrupt image.,ct,\n"
        ",No image path.,ct,\n")
    assert run("--format", "pairs", "--input", tmp_path / "pairs.csv", "--image-root", tmp_path / "img",
               "--out", tmp_path / "o", "--concepts", Path(__file__).parent.parent / "configs/concepts/medical.yaml") == 0
    s = summary(tmp_path / "o")
    assert s["written"] == 2 and s["read"] == 6
    assert s["skipped"] == {"missing_text": 1, "missing_image": 1, "bad_image": 1, "missing_image_path": 1}
    got = samples(tmp_path / "o")
    key_a, key_c = (private_key(tmp_path / "o", "pairs", n) for n in ("a.png", "c.png"))
    assert set(got) == {key_a, key_c} and key_a.startswith("pairs-") and len(key_a) == len("pairs-") + 20
    meta = json.loads(got[key_c]["json"])
    assert meta["labels"] == ["none", "normal"] and meta["modality"] == "ct"
    assert got[key_a]["png"] == (tmp_path / "img" / "a.png").read_bytes()  # untouched bytes kept
    assert any(c["name"] == "nodule" for c in json.loads(got[key_a]["json"])["concepts"])


def test_pairs_jsonl_resize_dedup_and_16bit(tmp_path):
    arr16 = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 20).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "x16.png")
    stand_in_images(tmp_path, ["a.png"], size=(80, 40))
    shutil.copy(tmp_path / "a.png", tmp_path / "a_copy.png")
    rows = [{"image": "x16.png", "caption": "sixteen bit"}, {"image": "a.png", "caption": "one"},
            {"image": "a_copy.png", "caption": "same pixels"}, "not an object"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad json\n")
    assert run("--format", "pairs", "--input", tmp_path / "p.jsonl", "--out", tmp_path / "o",
               "--max-size", "30", "--dedup") == 0
    s = summary(tmp_path / "o")
    assert s["written"] == 2 and s["duplicates"] == 1 and s["skipped"] == {"bad_row": 2}
    img = Image.open(io.BytesIO(samples(tmp_path / "o")[private_key(tmp_path / "o", "pairs", "x16.png")]["png"]))
    assert img.mode == "I;16" and img.size == (30, 20)
    assert np.asarray(img).max() > 255  # depth kept through the resize


def test_pairs_missing_columns_clear_error_nothing_written(tmp_path, capsys):
    (tmp_path / "p.csv").write_text("path,label\na.png,x\n")
    assert run("--format", "pairs", "--input", tmp_path / "p.csv", "--out", tmp_path / "o") == 2
    assert "no caption column" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_errors(tmp_path, capsys):
    assert run("--format", "nope", "--input", tmp_path, "--out", tmp_path / "o") == 2
    assert "unknown --format" in capsys.readouterr().err
    assert run("--format", "pairs", "--input", tmp_path / "none.csv", "--out", tmp_path / "o") == 2
    assert "not found" in capsys.readouterr().err
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    stand_in_images(tmp_path, ["a.png"])
    (tmp_path / "p.csv").write_text("image,caption\na.png,hello\n")
    assert run("--format", "pairs", "--input", tmp_path / "p.csv", "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run("--format", "pairs", "--input", tmp_path / "p.csv", "--out", out, "--overwrite") == 0
    assert (out / "keep.txt").exists() and read_manifest(out).num_samples == 1


# --- LLaVA conversations ------------------------------------------------------------------

def test_llava(tmp_path):
    recs = [{"id": "q1", "image": "a.png", "domain": {"chest_xray": True},
             "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                               {"from": "gpt", "value": "A chest x-ray."}]},
            {"id": "q2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"id": "q3", "image": "a.png", "conversations": [{"from": "robot", "value": "?"}]},
            {"id": "q4", "image": ["a.png", "b.png"],
             "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."},
                               {"from": "gpt", "value": "Same."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    stand_in_images(tmp_path, ["a.png", "b.png"])
    assert run("--format", "llava", "--input", tmp_path / "llava.json", "--out", tmp_path / "o") == 0
    got = samples(tmp_path / "o")
    assert set(got) == {"llava-q1", "llava-q4"} and "view1.png" in got["llava-q4"]
    assert summary(tmp_path / "o")["skipped"] == {"text_only": 1, "bad_conversation": 1}
    meta = json.loads(got["llava-q1"]["json"])
    assert meta["domain"] == {"chest_xray": True} and meta["conversations"][1]["value"] == "A chest x-ray."


# --- imagefolder ------------------------------------------------------------------------------

def test_imagefolder(tmp_path):
    stand_in_images(tmp_path / "cls", ["pneumonia/1.png", "pneumonia/2.png", "normal_lung/3.png"])
    assert run("--format", "imagefolder", "--input", tmp_path / "cls", "--out", tmp_path / "o",
               "--caption-template", "a chest x-ray showing {label}") == 0
    got = samples(tmp_path / "o")
    key = lambda rel: private_key(tmp_path / "o", "imagefolder", rel)  # noqa: E731
    assert set(got) == {key("normal_lung/3.png"), key("pneumonia/1.png"), key("pneumonia/2.png")}
    assert got[key("normal_lung/3.png")]["txt"] == b"a chest x-ray showing normal lung"
    assert json.loads(got[key("pneumonia/1.png")]["json"])["labels"] == ["pneumonia"]


# --- DICOM: real files from pydicom, no PHI anywhere -------------------------------------------

PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                "InstitutionAddress", "ReferringPhysicianName", "StudyDate", "SeriesDate", "AcquisitionDate",
                "ContentDate", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                "StudyID", "StationName", "OperatorsName", "StudyDescription", "SeriesDescription")


def _phi_values(files) -> set[str]:
    import pydicom

    values = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in PHI_KEYWORDS:
            if kw in ds and str(ds[kw].value).strip():
                v = str(ds[kw].value).strip()
                values.add(v)
                values.update(p for p in v.replace("^", " ").split() if len(p) >= 5)
    return values


def test_dicom_real_files_no_phi(tmp_path, caplog, capsys):
    names = ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "MR_truncated.dcm"]
    d = tmp_path / "dicom" / "DOE^JOHN"  # a PHI-looking folder name must not leak either
    d.mkdir(parents=True)
    for n in names:
        shutil.copy(PYDICOM_DATA / n, d / n)
    phi = _phi_values([d / n for n in names[:4]]) | {"DOE^JOHN"}
    assert any("CompressedSamples" in v for v in phi) and "JFK IMAGING CENTER" in phi
    assert shards_main(["--format", "dicom", "--input", str(tmp_path / "dicom"), "--out", str(tmp_path / "o"),
                        "--workers", "0"]) == 0
    logs = caplog.text + capsys.readouterr().err
    got = samples(tmp_path / "o")
    # 1 CT + 1 MR + 15 dose frames + 2 RGB frames; the truncated file is skipped and counted
    assert len(got) == 19 and summary(tmp_path / "o")["skipped"] == {"bad_dicom": 1}
    text = [p[e] for p in got.values() for e in p if e in ("json", "txt")]
    text += [(tmp_path / "o" / "manifest.json").read_bytes(), logs.encode(), "".join(got).encode()]
    pixels = [p[e] for p in got.values() for e in p if e.endswith("png")]
    for value in (v for v in phi if len(v) >= 4):  # "1" (a StudyID) occurs in any text
        for blob in text + (pixels if len(value) >= 8 else []):  # short strings occur in any binary
            assert value.encode() not in blob, f"PHI value {value!r} leaked"
    ct = next(json.loads(p["json"]) for p in got.values() if json.loads(p["json"]).get("modality") == "CT")
    assert ct["pixel_spacing"] and "rows" in ct
    img = Image.open(io.BytesIO(next(p["png"] for p in got.values() if json.loads(p["json"])["modality"] == "CT")))
    assert img.mode == "I;16" and np.asarray(img).max() == 65535  # windowed to the full 16-bit range
    frames = [json.loads(p["json"]) for p in got.values() if json.loads(p["json"])["modality"] == "RTDOSE"]
    assert sorted(m["frame"] for m in frames) == list(range(15))


def test_dicom_window_8bit_and_single_frame(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(PYDICOM_DATA / "CT_small.dcm", d)
    shutil.copy(PYDICOM_DATA / "rtdose.dcm", d)
    assert run("--format", "dicom", "--input", d, "--out", tmp_path / "o", "--window", "40,400", "--bit-depth", "8",
               "--frame", "3") == 0
    got = samples(tmp_path / "o")
    assert len(got) == 2
    for parts in got.values():
        assert Image.open(io.BytesIO(parts["png"])).mode == "L"
    assert run("--format", "dicom", "--input", d, "--out", tmp_path / "w", "--window", "40") == 2


# --- NIfTI: real volumes from nibabel ---------------------------------------------------------

def test_nifti_slices(tmp_path):
    import nibabel as nib

    vol = NIBABEL_DATA / "anatomical.nii"
    shape = nib.as_closest_canonical(nib.load(vol)).shape
    assert run("--format", "nifti", "--input", vol, "--out", tmp_path / "o", "--axis", "2") == 0
    got = samples(tmp_path / "o")
    assert len(got) == shape[2]
    meta = json.loads(next(iter(got.values()))["json"])
    assert meta["axis"] == "axial" and meta["num_slices"] == shape[2]
    assert run("--format", "nifti", "--input", NIBABEL_DATA / "example4d.nii.gz", "--out", tmp_path / "m",
               "--slices", "middle", "--axis", "0", "--volume", "1") == 0
    assert len(samples(tmp_path / "m")) == 1
    assert run("--format", "nifti", "--input", vol, "--out", tmp_path / "b", "--slices", "some") == 2
