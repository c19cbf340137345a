"""Multiple-choice and text QA benchmarks: the loaders on real records in each release's format
(tests/fixtures/<benchmark>/, see their SOURCE.md), malformed files named by file and row, and eval.vqa score /
eval.compare / eval.suite on them."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from conftest import FIXTURES
from eval.benchmarks import CHOICE_BENCHMARKS
from eval.benchmarks.base import BenchmarkError
from eval.vqa import main as vqa_main

ROOTS = {"omnimedvqa": "omnimedvqa", "pmc_vqa": "pmc_vqa", "mmmu_med": "mmmu_med", "medxpertqa_mm": "medxpertqa_mm",
         "medqa": "medqa", "medmcqa": "medmcqa", "pubmedqa": "pubmedqa", "mmlu_med": "mmlu_med"}


def load(name, root=None, **kw):
    return CHOICE_BENCHMARKS[name](root or FIXTURES / ROOTS[name], **kw).load()


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_every_loader_reads_its_release(name):
    items = load(name)
    assert len(items) >= 3
    for it in items:
        assert it.question.strip()
        if it.kind == "choice":
            assert it.answer in it.options and len(it.options) >= 2
            assert list(it.options) == list("ABCDEFGHIJ"[:len(it.options)])
            assert all(v.strip() for v in it.options.values())
        else:
            assert it.answers and not it.options
        has_images = CHOICE_BENCHMARKS[name].has_images
        assert bool(it.images) == has_images
        for img in it.images:
            data = img if isinstance(img, bytes) else open(img, "rb").read()
            assert data[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\xff\xd8\xff\xdb") or len(data) > 50


def test_known_records_decode_as_released():
    # OmniMedVQA: gt_answer is the right option's text
    omni = {it.qid: it for it in load("omnimedvqa")}
    rec = json.loads(next((FIXTURES / "omnimedvqa/QA_information/Open-access").glob("*.json")).read_text())[0]
    it = omni[rec["question_id"]]
    assert it.options[it.answer] == rec["gt_answer"] and it.categories["modality"] == rec["modality_type"]
    # PMC-VQA: "A:" prefixes dropped; Answer_label the letter; Answer its text
    with open(FIXTURES / "pmc_vqa/test_clean.csv", newline="") as f:
        row = next(csv.DictReader(f))
    pmc = load("pmc_vqa")[0]
    assert pmc.qid == 0 and pmc.answer == row["Answer_label"] and pmc.options[pmc.answer] == row["Answer"].strip()
    assert not any(v.startswith(("A:", "B:", "C:", "D:")) for v in pmc.options.values())
    # MedXpertQA: the inline "Answer Choices" are not repeated in the question
    mx = load("medxpertqa_mm")
    assert all("Answer Choices" not in it.question for it in mx) and len(mx[0].options) == 5
    assert any(len(it.images) > 1 for it in mx)
    # MMMU: images in the order the question refers to them; options parsed from their Python-list string
    mm = load("mmmu_med")
    assert any(len(it.images) > 1 for it in mm) and all(isinstance(b, bytes) for it in mm for b in it.images)
    # MedMCQA: cop is 1-based in dev.json, 0-based in the parquet: the same letters either way
    assert [it.answer for it in load("medmcqa")] == [it.answer for it in load("medmcqa", FIXTURES / "medmcqa/hf")]
    # MedQA: answer_idx agrees with the answer text (checked by the loader); 4 options
    assert all(len(it.options) == 4 for it in load("medqa"))
    assert all(len(it.options) == 5 for it in load("medqa", split="test5"))
    # PubMedQA: the test split is test_ground_truth.json's PMIDs; options yes/no/maybe; the abstract as context
    truth = json.loads((FIXTURES / "pubmedqa/test_ground_truth.json").read_text())
    pq = load("pubmedqa")
    assert [it.qid for it in pq] == list(truth) and all(it.context for it in pq)
    assert [it.options[it.answer] for it in pq] == list(truth.values())
    # MMLU: the original CSVs and the Hugging Face parquet give the same questions
    a, b = load("mmlu_med"), load("mmlu_med", FIXTURES / "mmlu_med/hf")
    assert [(x.qid, x.answer, x.options) for x in a] == [(x.qid, x.answer, x.options) for x in b]


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / ROOTS[name], dst)
    return dst


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_jsonl(path, line, fn):
    lines = path.read_text().splitlines()
    rec = json.loads(lines[line])
    fn(rec)
    lines[line] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def test_malformed_files_are_named_by_file_and_row(tmp_path):
    cases = []
    root = _copy("omnimedvqa", tmp_path)
    f = next((root / "QA_information/Open-access").glob("*.json"))
    _edit_json(f, lambda d: d[1].update(gt_answer="not an option"))
    cases.append(("omnimedvqa", root, f"{f}: record 1"))
    root = _copy("medxpertqa_mm", tmp_path)
    _edit_jsonl(root / "MM/test.jsonl", 2, lambda r: r.pop("label"))
    cases.append(("medxpertqa_mm", root, "test.jsonl: line 3"))
    root = _copy("medqa", tmp_path)
    p = root / "data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl"
    _edit_jsonl(p, 1, lambda r: r.update(answer_idx="Q"))
    cases.append(("medqa", root, "phrases_no_exclude_test.jsonl: line 2"))
    root = _copy("medmcqa", tmp_path)
    _edit_jsonl(root / "dev.json", 0, lambda r: r.update(cop=0))  # 0 is not an option of the 1-based file
    cases.append(("medmcqa", root, "dev.json: line 1"))
    root = _copy("pubmedqa", tmp_path)
    _edit_json(root / "test_ground_truth.json", lambda d: d.update({"123": "yes"}))
    cases.append(("pubmedqa", root, "PMID 123 is not in ori_pqal.json"))
    root = _copy("mmlu_med", tmp_path)
    p = root / "data/test/anatomy_test.csv"
    p.write_text(p.read_text() + "a question,only,three\n")
    cases.append(("mmlu_med", root, f"anatomy_test.csv: line {len(p.read_text().splitlines())}: 3 columns"))
    root = _copy("pmc_vqa", tmp_path)
    p = root / "test_clean.csv"
    rows = p.read_text().splitlines()
    rows[2] = rows[2].rsplit(",", 1)[0] + ",E"
    p.write_text("\n".join(rows) + "\n")
    cases.append(("pmc_vqa", root, "test_clean.csv: line 3"))
    root = _copy("omnimedvqa", tmp_path / "escape")
    f = next((root / "QA_information/Open-access").glob("*.json"))
    _edit_json(f, lambda d: d[0].update(image_path="../../../etc/passwd"))
    cases.append(("omnimedvqa", root, "image path leaves"))
    for name, root, where in cases:
        with pytest.raises(BenchmarkError) as e:
            load(name, root)
        assert where in str(e.value), (name, str(e.value))


def test_mmmu_broken_options_and_missing_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _copy("mmmu_med", tmp_path)
    path = next(root.glob("*/validation-*.parquet"))
    t = pq.read_table(path)
    rows = t.to_pylist()
    rows[0]["options"] = "__import__('os').system('echo owned')"
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), path)
    with pytest.raises(BenchmarkError, match=r"row 0: options: .* is not a list literal"):
        load("mmmu_med", root)
    rows[0]["options"] = "['a', 'b']"
    rows[0]["question"] = "See <image 5> here"
    rows[0]["image_5"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), path)
    with pytest.raises(BenchmarkError, match=r"row 0: refers to <image 5> but image_5 is empty"):
        load("mmmu_med", root)


def _predictions(items, fn, path):
    path.write_text("".join(json.dumps({"question_id": it.qid, "text": fn(it)}) + "\n" for it in items))
    return path


def _score(name, preds, out, root=None):
    assert vqa_main(["score", "--benchmark", name, "--data-root", str(root or FIXTURES / ROOTS[name]),
                     "--predictions", str(preds), "--out", str(out), "--bootstrap", "200"]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_score_perfect_and_wrong(name, tmp_path):
    items = load(name)
    right = _score(name, _predictions(items, lambda it: it.answer if it.kind == "choice" else it.answers[0],
                                      tmp_path / "p.jsonl"), tmp_path / "right.json")
    assert right["accuracy"] == 1.0 and right["num_questions"] == len(items) and right["kind"] == "choice"
    wrong = _score(name, _predictions(items, lambda it: next((k for k in it.options if k != it.answer), "zzz"),
                                      tmp_path / "w.jsonl"), tmp_path / "wrong.json")
    assert wrong["accuracy"] == 0.0
    assert (tmp_path / "right.questions.csv").is_file() and (tmp_path / "right.md").is_file()
    assert set(right["breakdown"]) >= ({"subject"} if name in ("mmlu_med", "medmcqa", "mmmu_med") else set())


def test_adversarial_predictions_on_exactly_six(tmp_path):
    root = _copy("medqa", tmp_path)
    p = root / "data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl"
    p.write_text("\n".join(p.read_text().splitlines()[:6]) + "\n")
    items = load("medqa", root)
    texts = {}
    for i, it in enumerate(items):
        other = next(k for k in it.options if k != it.answer)
        texts[it.qid] = [f"{it.answer} and {other}", f"not {other}",
                         f"I believe the answer would be {it.options[it.answer]} in this case",
                         f"<think>{other} is tempting; {other} again</think><answer>{it.answer}</answer>",
                         f"The answer is {it.answer}.", it.options[it.answer].upper() + "."][i]
    r = _score("medqa", _predictions(items, lambda it: texts[it.qid], tmp_path / "p.jsonl"), tmp_path / "r.json", root)
    assert r["accuracy"] == pytest.approx(3 / 6) and r["num_correct"] == 3
    assert r["answered_rate"] == pytest.approx(3 / 6)
    assert r["unanswered_by"] == {"contradiction": 1, "none": 2}
    assert r["answer_formats"] == {"answer_is": 1, "plain": 4, "tags": 1} and r["format_rate"] == pytest.approx(2 / 6)
    with open(tmp_path / "r.questions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(x["correct"]) for x in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[3]["raw_output"].startswith("<think>") and rows[3]["prediction"] == items[3].answer


def test_mmmu_compat_block_and_compare(tmp_path):
    from eval.compare import compare

    items = load("mmmu_med")
    # long answers naming the right option's text: MMMU's rule reads them, the strict rule does not
    a = _score("mmmu_med", _predictions(items, lambda it: it.answer if it.kind == "choice" else it.answers[0],
                                        tmp_path / "a.jsonl"), tmp_path / "a.json")
    b = _score("mmmu_med", _predictions(
        items, lambda it: (f"After looking closely at the images I would say {it.options[it.answer]}"
                           if it.kind == "choice" else f"so the answer is {it.answers[0]}"),
        tmp_path / "b.jsonl"), tmp_path / "b.json")
    assert a["compat"]["mmmu"]["accuracy"] == 1.0 and b["compat"]["mmmu"]["accuracy"] == 1.0
    assert b["accuracy"] < 1.0
    r = compare(tmp_path / "a.json", tmp_path / "b.json", n=200)
    m = r["benchmarks"]["mmmu_med"]
    assert m["accuracy"]["a"] == 1.0 and m["accuracy"]["mcnemar"]["a_only"] == round(len(items) * (1 - b["accuracy"]))
    assert m["mmmu_compat_accuracy"]["diff"] == 0.0


def test_unknown_split_and_missing_release(tmp_path):
    with pytest.raises(BenchmarkError, match="split 'train' is not one of"):
        CHOICE_BENCHMARKS["pubmedqa"](FIXTURES / "pubmedqa", split="train")
    with pytest.raises(BenchmarkError, match="no QA_information/Open-access"):
        load("omnimedvqa", tmp_path)
    (tmp_path / "ori_pqal.json").write_text(json.dumps({}))
    with pytest.raises(BenchmarkError, match="test_ground_truth.json"):
        load("pubmedqa", tmp_path)


def test_pmc_vqa_version_2_layout(tmp_path):
    """test_2.csv (PMC-VQA v2): index, Caption, plain A..D, Answer as the letter; the index is the question id."""
    v1 = load("pmc_vqa")
    root = tmp_path / "pmc"
    shutil.copytree(FIXTURES / "pmc_vqa/images", root / "images")
    with open(root / "test_2.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "Figure_path", "Caption", "Question", "A", "B", "C", "D", "Answer", "split"])
        for i, it in enumerate(v1):
            w.writerow([100 + i, it.images[0].split("/images/")[-1], "a caption", it.question,
                        *[f" {k}:{v}" for k, v in it.options.items()], it.answer, "test"])
    v2 = load("pmc_vqa", root, split="test_2")
    assert [it.qid for it in v2] == [str(100 + i) for i in range(len(v1))]
    assert [(it.answer, it.options) for it in v2] == [(it.answer, it.options) for it in v1]


def test_mmmu_shows_the_images_the_question_names():
    """The images the question and options refer to, in order of first reference (Clinical_Medicine_13 names
    three); an image only the explanation names (Pharmacy_4's image_2) is not shown."""
    import re

    import pyarrow.parquet as pq

    rows = {r["id"]: r for p in (FIXTURES / "mmmu_med").glob("*/validation-*.parquet")
            for r in pq.read_table(p).to_pylist()}
    shown = {it.qid: it.images for it in load("mmmu_med")}
    for qid, images in shown.items():
        r = rows[qid]
        order = list(dict.fromkeys(int(k) for k in re.findall(r"<image (\d+)>", r["question"] + r["options"]))) or [1]
        assert images == [r[f"image_{k}"]["bytes"] for k in order], qid
    assert len(shown["validation_Clinical_Medicine_13"]) == 3
    assert rows["validation_Pharmacy_4"]["image_2"] is not None and len(shown["validation_Pharmacy_4"]) == 1


def test_suite_runs_choice_benchmarks_beside_the_others(tmp_path):
    """eval.suite with a text QA benchmark and MMMU (given predictions): their accuracy, MMMU's compat number and
    the anchors of those benchmarks in the summary; eval.compare reads the suite folders."""
    import yaml

    from eval.compare import compare
    from eval.suite import main as suite_main

    for run, fn in (("a", lambda it: it.answer if it.kind == "choice" else it.answers[0]),
                    ("b", lambda it: next((k for k in it.options if k != it.answer), "no"))):
        benches = []
        for name in ("pubmedqa", "mmmu_med"):
            preds = _predictions(load(name), fn, tmp_path / f"{run}_{name}.jsonl")
            benches.append({"name": name, "data_root": str(FIXTURES / name), "predictions": str(preds)})
        cfg = tmp_path / f"{run}.yaml"
        cfg.write_text(yaml.safe_dump({"out": str(tmp_path / run), "benchmarks": benches, "bootstrap": 100}))
        assert suite_main(["--config", str(cfg)]) == 0
    s = json.loads((tmp_path / "a/summary.json").read_text())
    assert s["benchmarks"]["pubmedqa"]["accuracy"] == 1.0 and s["benchmarks"]["mmmu_med"]["compat"]["mmmu"] == 1.0
    md = (tmp_path / "a/summary.md").read_text()
    assert "## Multiple choice and text QA" in md and "mmmu_med with its authors' parsing" in md
    r = compare(tmp_path / "a", tmp_path / "b", n=100)
    assert r["benchmarks"]["pubmedqa"]["accuracy"]["diff"] == -1.0


def test_encodings_positions_and_odd_layouts(tmp_path):
    """A byte-order mark is read past; text that is not UTF-8 names its file and line; a quoted field spanning
    lines does not shift the line numbers after it; odd records and layouts are errors naming them."""
    root = _copy("pmc_vqa", tmp_path)
    p = root / "test_clean.csv"
    rows = p.read_text().splitlines()
    first = rows[1].split(",", 2)
    rows[1] = f'{first[0]},"What is\nthe uptake\npattern?",{first[2]}'  # the question over 3 lines
    rows[-1] = rows[-1].rsplit(",", 1)[0] + ",Z"
    rows.insert(-1, "")  # and a blank line before the bad row
    p.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    with pytest.raises(BenchmarkError, match=rf"test_clean.csv: line {len(rows) + 2}: the answer letter 'Z'"):
        load("pmc_vqa", root)
    p.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows[:-1]).encode() + b"\n")
    items = load("pmc_vqa", root)
    assert items[0].question == "What is\nthe uptake\npattern?" and len(items) == len(rows) - 3
    root = _copy("mmlu_med", tmp_path)
    p = root / "data/test/anatomy_test.csv"
    n = len(load("mmlu_med", root))
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes() + b"\n\n")  # a byte-order mark and blank lines at the end
    assert not load("mmlu_med", root)[0].question.startswith("\ufeff") and len(load("mmlu_med", root)) == n
    p.write_bytes(p.read_bytes() + b"caf\xe9,a,b,c,d,A\n")
    last = len(p.read_bytes().splitlines())
    with pytest.raises(BenchmarkError, match=rf"anatomy_test.csv: line {last} is not UTF-8"):
        load("mmlu_med", root)
    p.write_text("")
    with pytest.raises(BenchmarkError, match="anatomy_test.csv: no questions"):
        load("mmlu_med", root)
    root = _copy("medmcqa", tmp_path)
    (root / "dev.json").write_bytes((root / "dev.json").read_bytes() + b'{"question": "\xff"}\n')
    with pytest.raises(BenchmarkError, match="dev.json: line 5 is not UTF-8"):
        load("medmcqa", root)
    root = _copy("pubmedqa", tmp_path)
    pmid = next(iter(json.loads((root / "test_ground_truth.json").read_text())))
    _edit_json(root / "ori_pqal.json", lambda d: d.update({pmid: "yes"}))
    with pytest.raises(BenchmarkError, match=f"PMID {pmid}: expected an object"):
        load("pubmedqa", root)
    # OmniMedVQA: one data set's file inside the release works; a file elsewhere has no image root
    one = next((FIXTURES / "omnimedvqa/QA_information/Open-access").glob("*.json"))
    assert load("omnimedvqa", one)
    (tmp_path / "loose.json").write_text(one.read_text())
    with pytest.raises(BenchmarkError, match="not inside the release's QA_information"):
        load("omnimedvqa", tmp_path / "loose.json")


def test_prompts_list_the_options_as_documented():
    from eval.prompts import choice_prompt, load_prompts

    opts = {"A": "Effusion", "B": "Pneumothorax"}
    tail = "Answer with the option's letter from the given choices directly."
    assert choice_prompt(load_prompts("medqa"), "What is it?", opts) == f"What is it?\nA. Effusion\nB. Pneumothorax\n{tail}"
    # MMMU's own prompt (configs/llava1.5.yaml as YAML parses it; each option line ends with a newline)
    assert choice_prompt(load_prompts("mmmu_med"), "See <image 1>. What is it?", opts) == \
        f"See <image 1>. What is it?\n(A) Effusion\n(B) Pneumothorax\n\n{tail}"
    assert choice_prompt(load_prompts("mmmu_med"), "How many {x}?", {}) == \
        "How many {x}?\nAnswer the question using a single word or phrase."
    item = load("pubmedqa")[0]
    p = choice_prompt(load_prompts("pubmedqa"), item.question, item.options, item.context)
    assert p.startswith(f"Context: {item.context}\nQuestion: {item.question}\nA. yes\nB. no\nC. maybe\n")
