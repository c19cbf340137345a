"""Hostile rows for every source format of data_prep.shards: the real annotation fixtures (IU X-Ray, SLAKE;
VQA-RAD's and PathVQA's official fields) corrupted one way at a time, each run in-process with exact exit
codes, exact counts written and skipped by reason in manifest.json, the exact first offender, and for a
file that cannot be read at all the exact one-line error naming it. Paths that leave the image root
(``..``, absolute, symlinks) are refused as ``outside_root`` unless --allow-outside-root; and no path text of
a patient-named folder reaches any output byte."""
from __future__ import annotations

import codecs
import contextlib
import copy
import errno
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from PIL import Image

from data_prep.shards import main as shards_main
from vlm.data.schema import read_manifest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
MB = 1_000_000
MAX_FIELD = 16 * 1024 * 1024


def draw(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", (8, 8), (shade * 37 % 255, 40, 90)).save(path, format=fmt)


def fixture(rel: str):
    return json.loads((FIXTURES / rel).read_text())


# --- the formats: base rows from the fixtures, how they are written, where their images live ----------------


@dataclass
class Fmt:
    name: str  # the --format
    file: str  # annotation file name, relative to the data folder
    rows: Callable[[], list]  # base rows (each a dict), from the real fixtures
    image_of: Callable[[dict], list]  # the image paths a row names
    set_image: Callable[[dict, str], None]
    label: Callable[[list, int], str]  # how the summary names row i (a row-level skip)
    root: str = "."  # image root, relative to the data folder
    grouped: bool = False  # VQA formats: one sample per image, rows grouped
    kind: str = "json"  # csv | tsv | jsonl | json | pkl | r2gen
    args: tuple = ()

    def base_written(self, rows) -> int:
        return len({tuple(self.image_of(r)) for r in rows}) if self.grouped else len(rows)


def iu_rows():
    train = fixture("iu_xray/annotation.json")["train"][:3]
    return [{"image": r["image_path"][0], "caption": r["report"]} for r in train]


def llava_rows():
    seen, out = set(), []
    for r in fixture("slake/train.json"):
        if r["q_lang"] == "en" and r["img_name"] not in seen and len(out) < 3:
            seen.add(r["img_name"])
            out.append({"id": f"slake-{r['qid']}", "image": r["img_name"],
                        "conversations": [{"from": "human", "value": "<image>\n" + r["question"]},
                                          {"from": "gpt", "value": r["answer"]}]})
    return out


def preference_rows():
    """IU X-Ray reports as preference pairs: both views, the report chosen, the report with a hallucinated
    prior-exam sentence rejected (the report-factuality recipe's pairs)."""
    return [{"id": r["id"], "images": r["image_path"], "prompt": "Write the findings of this chest X-ray.",
             "chosen": r["report"], "rejected": "Compared with the prior exam, unchanged. " + r["report"]}
            for r in fixture("iu_xray/annotation.json")["train"][:3]]


def _preference_set(row, value):
    row.pop("images", None)
    row["image"] = value


def slake_rows():
    return fixture("slake/train.json")


def _vqa_rad(qid, phrase_type, image, organ, question, qtype, answer, atype):
    """A record with every field of VQA-RAD's official file (values written for the test)."""
    return {"qid": qid, "phrase_type": phrase_type, "qid_linked_id": f"l{qid}", "image_case_url": "u",
            "image_name": image, "image_organ": organ, "evaluation": "given", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": qtype, "answer": answer, "answer_type": atype}


VQA_RAD = [_vqa_rad(1, "freeform", "synpic1.jpg", "HEAD", "Is there a bleed?", "PRES", "Yes", "CLOSED"),
           _vqa_rad(2, "test_freeform", "synpic1.jpg", "HEAD", "Where is the lesion?", "POS", "left frontal lobe",
                    "OPEN"),
           _vqa_rad(3, "test_para", "synpic2.jpg", "CHEST", "Is the heart enlarged?", "SIZE", "No", "CLOSED"),
           _vqa_rad(4, "freeform", "synpic1.jpg", "HEAD", "Is this a CT?", "MODALITY", "yes", "CLOSED")]

PATHVQA = [{"image": "test_0001", "question": "What is present?", "answer": "necrosis"},
           {"image": "test_0001", "question": "Is this benign?", "answer": "no"},
           {"image": "test_0002", "question": "What stain?", "answer": "h&e"}]


def _set(key):
    def set_image(row, value):
        row[key] = value
    return set_image


def _r2gen_set(row, value):
    row["image_path"] = [value]


FORMATS = {
    "pairs.csv": Fmt("pairs", "pairs.csv", iu_rows, lambda r: [r["image"]], _set("image"),
                     lambda rows, i: f"pairs.csv line {i + 2}", kind="csv"),
    "pairs.tsv": Fmt("pairs", "pairs.tsv", iu_rows, lambda r: [r["image"]], _set("image"),
                     lambda rows, i: f"pairs.tsv line {i + 2}", kind="tsv"),
    "pairs.jsonl": Fmt("pairs", "pairs.jsonl", iu_rows, lambda r: [r["image"]], _set("image"),
                       lambda rows, i: f"pairs.jsonl line {i + 1}", kind="jsonl"),
    "pairs.json": Fmt("pairs", "pairs.json", iu_rows, lambda r: [r["image"]], _set("image"),
                      lambda rows, i: f"pairs.json record {i}", kind="json"),
    "llava.json": Fmt("llava", "llava.json", llava_rows, lambda r: [r["image"]], _set("image"),
                      lambda rows, i: f"record {i} (id {rows[i]['id']})", kind="json"),
    "llava.jsonl": Fmt("llava", "llava.jsonl", llava_rows, lambda r: [r["image"]], _set("image"),
                       lambda rows, i: f"line {i + 1} (id {rows[i]['id']})", kind="jsonl"),
    "preference.jsonl": Fmt("preference", "preference.jsonl", preference_rows,
                            lambda r: r["images"] if "images" in r else [r["image"]], _preference_set,
                            lambda rows, i: f"line {i + 1} (id {rows[i]['id']})", kind="jsonl"),
    "preference.json": Fmt("preference", "preference.json", preference_rows,
                           lambda r: r["images"] if "images" in r else [r["image"]], _preference_set,
                           lambda rows, i: f"record {i} (id {rows[i]['id']})", kind="json"),
    "r2gen": Fmt("r2gen", "annotation.json", lambda: fixture("iu_xray/annotation.json")["train"][:3],
                 lambda r: r["image_path"], _r2gen_set, lambda rows, i: f"train[{i}] id {rows[i]['id']}",
                 root="images", kind="r2gen"),
    "slake": Fmt("slake", "train.json", slake_rows, lambda r: [r["img_name"]] if r["q_lang"] == "en" else [],
                 _set("img_name"), lambda rows, i: f"record {i}", root="imgs", grouped=True),
    "vqa_rad": Fmt("vqa_rad", "VQA_RAD Dataset Public.json", lambda: copy.deepcopy(VQA_RAD),
                   lambda r: [r["image_name"], r["phrase_type"].startswith("test")], _set("image_name"),
                   lambda rows, i: f"record {i}", root="VQA_RAD Image Folder", grouped=True),
    "pathvqa": Fmt("pathvqa", "qas/test/test_qa.pkl", lambda: copy.deepcopy(PATHVQA),
                   lambda r: [r["image"] if Path(r["image"]).suffix else r["image"] + ".jpg"], _set("image"),
                   lambda rows, i: f"record {i}",
                   root="images/test", grouped=True, kind="pkl"),
}


def serialize(fmt: Fmt, rows: list, *, escaped: bool = False) -> bytes:
    """The annotation's bytes; ``escaped``: JSON in ASCII with \\u escapes, which can carry a lone surrogate
    (\\ud800) that no UTF-8 file can."""
    if fmt.kind in ("csv", "tsv"):
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if fmt.kind == "tsv" else ",", lineterminator="\n")
        w.writerow(["image", "caption"])
        w.writerows([[r.get("image"), r.get("caption")] for r in rows])
        return buf.getvalue().encode()
    if fmt.kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=escaped) + "\n" for r in rows).encode()
    if fmt.kind == "pkl":
        return pickle.dumps(rows)
    if fmt.kind == "r2gen":
        return json.dumps({"train": rows, "val": [], "test": []}, indent=1, ensure_ascii=escaped).encode()
    return json.dumps(rows, indent=1, ensure_ascii=escaped).encode()


class Case:
    """One corrupted input: rows and bytes of the annotation, extra arguments, the images it names."""

    def __init__(self, tmp: Path, fmt: Fmt):
        self.tmp, self.fmt = tmp, fmt
        self.data = tmp / "data"
        self.root = self.data / fmt.root
        self.input = self.data / fmt.file
        self.out = tmp / "out"
        self.outside = tmp / "outside.png"  # a valid image outside the root: written only when allowed
        draw(self.outside, 7)
        self.rows = fmt.rows()
        self.extra: list[str] = []
        self.raw: bytes | None = None

    def images(self) -> set[str]:
        """The images the rows name inside the root (rows corrupted past naming one name none)."""
        names = set()
        for r in self.rows:
            try:
                names.update(p for p in self.fmt.image_of(r)
                             if isinstance(p, str) and p and not p.startswith(("..", "/")))
            except (KeyError, TypeError, AttributeError):
                continue
        return names

    def write(self, mutate_bytes=None) -> None:
        for i, name in enumerate(sorted(self.images())):
            if not (self.root / name).exists() and not (self.root / name).is_symlink():
                draw(self.root / name, i)
        self.input.parent.mkdir(parents=True, exist_ok=True)
        data = serialize(self.fmt, self.rows)
        self.raw = mutate_bytes(data) if mutate_bytes else data
        self.input.write_bytes(self.raw)

    def run(self, capsys, workers: int = 0) -> tuple[int, str]:
        rc = shards_main(["--format", self.fmt.name, "--input", str(self.input), "--image-root", str(self.root),
                          "--out", str(self.out), "--workers", str(workers), "--quiet", *self.fmt.args, *self.extra])
        return rc, capsys.readouterr().err

    def expect(self, capsys, *, written: int, skipped: dict | None = None, first: dict | None = None,
               renamed: int = 0, workers: int = 0) -> dict:
        rc, err = self.run(capsys, workers)
        assert rc == (0 if written else 1), err
        s = read_manifest(self.out).extra["summary"]
        assert (s["written"], s["skipped"], s["renamed_keys"]) == (written, skipped or {}, renamed), err
        for reason, text in (first or {}).items():
            assert s["offenders"][reason][0] == text
        return s

    def expect_error(self, capsys, message: str) -> None:
        rc, err = self.run(capsys)
        assert rc == 2 and err.splitlines() == [f"error: {message}"], err
        assert not self.out.exists()  # refused before anything was written


def utf8_error(path: Path, raw: bytes) -> str:
    bad = raw.index(b"\xe9")
    line = raw[:bad].count(b"\n") + 1
    return f"{path}: not UTF-8 text: byte 0xe9 at offset {bad} (line {line}); save the file as UTF-8"


def latin1_at_line2(data: bytes) -> bytes:
    k = data.index(b"\n") + 1
    return data[:k] + b"\xe9" + data[k:]


def json_error(path: Path, raw: bytes) -> str:
    try:
        json.loads(raw.decode())
    except json.JSONDecodeError as e:
        return f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    raise AssertionError("the corruption left valid JSON")


TEXT_FORMATS = [k for k, f in FORMATS.items() if f.kind != "pkl"]
ROW_INDEX = 1  # the row each per-row case corrupts (0 for grouped formats: its image keeps other rows)


def row_of(fmt: Fmt) -> int:
    return 0 if fmt.grouped else ROW_INDEX


# --- the same corruptions for every format ---------------------------------------------------------------


@pytest.mark.parametrize("fid", list(FORMATS))
def test_base_fixture_is_clean(tmp_path, capsys, fid):
    """The control of every case below (not a drill case): the fixture records as they are, all written."""
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    c.write()
    c.expect(capsys, written=fmt.base_written([r for r in c.rows if fmt.image_of(r)]))


@pytest.mark.parametrize("fid", TEXT_FORMATS)
def test_non_utf8_bytes_one_line_error(tmp_path, capsys, drill, fid):
    c = Case(tmp_path, FORMATS[fid])
    c.write(latin1_at_line2)
    with drill.input(f"{fid}: a Latin-1 byte (0xe9) on line 2"):
        c.expect_error(capsys, utf8_error(c.input, c.raw))


@pytest.mark.parametrize("fid", TEXT_FORMATS)
def test_byte_order_mark_is_read(tmp_path, capsys, drill, fid):
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    c.write(lambda data: codecs.BOM_UTF8 + data)
    rows = [r for r in c.rows if fmt.image_of(r)]
    with drill.input(f"{fid}: a UTF-8 byte-order mark"):
        c.expect(capsys, written=fmt.base_written(rows))


def test_bom_then_latin1_offset_counts_the_bom(tmp_path, capsys, drill):
    c = Case(tmp_path, FORMATS["pairs.csv"])
    c.write(lambda data: codecs.BOM_UTF8 + latin1_at_line2(data))
    with drill.input("pairs.csv: a BOM and a Latin-1 byte: the offset is of the file's bytes"):
        c.expect_error(capsys, utf8_error(c.input, c.raw))
        assert c.raw.index(b"\xe9") == 3 + len("image,caption\n")


@pytest.mark.parametrize("fid", [k for k, f in FORMATS.items() if f.kind in ("json", "r2gen")])
def test_truncated_json_one_line_error(tmp_path, capsys, drill, fid):
    c = Case(tmp_path, FORMATS[fid])
    c.write(lambda data: data[: len(data) // 2])
    with drill.input(f"{fid}: a JSON file cut in half"):
        c.expect_error(capsys, json_error(c.input, c.raw))


WHERE = {"dotdot": "a ../ path", "absolute": "an absolute path", "symlink": "a symlink in the root to a file outside"}


def outside_path(c: Case, how: str) -> str:
    if how == "dotdot":
        return os.path.relpath(c.outside, c.root)
    if how == "absolute":
        return str(c.outside)
    c.root.mkdir(parents=True, exist_ok=True)
    (c.root / "escape.png").symlink_to(c.outside)
    return "escape.png"


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
@pytest.mark.parametrize("how", list(WHERE))
@pytest.mark.parametrize("fid", list(FORMATS))
def test_paths_leaving_the_root(tmp_path, capsys, drill, fid, how, allow):
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    i = row_of(fmt)
    base = fmt.base_written([r for r in c.rows if fmt.image_of(r)])
    fmt.set_image(c.rows[i], outside_path(c, how))
    c.write()
    lose = 0 if fmt.grouped else 1  # grouped: the image the row named keeps its other questions
    name = f"{fid}: {WHERE[how]} " + ("with --allow-outside-root (read)" if allow else "(refused, counted)")
    with drill.hole(name):
        if allow:
            c.extra = ["--allow-outside-root"]
            c.expect(capsys, written=base - lose + 1)
        else:
            c.expect(capsys, written=base - lose, skipped={"outside_root": 1},
                     first={"outside_root": fmt.label(c.rows, i)})


# a row naming an image that is not there, or a text file named .png: (file name, how the file is spoiled, drill
# name, reason, detail after the offender's label)
SPOILED_IMAGES = {
    "missing": ("gone.png", lambda f: f.unlink(), "a row naming a missing image file", "missing_image", ""),
    "not_an_image": ("notes.png", lambda f: f.write_text("root:x:0:0:root:/root:/bin/bash\n"), "a text file named .png",
                     "bad_image", " (cannot identify image file)"),
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fid", list(FORMATS))
@pytest.mark.parametrize("spoil", list(SPOILED_IMAGES))
def test_spoiled_image_file(tmp_path, capsys, drill, fid, workers, spoil):
    name, damage, what, reason, detail = SPOILED_IMAGES[spoil]
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    i = row_of(fmt)
    base = fmt.base_written([r for r in c.rows if fmt.image_of(r)])
    fmt.set_image(c.rows[i], name)
    c.write()
    damage(c.root / name)
    stem = name.removesuffix(".png")
    label = (f"image train-{stem}" if fid == "vqa_rad" else f"image {name}") if fmt.grouped else fmt.label(c.rows, i)
    with drill.input(f"{fid}: {what} ({workers} workers)"):
        c.expect(capsys, written=base - (0 if fmt.grouped else 1), skipped={reason: 1},
                 first={reason: f"{label}{detail}"}, workers=workers)


@pytest.mark.parametrize("fid", list(FORMATS))
def test_duplicate_row(tmp_path, capsys, drill, fid):
    """Ungrouped formats keep both copies under unique keys (as before: a -1 suffix, counted); grouped VQA
    formats count the repeated question as duplicate_row instead of asking it twice."""
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    base = fmt.base_written([r for r in c.rows if fmt.image_of(r)])
    c.rows.append(copy.deepcopy(c.rows[0]))
    c.write()
    with drill.input(f"{fid}: a row repeated"):
        if fmt.grouped:
            c.expect(capsys, written=base, skipped={"duplicate_row": 1},
                     first={"duplicate_row": fmt.label(c.rows, len(c.rows) - 1)})
        else:
            c.expect(capsys, written=base + 1, renamed=1)


@pytest.mark.parametrize("fid", [k for k in FORMATS if k != "pathvqa"])
def test_one_megabyte_text(tmp_path, capsys, drill, fid):
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    row = c.rows[row_of(fmt)]
    long = ("No acute cardiopulmonary abnormality. " * (MB // 38 + 1))[:MB]
    if "caption" in row:
        row["caption"] = long
    elif "conversations" in row:
        row["conversations"][1]["value"] = long
    elif "report" in row:
        row["report"] = long
    elif "chosen" in row:  # preference: the chosen response is the sample's .txt
        row["chosen"] = long
    else:
        row["answer"] = long
    c.write()
    with drill.input(f"{fid}: a 1 MB caption / report / answer"):
        c.expect(capsys, written=fmt.base_written([r for r in c.rows if fmt.image_of(r)]))
        from data_prep.inspect import scan_shard

        m = read_manifest(c.out)
        texts = [p.get("txt", p["json"]) for s in m.shards for _, p in scan_shard(c.out / s.name)]
        assert any(long.encode() in t for t in texts)


# --- format-specific rows: missing keys, empty fields, wrong types --------------------------------------


def _pairs_case(tmp_path, fid, rows_fn):
    c = Case(tmp_path, FORMATS[fid])
    rows_fn(c.rows)
    c.write()
    return c


PAIRS_ROWS = [  # (case, mutation of row 1, skip reason, detail)
    ("empty caption", lambda r: r.update(caption=""), "missing_text", ""),
    ("blank caption", lambda r: r.update(caption="   "), "missing_text", ""),
    ("empty image path", lambda r: r.update(image=""), "missing_image_path", ""),
]
PAIRS_JSON_ROWS = [
    ("no caption key", lambda r: r.pop("caption"), "missing_text", ""),
    ("no image key", lambda r: r.pop("image"), "missing_image_path", ""),
    ("caption null", lambda r: r.update(caption=None), "missing_text", ""),
    ("caption a number", lambda r: r.update(caption=42), "bad_row", "caption is a number, not a string"),
    ("caption a list", lambda r: r.update(caption=["a", "b"]), "bad_row", "caption is a list, not a string"),
    ("caption an object", lambda r: r.update(caption={"t": 1}), "bad_row", "caption is an object, not a string"),
    ("image a number", lambda r: r.update(image=5), "bad_row", "image is a number, not a string"),
    ("image a list", lambda r: r.update(image=["a.png"]), "bad_row", "image is a list, not a string"),
    ("image true", lambda r: r.update(image=True), "bad_row", "image is a boolean, not a string"),
    ("labels an object", lambda r: r.update(labels={"a": 1}), "bad_row", "labels is an object, not a list"),
    ("labels holding numbers", lambda r: r.update(labels=[1, 2]), "bad_row", "labels holds a number"),
    ("labels bad JSON text", lambda r: r.update(labels="[1,"), "bad_row", "labels is not a valid JSON list"),
    ("concepts holding null", lambda r: r.update(concepts=[None]), "bad_row", "concepts holds null"),
    ("modality a list", lambda r: r.update(modality=["ct"]), "bad_row", "modality is a list, not a string"),
    ("source a number", lambda r: r.update(source=3), "bad_row", "source is a number, not a string"),
]


@pytest.mark.parametrize("fid", ["pairs.csv", "pairs.jsonl", "pairs.json"])
@pytest.mark.parametrize("case,mutate,reason,detail", PAIRS_ROWS, ids=[x[0] for x in PAIRS_ROWS])
def test_pairs_empty_fields(tmp_path, capsys, drill, fid, case, mutate, reason, detail):
    c = _pairs_case(tmp_path, fid, lambda rows: mutate(rows[1]))
    label = FORMATS[fid].label(c.rows, 1)
    with drill.input(f"{fid}: {case}"):
        c.expect(capsys, written=2, skipped={reason: 1}, first={reason: f"{label} ({detail})" if detail else label})


@pytest.mark.parametrize("fid", ["pairs.jsonl", "pairs.json"])
@pytest.mark.parametrize("case,mutate,reason,detail", PAIRS_JSON_ROWS, ids=[x[0] for x in PAIRS_JSON_ROWS])
def test_pairs_wrong_types(tmp_path, capsys, drill, fid, case, mutate, reason, detail):
    c = _pairs_case(tmp_path, fid, lambda rows: mutate(rows[1]))
    label = FORMATS[fid].label(c.rows, 1)
    with drill.input(f"{fid}: {case}"):
        c.expect(capsys, written=2, skipped={reason: 1}, first={reason: f"{label} ({detail})" if detail else label})


def test_pairs_csv_without_caption_column(tmp_path, capsys, drill):
    c = Case(tmp_path, FORMATS["pairs.csv"])
    c.write(lambda data: b"image\n" + b"\n".join(line.split(b",")[0] for line in data.splitlines()[1:]) + b"\n")
    with drill.input("pairs.csv: no caption column"):
        c.expect_error(capsys, f"{c.input}: no caption column (looked for caption, text, report, title, "
                               "caption_text); columns are ['image']")


@pytest.mark.parametrize("line,reason,detail", [
    ("CXR1.png,a,b", "bad_row", "3 fields, the header has 2"),
    ("CXR1.png", "missing_text", ""),
    ('CXR1.png,"unterminated', "bad_row", "not valid CSV: unexpected end of data"),
    ('CXR1.png,"quoted"tail', "bad_row", "not valid CSV: ',' expected after '\"'"),
], ids=["extra field", "missing field", "unterminated quote", "text after a quote"])
def test_pairs_csv_malformed_line(tmp_path, capsys, drill, line, reason, detail):
    """The malformed line is the table's last: every row before it is written."""
    c = Case(tmp_path, FORMATS["pairs.csv"])
    c.write(lambda data: data + line.encode() + b"\n")
    label = "pairs.csv line 5"
    with drill.input(f"pairs.csv: {reason} ({line})"):
        c.expect(capsys, written=3, skipped={reason: 1}, first={reason: f"{label} ({detail})" if detail else label})


@pytest.mark.parametrize("fid", ["pairs.csv", "pairs.tsv"])
def test_pairs_field_over_the_limit_is_one_bad_row(tmp_path, capsys, drill, fid):
    """A caption over 16 MiB (csv's own limit was 128 KiB: a 1 MB caption raised a traceback) is one
    bad_row naming its line; the rows after it are read."""
    c = Case(tmp_path, FORMATS[fid])
    c.rows[1]["caption"] = "x" * (MAX_FIELD + 1)
    c.write()
    with drill.input(f"{fid}: a field of 16 MiB + 1 in row 2 of 3"):
        c.expect(capsys, written=2, skipped={"bad_row": 1},
                 first={"bad_row": f"{c.input.name} line 3 (field 2 is longer than {MAX_FIELD} characters)"})


@pytest.mark.parametrize("fid", ["pairs.jsonl", "llava.jsonl", "preference.jsonl"])
def test_invalid_json_lines(tmp_path, capsys, drill, fid):
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    n = len(c.rows)
    c.write(lambda data: data + b'{"image": "a.png", \n[1, 2]\n\nnull\n"text"\n' + b"[" * 100_000 + b"\n")
    with drill.input(f"{fid}: bad JSON, a list, null, a string, deep nesting on their own lines"):
        s = c.expect(capsys, written=n, skipped={"bad_row": 5})
        prefix = "pairs.jsonl " if fmt.name == "pairs" else ""
        assert s["offenders"]["bad_row"] == [f"{prefix}line {k} ({d})" for k, d in [
            (n + 1, "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 20"),
            (n + 2, "a list, not an object"), (n + 4, "null, not an object"), (n + 5, "a string, not an object"),
            (n + 6, "not valid JSON: nested too deeply")]]


LLAVA_ROWS = [
    ("no conversations key", lambda r: r.pop("conversations"), "bad_conversation", ""),
    ("a turn's value a number", lambda r: r["conversations"][1].update(value=3), "bad_conversation", ""),
    ("conversations a string", lambda r: r.update(conversations="hi"), "bad_conversation", ""),
    ("no image key", lambda r: r.pop("image"), "text_only", ""),
    ("empty image", lambda r: r.update(image=""), "text_only", ""),
    ("image a number", lambda r: r.update(image=5), "bad_row", "image holds a number, not a path"),
    ("image list holding null", lambda r: r.update(image=["a.png", None]), "bad_row", "image holds null, not a path"),
    ("modality a list", lambda r: r.update(modality=["ct"]), "bad_row", "modality is a list, not a string"),
]


@pytest.mark.parametrize("fid", ["llava.json", "llava.jsonl"])
@pytest.mark.parametrize("case,mutate,reason,detail", LLAVA_ROWS, ids=[x[0] for x in LLAVA_ROWS])
def test_llava_rows(tmp_path, capsys, drill, fid, case, mutate, reason, detail):
    _one_mutated_row(tmp_path, capsys, drill, fid, case, mutate, reason, detail)


def _one_mutated_row(tmp_path, capsys, drill, fid, case, mutate, reason, detail):
    """Row 1 of the format's good file mutated: the other two written, it skipped under ``reason``, named by its
    label (and ``detail``)."""
    c = Case(tmp_path, FORMATS[fid])
    mutate(c.rows[1])
    c.write()
    label = FORMATS[fid].label(c.rows, 1)
    with drill.input(f"{fid}: {case}"):
        c.expect(capsys, written=2, skipped={reason: 1}, first={reason: f"{label} ({detail})" if detail else label})


@pytest.mark.parametrize("rid,shown", [(["a"], "a list"), (None, "null"), ({"x": 1}, "an object"), (True, "a boolean")])
def test_llava_id_of_wrong_type(tmp_path, capsys, drill, rid, shown):
    c = Case(tmp_path, FORMATS["llava.json"])
    c.rows[1]["id"] = rid
    c.write()
    with drill.input(f"llava.json: id {shown}"):
        c.expect(capsys, written=2, skipped={"bad_row": 1},
                 first={"bad_row": f"record 1 (id is {shown}, not a string)"})


PREFERENCE_ROWS = [  # (case, mutation of row 1, skip reason, detail)
    ("no chosen key", lambda r: r.pop("chosen"), "missing_response", "no chosen"),
    ("rejected null", lambda r: r.update(rejected=None), "missing_response", "no rejected"),
    ("chosen blank", lambda r: r.update(chosen=" \n"), "empty_response", "chosen is blank"),
    ("rejected empty", lambda r: r.update(rejected=""), "empty_response", "rejected is blank"),
    ("the same response twice", lambda r: r.update(rejected=" " + r["chosen"] + "\n"), "identical_pair", ""),
    ("chosen a number", lambda r: r.update(chosen=3), "bad_row", "chosen is a number, not a string"),
    ("rejected a list", lambda r: r.update(rejected=["a"]), "bad_row", "rejected is a list, not a string"),
    ("prompt an object", lambda r: r.update(prompt={"q": 1}), "bad_row", "prompt is an object, not a string"),
    ("prompt and conversations", lambda r: r.update(conversations=[{"from": "human", "value": "q"}]), "bad_row",
     "prompt and conversations are both given; use one"),
    ("image and images", lambda r: r.update(image="x.png"), "bad_row", "image and images are both given; use one"),
    ("images holding null", lambda r: r.update(images=["a.png", None]), "bad_row", "images holds null, not a path"),
    ("images a number", lambda r: r.update(images=5), "bad_row", "images holds a number, not a path"),
    ("modality a list", lambda r: r.update(modality=["ct"]), "bad_row", "modality is a list, not a string"),
    ("no prompt key", lambda r: r.pop("prompt"), "bad_conversation", "no prompt or conversations"),
    ("blank prompt", lambda r: r.update(prompt="  "), "bad_conversation", "blank prompt"),
    ("conversations a string", lambda r: (r.pop("prompt"), r.update(conversations="hi")), "bad_conversation",
     "conversations is a string, not a list of turns"),
    ("conversations ending with an answer", lambda r: (r.pop("prompt"), r.update(conversations=[
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])), "bad_conversation",
     "the last turn is not a human turn with text"),
    ("a turn's value a number", lambda r: (r.pop("prompt"), r.update(conversations=[{"from": "human", "value": 3}])),
     "bad_conversation", "turn 0 is not an object with a known from and a string value"),
    ("an empty answer turn", lambda r: (r.pop("prompt"), r.update(conversations=[
        {"from": "human", "value": "q"}, {"from": "gpt", "value": " "}, {"from": "human", "value": "q2"}])),
     "bad_conversation", "turn 1 is an empty answer"),
    ("no image key", lambda r: r.pop("images"), "text_only", ""),
    ("images an empty list", lambda r: r.update(images=[]), "text_only", ""),
    ("one placeholder for two images", lambda r: r.update(prompt="<image>\nWrite the findings."),
     "image_token_mismatch", "1 placeholder(s) for 2 image(s)"),
    ("a placeholder in chosen", lambda r: r.update(chosen="<image> " + r["chosen"]), "image_token_mismatch",
     "an image placeholder in chosen"),
]


@pytest.mark.parametrize("fid", ["preference.json", "preference.jsonl"])
@pytest.mark.parametrize("case,mutate,reason,detail", PREFERENCE_ROWS, ids=[x[0] for x in PREFERENCE_ROWS])
def test_preference_rows(tmp_path, capsys, drill, fid, case, mutate, reason, detail):
    _one_mutated_row(tmp_path, capsys, drill, fid, case, mutate, reason, detail)


@pytest.mark.parametrize("rid,shown", [(["a"], "a list"), (None, "null"), (True, "a boolean")])
def test_preference_id_of_wrong_type(tmp_path, capsys, drill, rid, shown):
    c = Case(tmp_path, FORMATS["preference.jsonl"])
    c.rows[1]["id"] = rid
    c.write()
    with drill.input(f"preference.jsonl: id {shown}"):
        c.expect(capsys, written=2, skipped={"bad_row": 1}, first={"bad_row": f"line 2 (id is {shown}, not a string)"})


R2GEN_ROWS = [
    ("no id", lambda r: r.pop("id"), "bad_row", "train[1] (no id)"),
    ("id null", lambda r: r.update(id=None), "bad_row", "train[1] (id is null, not a string)"),
    ("id a list", lambda r: r.update(id=[1]), "bad_row", "train[1] (id is a list, not a string)"),
    ("no report", lambda r: r.pop("report"), "missing_text", "train[1] id {id}"),
    ("empty report", lambda r: r.update(report=" "), "missing_text", "train[1] id {id}"),
    ("report a list", lambda r: r.update(report=["a"]), "bad_row", "train[1] id {id} (report is a list, not a string)"),
    ("report a number", lambda r: r.update(report=1), "bad_row", "train[1] id {id} (report is a number, not a string)"),
    ("no image_path", lambda r: r.pop("image_path"), "missing_image_path", "train[1] id {id}"),
    ("image_path empty list", lambda r: r.update(image_path=[]), "missing_image_path", "train[1] id {id}"),
    ("image_path holding a number", lambda r: r.update(image_path=["a.png", 5]), "bad_row",
     "train[1] id {id} (image_path holds a number, not a path)"),
    ("image_path an object", lambda r: r.update(image_path={"a": 1}), "bad_row",
     "train[1] id {id} (image_path holds an object, not a path)"),
]


@pytest.mark.parametrize("case,mutate,reason,label", R2GEN_ROWS, ids=[x[0] for x in R2GEN_ROWS])
def test_r2gen_rows(tmp_path, capsys, drill, case, mutate, reason, label):
    c = Case(tmp_path, FORMATS["r2gen"])
    rid = c.rows[1]["id"]
    mutate(c.rows[1])
    c.write()
    with drill.input(f"r2gen: {case}"):
        c.expect(capsys, written=2, skipped={reason: 1}, first={reason: label.format(id=rid)})


def test_r2gen_split_not_a_list(tmp_path, capsys, drill):
    c = Case(tmp_path, FORMATS["r2gen"])
    c.write(lambda data: json.dumps({"train": {"id": 1}}).encode())
    with drill.input("r2gen: a split that is an object"):
        c.expect_error(capsys, f"{c.input}: split 'train' is an object, not a list of records")


VQA_ROWS = [  # (case, mutation of row 0, reason, detail); row 0's image keeps its other questions
    ("no answer key", lambda r, k: r.pop("answer"), "bad_row", "no question or answer"),
    ("empty question", lambda r, k: r.update(question=""), "bad_row", "no question or answer"),
    ("answer null", lambda r, k: r.update(answer=None), "bad_row", "no question or answer"),
    ("question a number", lambda r, k: r.update(question=7), "bad_row", "question is a number, not a string"),
    ("answer a list", lambda r, k: r.update(answer=["yes"]), "bad_row", "answer is a list, not a string"),
    ("answer a boolean", lambda r, k: r.update(answer=True), "bad_row", "answer is a boolean, not a string"),
    ("no image key", lambda r, k: r.pop(k), "missing_image_path", ""),
    ("image empty", lambda r, k: r.update({k: ""}), "missing_image_path", ""),
    ("image a list", lambda r, k: r.update({k: ["a.jpg"]}), "bad_row", "{k} is a list, not a string"),
    ("row a string", None, "bad_row", "a string, not an object"),
    ("row null", None, "bad_row", "null, not an object"),
]
IMAGE_KEY = {"slake": "img_name", "vqa_rad": "image_name", "pathvqa": "image"}


@pytest.mark.parametrize("fid", ["slake", "vqa_rad", "pathvqa"])
@pytest.mark.parametrize("case,mutate,reason,detail", VQA_ROWS, ids=[x[0] for x in VQA_ROWS])
def test_vqa_rows(tmp_path, capsys, drill, fid, case, mutate, reason, detail):
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    base = fmt.base_written([r for r in c.rows if fmt.image_of(r)])
    key = IMAGE_KEY[fid]
    c.write()  # the images of the intact rows
    if mutate is None:
        c.rows[0] = "xmlab" if case == "row a string" else None
    else:
        mutate(c.rows[0], key)
    c.input.write_bytes(serialize(fmt, c.rows))
    d = detail.format(k=key)
    with drill.input(f"{fid}: {case}"):
        c.expect(capsys, written=base, skipped={reason: 1}, first={reason: f"record 0 ({d})" if d else "record 0"})


def test_vqa_answer_number_is_text(tmp_path, capsys, drill):
    """VQA answers may be numbers (a count): kept as text, not skipped."""
    c = Case(tmp_path, FORMATS["vqa_rad"])
    c.rows[0]["answer"] = 2
    c.write()
    with drill.input("vqa_rad: an answer that is the number 2"):
        c.expect(capsys, written=3)


def test_slake_row_without_q_lang(tmp_path, capsys, drill):
    c = Case(tmp_path, FORMATS["slake"])
    c.rows[0].pop("q_lang")
    c.write()
    with drill.input("slake: a record without q_lang"):
        c.expect(capsys, written=10, skipped={"bad_row": 1}, first={"bad_row": "record 0 (no q_lang)"})


@pytest.mark.parametrize("fid,message", [
    ("slake", "expected SLAKE's list of records with img_name, question, answer"),
    ("vqa_rad", "expected VQA-RAD's list of records with image_name, question, answer, phrase_type"),
])
def test_vqa_layout_without_required_keys(tmp_path, capsys, drill, fid, message):
    c = Case(tmp_path, FORMATS[fid])
    for r in c.rows:
        r.pop("answer")
    c.write()
    with drill.input(f"{fid}: no record has an answer key"):
        c.expect_error(capsys, f"{c.input}: {message}")


def test_pathvqa_truncated_pickle(tmp_path, capsys, drill):
    c = Case(tmp_path, FORMATS["pathvqa"])
    c.write(lambda data: data[: len(data) // 2])
    with drill.input("pathvqa: a pkl cut in half"):
        c.expect_error(capsys, f"{c.input}: not a plain-data pickle (pickle data was truncated)")


# --- imagefolder: links and names ----------------------------------------------------------------------


def image_folder(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "cls"
    for i, name in enumerate(["effusion/1.png", "effusion/2.png", "normal/3.png", "normal/sub/4.jpg"]):
        draw(root / name, i)
    outside = tmp / "elsewhere"
    draw(outside / "secret.png", 9)
    draw(outside / "more" / "x.png", 8)
    return root, outside


def run_folder(capsys, root: Path, out: Path, *extra) -> tuple[int, dict]:
    rc = shards_main(["--format", "imagefolder", "--input", str(root), "--out", str(out), "--workers", "0",
                      "--quiet", *extra])
    err = capsys.readouterr().err
    return rc, (read_manifest(out).extra["summary"] if rc in (0, 1) else {"err": err})


FOLDER_LINKS = {  # link inside the root -> its target, what is refused (first offender) without the flag
    "file link to outside": ("normal/zz.png", "secret.png", "class normal file 3", 1),
    "sub-folder link to outside": ("normal/sublink", ".", "class normal file 3", 2),
    "class folder link to outside": ("aaa", ".", "entry 1", 2),
}


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
@pytest.mark.parametrize("case", list(FOLDER_LINKS))
def test_imagefolder_links_leaving_the_root(tmp_path, capsys, drill, case, allow):
    root, outside = image_folder(tmp_path)
    link, target, first, n_outside = FOLDER_LINKS[case]
    (root / link).symlink_to(outside / target if target != "." else outside)
    with drill.hole(f"imagefolder: {case} " + ("with --allow-outside-root (read)" if allow else "(refused, counted)")):
        rc, s = run_folder(capsys, root, tmp_path / "o", *(["--allow-outside-root"] if allow else []))
        assert rc == 0
        if allow:
            assert (s["written"], s["skipped"]) == (4 + n_outside, {})
        else:
            assert (s["written"], s["skipped"]) == (4, {"outside_root": 1})
            assert s["offenders"]["outside_root"] == [first]


def test_imagefolder_links_inside_and_loops(tmp_path, capsys, drill):
    """Links that stay inside are followed; a folder reached twice (or a loop) is read once."""
    root, _ = image_folder(tmp_path)
    (root / "normal" / "again").symlink_to(root / "normal")  # a loop
    (root / "normal" / "eff").symlink_to("../effusion")  # the other class, reached again
    (root / "normal" / "one.png").symlink_to("3.png")  # a second name of an image: a second sample
    with drill.input("imagefolder: a link loop, a folder reached twice, a file link inside"):
        rc, s = run_folder(capsys, root, tmp_path / "o")
        assert rc == 0 and (s["written"], s["skipped"]) == (5, {})


def test_imagefolder_bad_and_oddly_named_files(tmp_path, capsys, drill):
    root, _ = image_folder(tmp_path)
    (root / "normal" / "notes.png").write_text("not an image")
    draw(root / "normal" / os.fsdecode(b"caf\xe9.png"), 5)  # a file name that is not UTF-8
    with drill.input("imagefolder: a text file named .png, a non-UTF-8 file name"):
        rc, s = run_folder(capsys, root, tmp_path / "o")
        assert rc == 0 and (s["written"], s["skipped"]) == (5, {"bad_image": 1})
        assert s["offenders"]["bad_image"] == ["class normal file 3 (cannot identify image file)"]


# --- nothing outside the root is even looked at -------------------------------------------------------


def test_nothing_outside_the_root_is_stated_or_opened(tmp_path, monkeypatch, drill):
    """Spy on the file system calls while the pairs reader resolves five escaping rows: none touches a path
    outside the root (other than the root's own parent folders)."""
    from data_prep.sources import get_reader

    root = tmp_path / "root"
    draw(root / "a.png")
    outside = tmp_path / "outside"
    draw(outside / "x.png")
    (root / "link.png").symlink_to(outside / "x.png")
    (root / "dirlink").symlink_to(outside)
    (root / "t.csv").write_text("image,caption\na.png,ok\n../outside/x.png,a\n" + f"{outside}/x.png,b\n"
                                "link.png,c\ndirlink/x.png,d\nsub/../../outside/x.png,e\n")
    opts = SimpleNamespace(input=str(root / "t.csv"), image_root=None, out=str(tmp_path / "o"), key_secret=None,
                           source_name=None, modality=None, split=None, max_pixels=1 << 26, image_column=None,
                           text_column=None, allow_outside_root=False)
    touched = []

    def spy(fn):
        def wrapped(path, *a, **k):
            touched.append(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path))
            return fn(path, *a, **k)
        return wrapped

    records, _ = get_reader("pairs").read(opts)
    for name in ("lstat", "stat", "readlink", "open", "scandir", "listdir"):
        monkeypatch.setattr(os, name, spy(getattr(os, name)))
    monkeypatch.setattr("builtins.open", spy(open))
    with drill.hole("pairs: no stat/open/readlink of any path outside the root while resolving"):
        got = list(records)
        monkeypatch.undo()
        reasons = [getattr(r, "reason", "ok") for r in got]
        assert reasons == ["ok", "outside_root", "outside_root", "outside_root", "outside_root", "outside_root"]
        assert touched and not [p for p in touched if p == str(outside) or p.startswith(f"{outside}/")], touched


# --- PHI: no path text of a patient-named folder in any output byte -----------------------------------


NEEDLES = (b"DOE", b"JOHN", b"MRN00123456", b"00123456")


def test_patient_named_folder_leaves_no_trace(tmp_path, capsys, drill):
    pydicom_data = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
    data = tmp_path / "data"
    patient = data / "DOE^JOHN_MRN00123456"
    draw(patient / "chest.png", 1)
    draw(patient / "chest_lateral.png", 2)
    shutil.copy(pydicom_data / "CT_small.dcm", patient / "ct.dcm")
    (patient / "DOE_JOHN_notes.png").write_text("JOHN DOE MRN00123456")  # a bad image: its detail must not quote it
    (patient / "MRN00123456_broken.dcm").write_bytes(b"DICM" * 10)
    secret = tmp_path / "secret"
    secret.write_bytes(b"k" * 32)
    rows = ["DOE^JOHN_MRN00123456/chest.png", "DOE^JOHN_MRN00123456/chest_lateral.png",
            "DOE^JOHN_MRN00123456/ct.dcm", "DOE^JOHN_MRN00123456/chest.png",  # a duplicate row
            "DOE^JOHN_MRN00123456/missing_MRN00123456.png", "DOE^JOHN_MRN00123456/DOE_JOHN_notes.png",
            "DOE^JOHN_MRN00123456/MRN00123456_broken.dcm", "../DOE^JOHN_MRN00123456/chest.png",
            "DOE^JOHN_MRN00123456/../../outside_DOE.png"]
    (data / "pairs.csv").write_text("image,caption\n" + "".join(f"{r},Chest radiograph.\n" for r in rows))
    out = tmp_path / "out"
    with drill.hole("pairs: a DOE^JOHN_MRN00123456 folder: no name or MRN in shards, manifest or log"):
        rc = shards_main(["--format", "pairs", "--input", str(data / "pairs.csv"), "--out", str(out), "--workers", "0",
                          "--quiet", "--key-secret", str(secret)])
        err = capsys.readouterr().err
        assert rc == 0, err
        s = read_manifest(out).extra["summary"]
        assert s["written"] == 4 and s["renamed_keys"] == 1
        assert s["skipped"] == {"missing_image": 1, "bad_image": 1, "bad_dicom": 1, "outside_root": 2}
        blobs = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert set(blobs) >= {"manifest.json", "shard-000000.tar"}
        blobs["<stderr>"] = err.encode()
        leaks = [(name, n) for name, b in blobs.items() for n in NEEDLES if n in b]
        assert leaks == []
        keys = [k for k in blobs["shard-000000.tar"].split(b"\0") if k.startswith(b"pairs-") and k.endswith(b".json")]
        assert len(keys) == 4 and len(set(keys)) == 4  # unique: the duplicate row got a suffix


def test_short_key_secret_is_refused_before_writing(tmp_path, capsys, drill):
    c = Case(tmp_path, FORMATS["pairs.csv"])
    c.write()
    secret = tmp_path / "secret"
    secret.write_bytes(b"abc")
    c.extra = ["--key-secret", str(secret)]
    with drill.input("pairs: a --key-secret file of 3 bytes"):
        c.expect_error(capsys, f"--key-secret: {secret}: a key secret must hold at least 16 bytes (it holds 3)")


@pytest.mark.parametrize("rel,inside", [
    ("a.png", True), ("sub/../a.png", True), ("./sub/./b.png", True), ("../root/a.png", True),
    ("{real}/a.png", True), ("{named}/a.png", True), ("{named}/sub/b.png", True), ("chain.png", True),
    ("dirlink/b.png", True),
    ("../outside/x.png", False), ("{outside}/x.png", False), ("sub/../../outside/x.png", False), ("escape.png", False),
    ("chain_out.png", False), ("loop.png", False), ("/etc/passwd", False), ("a.png\x00.txt", False),
    ("outlink/x.png", False), ("{named}/../outside/x.png", False), ("../../../../../../../../etc/passwd", False),
], ids=lambda v: str(v).replace("\x00", "NUL") if isinstance(v, str) else None)
def test_resolve_inside_forms(tmp_path, drill, rel, inside):
    """resolve_inside on every escaping form, with the image root itself reached through a symlink."""
    from data_prep.sources import resolve_inside

    real, outside = tmp_path / "root", tmp_path / "outside"
    draw(real / "a.png")
    draw(real / "sub" / "b.png")
    draw(outside / "x.png")
    named = tmp_path / "named_root"
    named.symlink_to(real)  # the user names the root through a link
    (real / "chain.png").symlink_to("chain2.png")
    (real / "chain2.png").symlink_to(real / "sub" / ".." / "a.png")
    (real / "dirlink").symlink_to("sub")
    (real / "escape.png").symlink_to(outside / "x.png")
    (real / "chain_out.png").symlink_to("chain_out2.png")
    (real / "chain_out2.png").symlink_to("../outside/x.png")
    (real / "loop.png").symlink_to("loop.png")
    (real / "outlink").symlink_to(outside)
    with drill.hole(f"resolve_inside: {rel!r} is {'inside' if inside else 'refused'}"):
        got = resolve_inside(named, rel.format(real=real, named=named, outside=outside),
                             SimpleNamespace(allow_outside_root=False))
        if inside:
            assert got is not None and got.is_file() and str(got).startswith(f"{real}/")
            assert got.resolve() == got  # no link left to follow when it is opened
        else:
            assert got is None


@pytest.mark.parametrize("split", [None, "test"])
def test_vqa_rad_phrase_type_of_wrong_type(tmp_path, capsys, drill, split):
    """The split is read from phrase_type: a list there is that row's bad_row, with or without --split."""
    c = Case(tmp_path, FORMATS["vqa_rad"])
    c.rows[1]["phrase_type"] = ["test_freeform"]
    c.write()
    c.extra = ["--split", split] if split else []
    with drill.input(f"vqa_rad: phrase_type a list (--split {split or 'all'})"):
        c.expect(capsys, written=2 if split is None else 1, skipped={"bad_row": 1},
                 first={"bad_row": "record 1 (phrase_type is a list, not a string)"})


# --- an unforeseen exception while handling one row is that row's `error` skip, never the run's end ----------
# (a reader's generator that raised cannot be resumed: the writer would have to stop the whole run)

ERROR_ROW = 1  # the row each case breaks: rows before and after it are intact


def rest_written(fmt: Fmt, rows: list, bad: int) -> int:
    """What the intact rows write: every other row's sample (grouped: every other row's image)."""
    return fmt.base_written([r for k, r in enumerate(rows) if k != bad and fmt.image_of(r)])


def no_path_text(c: Case, s: dict) -> None:
    text = json.dumps(s["offenders"], ensure_ascii=False)
    assert str(c.tmp) not in text and c.tmp.name not in text and "/" not in text


SURROGATE = "\ud800.png"  # a JSON \ud800 escape: a str that no file system call can encode


def unencodable_detail(root: Path) -> str:
    """The offender detail of that row: the very exception resolve_inside meets (lstat of root/<surrogate>), made
    a detail as the writer makes every one (exception_detail, then safe_detail): its path text is gone."""
    from data_prep.writer import exception_detail, safe_detail

    try:
        os.lstat(os.path.join(os.path.realpath(root), SURROGATE))
    except UnicodeEncodeError as e:
        detail = safe_detail(exception_detail(e))
    assert detail.startswith("UnicodeEncodeError: ") and detail.endswith(": surrogates not allowed"), detail
    assert "\ud800" not in detail and str(root) not in detail
    return detail


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fid", [k for k, f in FORMATS.items() if f.kind not in ("csv", "tsv")])
def test_unencodable_image_path_is_one_error_skip(tmp_path, capsys, drill, fid, workers):
    """A real row that made our per-row code raise (resolve_inside's lstat: UnicodeEncodeError, 'surrogates not
    allowed'): before, the generator died and the whole run was aborted (or never started); now that row is one
    `error` skip named by its line/record, and the rows around it are written."""
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    c.write()  # the intact rows' images
    fmt.set_image(c.rows[ERROR_ROW], SURROGATE)
    c.input.write_bytes(serialize(fmt, c.rows, escaped=True))
    detail = unencodable_detail(c.root)
    with drill.input(f"{fid}: an image path holding a lone surrogate (\\ud800), {workers} workers"):
        s = c.expect(capsys, written=rest_written(fmt, c.rows, ERROR_ROW), skipped={"error": 1}, workers=workers,
                     first={"error": f"{fmt.label(c.rows, ERROR_ROW)} ({detail})"})
        no_path_text(c, s)


def deny_readlink(monkeypatch, name: str) -> None:
    """Fault injection: readlink of a link called ``name`` fails with EACCES (what a link in a folder the
    process may not read gives; tests run as root, which no permission stops)."""
    real = os.readlink

    def readlink(path, *a, **k):
        p = os.fsdecode(path)
        if os.path.basename(p) == name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "readlink", readlink)


DENIED = "PermissionError: [Errno 13] Permission denied: '…'"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fid", list(FORMATS))
def test_unreadable_link_is_one_error_skip(tmp_path, capsys, monkeypatch, drill, fid, workers):
    """A row naming a symlink whose readlink fails (PermissionError inside resolve_inside): that row's `error`
    skip; the exception's message quoted the link's path, the offender does not."""
    fmt = FORMATS[fid]
    c = Case(tmp_path, fmt)
    draw(c.root / "linked.png", 3)
    (c.root / "link.png").symlink_to("linked.png")
    fmt.set_image(c.rows[ERROR_ROW], "link.png")
    c.write()
    deny_readlink(monkeypatch, "link.png")
    with drill.input(f"{fid}: a row naming a link that cannot be read (EACCES), {workers} workers"):
        s = c.expect(capsys, written=rest_written(fmt, c.rows, ERROR_ROW), skipped={"error": 1}, workers=workers,
                     first={"error": f"{fmt.label(c.rows, ERROR_ROW)} ({DENIED})"})
        no_path_text(c, s)


def test_vqa_rad_image_name_dot_is_one_error_skip(tmp_path, capsys, drill):
    """image_name "." made building the image id raise ValueError while grouping (before: the reader raised
    before anything was written, one-line 'error: PosixPath('.') has an empty name', exit 2, for one record)."""
    fmt = FORMATS["vqa_rad"]
    c = Case(tmp_path, fmt)
    c.write()
    c.rows[ERROR_ROW]["image_name"] = "."
    c.input.write_bytes(serialize(fmt, c.rows))
    with drill.input("vqa_rad: image_name '.' (the image id cannot be built)"):
        s = c.expect(capsys, written=rest_written(fmt, c.rows, ERROR_ROW), skipped={"error": 1},
                     first={"error": "record 1 (ValueError: PosixPath('…') has an empty name)"})
        no_path_text(c, s)


def _png(value: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fid", ["vqa_rad", "pathvqa"])
def test_parquet_cell_that_breaks_the_reader_is_one_error_skip(tmp_path, capsys, monkeypatch, drill, fid):
    """Hugging Face parquet releases: reading one row's image cell raises (fault injection in
    vlm.data.formats.parquet_image, the one call the row makes: no real cell reaches an unforeseen exception
    now, wrong types are bad_row); that row is one `error` skip, the rows around it are written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import vlm.data.formats as formats

    rows = [{"image": {"bytes": _png(1), "path": None}, "question": "is this normal?", "answer": "no"},
            {"image": {"bytes": _png(2), "path": None}, "question": "what organ?", "answer": "lung"},
            {"image": {"bytes": _png(3), "path": None}, "question": "is there a mass?", "answer": "yes"}]
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), data / "test-00000-of-00001.parquet")
    real = formats.parquet_image

    def parquet_image(row):
        if row.get("question") == "what organ?":
            raise KeyError("/data/DOE^JOHN_MRN00123456/img.png")
        return real(row)

    monkeypatch.setattr(formats, "parquet_image", parquet_image)
    out = tmp_path / "out"
    with drill.input(f"{fid}: parquet row 1 of 3 whose image cell makes the reader raise"):
        rc = shards_main(["--format", fid, "--input", str(data), "--out", str(out), "--workers", "0", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 0, err
        s = read_manifest(out).extra["summary"]
        assert (s["written"], s["skipped"]) == (2, {"error": 1}), err
        assert s["offenders"]["error"] == ["test row 1 (KeyError: '…')"]


# --- imagefolder: folders that cannot be walked -----------------------------------------------------------


def _mkdirs_at(top: Path, names: list[str], image: str | None = None) -> None:
    """Create top/names[0]/names[1]/... one level at a time through directory descriptors (the whole path may
    be longer than the system accepts), with an image file in the last one."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            os.mkdir(n, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        if image:
            with os.fdopen(os.open(image, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
                Image.new("RGB", (8, 8), (200, 40, 90)).save(f, format="PNG")
    finally:
        os.close(fd)


def test_imagefolder_folder_past_path_max_is_one_error_skip(tmp_path, capsys, drill):
    """A folder whose path is longer than PATH_MAX (4096) cannot be listed (ENAMETOOLONG): before, the walk
    dropped it (and what it held) without a count; now it is one `error` skip, `class <c> folder <n>`."""
    root, _ = image_folder(tmp_path)
    top = root / "normal" / "deep"
    top.mkdir()
    levels = (4096 - len(str(top))) // 201 + 1  # names of 200 characters: the last level passes 4096
    _mkdirs_at(top, [chr(ord("a") + k % 26) * 200 for k in range(levels)], "hidden.png")
    with drill.input("imagefolder: a folder whose path passes PATH_MAX"):
        rc, s = run_folder(capsys, root, tmp_path / "o")
        assert rc == 0 and (s["written"], s["skipped"]) == (4, {"error": 1})
        # normal/: 3.png is file 1, the unlistable folder item 2, sub/4.jpg file 3
        assert s["offenders"]["error"] == ["class normal folder 2 (OSError: [Errno 36] File name too long: '…')"]


def test_imagefolder_deep_folders_are_walked(tmp_path, capsys, drill):
    """1,100 nested folders (deeper than Python's recursion limit): the walk is iterative and finds the image
    at the bottom (before: RecursionError, a traceback and no run)."""
    root, _ = image_folder(tmp_path)
    try:
        _mkdirs_at(root / "normal", ["d"] * 1100, "bottom.png")
        with drill.input("imagefolder: 1,100 nested folders"):
            rc, s = run_folder(capsys, root, tmp_path / "o")
            assert rc == 0 and (s["written"], s["skipped"]) == (5, {})
    finally:  # shutil.rmtree (pytest's clean-up of old tmp folders) recurses per level and fails on this depth
        _rmdirs_at(root / "normal", "d", "bottom.png")


def _rmdirs_at(top: Path, name: str, image: str) -> None:
    """Remove the chain top/name/name/... (and the image at its bottom) one level at a time, without recursion."""
    fd, depth = os.open(top, os.O_RDONLY | os.O_DIRECTORY), 0
    try:
        while True:
            try:
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                break
            os.close(fd)
            fd, depth = nfd, depth + 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image, dir_fd=fd)
        for _ in range(depth):
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where,link,target,label", [
    ("a file link", "normal/2link.png", "3.png", "class normal file 1"),
    ("a sub-folder link", "normal/2sublink", "sub", "class normal file 1"),
    ("a class folder link", "aaa", "normal", "entry 1"),
])
def test_imagefolder_unreadable_link_is_one_error_skip(tmp_path, capsys, monkeypatch, drill, where, link, target,
                                                       label):
    """A link whose readlink fails (EACCES, injected): one `error` skip named by position, the walk goes on."""
    root, _ = image_folder(tmp_path)
    (root / link).symlink_to(target)
    deny_readlink(monkeypatch, Path(link).name)
    with drill.input(f"imagefolder: {where} that cannot be read (EACCES)"):
        rc, s = run_folder(capsys, root, tmp_path / "o")
        assert rc == 0 and (s["written"], s["skipped"]) == (4, {"error": 1})
        assert s["offenders"]["error"] == [f"{label} ({DENIED})"]


def test_imagefolder_sample_that_breaks_is_one_error_skip(tmp_path, capsys, monkeypatch, drill):
    """Building one image's sample raises (fault injection in the reader's file_ref, the call that makes the
    image's loader): that image is one `error` skip named `class <c> file <n>`; the others are written."""
    import data_prep.sources.imagefolder as imagefolder

    root, _ = image_folder(tmp_path)
    real = imagefolder.file_ref

    def file_ref(path, rel, opts, *a):
        if rel == "effusion/2.png":
            raise AttributeError(f"'NoneType' object has no attribute 'suffix' ({path})")
        return real(path, rel, opts, *a)

    monkeypatch.setattr(imagefolder, "file_ref", file_ref)
    with drill.input("imagefolder: an image whose sample cannot be built"):
        rc, s = run_folder(capsys, root, tmp_path / "o")
        assert rc == 0 and (s["written"], s["skipped"]) == (3, {"error": 1})
        assert s["offenders"]["error"] == ["class effusion file 2 (AttributeError: '…' object has no attribute '…' "
                                           "(<path>))"]
