"""eval.vqa score and eval.report score: real fixture records through load -> score, error cases."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import FIXTURES, load_fixture
from eval.report import main as report_main
from vlm.report_metrics import clean_report_iu_xray, clean_report_mimic_cxr
from eval.vqa import main as vqa_main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def slake_val(tmp_path):
    d = tmp_path / "slake"
    d.mkdir()
    shutil.copy(FIXTURES / "slake/validate.json", d / "validate.json")
    return d


def test_slake_fixture_perfect_and_trap_predictions(slake_val, tmp_path):
    recs = [r for r in load_fixture("slake/validate.json") if r["q_lang"] == "en"]
    perfect = write_jsonl(tmp_path / "p.jsonl", [{"question_id": r["qid"], "text": str(r["answer"])} for r in recs])
    out = tmp_path / "r.json"
    assert vqa_main(["score", "--benchmark", "slake", "--data-root", str(slake_val), "--split", "val",
                     "--predictions", str(perfect), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    n_closed = sum(r_["answer_type"] == "CLOSED" for r_ in recs)
    assert (r["num_closed"], r["num_open"]) == (n_closed, len(recs) - n_closed)
    assert r["closed_accuracy"] == 1.0 and r["exact_match"] == 1.0 and r["llava_med"]["open_recall"] == 1.0
    assert set(r["breakdown"]) >= {"answer_type", "content_type", "modality", "organ"}
    assert (tmp_path / "r.questions.csv").read_text().count("\n") == len(recs) + 1
    assert "closed accuracy" in (tmp_path / "r.md").read_text()
    # 'normal' for every 'No': LLaVA-Med's substring rule counts it, the strict rule does not
    trap = write_jsonl(tmp_path / "t.jsonl", [{"question_id": r["qid"], "text": "normal" if str(r["answer"]).lower() == "no"
                                               else str(r["answer"])} for r in recs])
    assert vqa_main(["score", "--benchmark", "slake", "--data-root", str(slake_val), "--split", "val",
                     "--predictions", str(trap), "--out", str(out), "--bootstrap", "0"]) == 0
    r2 = json.loads(out.read_text())
    n_no = sum(str(x["answer"]).lower() == "no" and x["answer_type"] == "CLOSED" for x in recs)
    assert n_no > 0
    assert r2["llava_med"]["closed_accuracy"] == 1.0
    assert r2["closed_accuracy"] == pytest.approx(1 - n_no / n_closed)


def test_prediction_id_errors(slake_val, tmp_path, capsys):
    recs = [r for r in load_fixture("slake/validate.json") if r["q_lang"] == "en"]
    rows = [{"question_id": r["qid"], "text": "yes"} for r in recs]
    args = ["score", "--benchmark", "slake", "--data-root", str(slake_val), "--split", "val", "--out",
            str(tmp_path / "r.json")]
    write_jsonl(tmp_path / "m.jsonl", rows[1:] + [rows[2], {"question_id": 999999, "text": "x"}])
    assert vqa_main(args + ["--predictions", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"missing ids: {recs[0]['qid']}" in err and "duplicated ids" in err and "999999" in err
    assert not (tmp_path / "r.json").exists()
    write_jsonl(tmp_path / "a.jsonl", rows[1:])
    assert vqa_main(args + ["--predictions", str(tmp_path / "a.jsonl"), "--allow-missing"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_missing"] == 1


def test_vqa_rad_official_split(tmp_path):
    from test_sources import VQA_RAD_RECORDS

    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(VQA_RAD_RECORDS))
    preds = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 2, "text": "Left frontal lobe."},
                                               {"question_id": 3, "text": "no"}])
    assert vqa_main(["score", "--benchmark", "vqa_rad", "--data-root", str(tmp_path), "--predictions", str(preds),
                     "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["num_open"], r["num_closed"]) == (1, 1) and r["closed_accuracy"] == 1.0 and r["exact_match"] == 1.0
    assert set(r["breakdown"]["organ"]) == {"HEAD", "CHEST"}


def test_pathvqa_parquet_yes_no_is_closed(tmp_path):
    from test_sources import _write_parquet

    rows = [{"image": {"bytes": b"x", "path": None}, "question": "is this benign?", "answer": "no"},
            {"image": {"bytes": b"x", "path": None}, "question": "what is shown?", "answer": "necrosis"}]
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    preds = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 0, "text": "No"}, {"question_id": 1, "text": "x"}])
    assert vqa_main(["score", "--benchmark", "pathvqa", "--data-root", str(tmp_path / "data"), "--predictions",
                     str(preds), "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["num_closed"], r["closed_accuracy"], r["num_open"], r["open_recall"]) == (1, 1.0, 1, 0.0)


# --- reports ---------------------------------------------------------------------------------

def test_r2gen_cleaning_hand_computed():
    assert clean_report_iu_xray("The heart is normal. 1. No acute disease.. 2. Clear lungs.") == \
        "the heart is normal . no acute disease . clear lungs ."
    # ':-[' is a range in R2Gen's class: '<', '=', '>', '@' go too; digits stay
    assert clean_report_iu_xray("Size: <2cm> = ok") == "size 2cm  ok ."
    assert clean_report_iu_xray("") == " ."
    assert clean_report_iu_xray("No effusion.. . Clear.") == "no effusion .  . clear ."  # empty sentence kept
    assert clean_report_mimic_cxr("FINDINGS:\n\nNo  acute __ process..  1. Stable.") == \
        "findings no acute  process . stable ."


def test_iu_xray_fixture_scores(tmp_path):
    ann = load_fixture("iu_xray/annotation.json")
    ann["test"] = ann["val"]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    perfect = write_jsonl(tmp_path / "p.jsonl", [{"id": r["id"], "text": r["report"]} for r in ann["test"]])
    const = write_jsonl(tmp_path / "c.jsonl", [{"id": r["id"], "text": "No acute abnormality."} for r in ann["test"]])
    base = ["score", "--benchmark", "iu_xray", "--annotation", str(tmp_path / "ann.json"), "--split", "test"]
    assert report_main(base + ["--predictions", str(perfect), "--out", str(tmp_path / "p.json")]) == 0
    assert report_main(base + ["--predictions", str(const), "--out", str(tmp_path / "c.json")]) == 0
    p, c = json.loads((tmp_path / "p.json").read_text()), json.loads((tmp_path / "c.json").read_text())
    assert p["num_reports"] == len(ann["val"])
    assert p["bleu_4"] > 0.99 and p["rouge_l"] > 0.99 and p["meteor"] > 0.9 and p["cider"] > c["cider"]
    assert c["bleu_1"] < p["bleu_1"] and c["bleu_4"] < 0.2
    assert set(p["unavailable"]) >= {"chexbert", "radgraph", "green", "ratescore"}  # no weights here: said
    assert "not installed" in p["unavailable"]["chexbert"]
    assert "green_score" in p["unavailable"]["green"] and "RaTEScore" in p["unavailable"]["ratescore"]
    assert (tmp_path / "p.reports.csv").exists()


def test_report_missing_split_and_ids(tmp_path, capsys):
    ann = load_fixture("iu_xray/annotation.json")
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": ann["val"][0]["id"], "text": "x"}])
    base = ["score", "--benchmark", "iu_xray", "--annotation", str(tmp_path / "ann.json"), "--predictions", str(preds),
            "--out", str(tmp_path / "r.json")]
    assert report_main(base + ["--split", "dev"]) == 2
    assert "no split 'dev'" in capsys.readouterr().err
    assert report_main(base + ["--split", "val"]) == 2
    assert "missing ids" in capsys.readouterr().err
    assert report_main(base + ["--split", "val", "--allow-missing", "--text", "raw"]) == 0


def test_reasoning_outputs_are_scored_on_their_answer(slake_val, tmp_path):
    """<think>...</think><answer>...</answer> predictions score as their answer (vlm.grpo.extract_answer, what the
    GRPO reward reads): the reasoning may name the other option of a closed question without costing it."""
    recs = [r for r in load_fixture("slake/validate.json") if r["q_lang"] == "en"]
    plain = write_jsonl(tmp_path / "p.jsonl", [{"question_id": r["qid"], "text": str(r["answer"])} for r in recs])
    tagged = write_jsonl(tmp_path / "t.jsonl", [
        {"question_id": r["qid"], "text": f"<think>Is it yes or no? Not {r['answer']}, maybe no, maybe yes.</think>\n"
                                          f"<answer>{r['answer']}</answer>"} for r in recs])
    out_p, out_t = tmp_path / "p.json", tmp_path / "t.json"
    for preds, out in ((plain, out_p), (tagged, out_t)):
        assert vqa_main(["score", "--benchmark", "slake", "--data-root", str(slake_val), "--split", "val",
                         "--predictions", str(preds), "--out", str(out), "--bootstrap", "0"]) == 0
    p, t = json.loads(out_p.read_text()), json.loads(out_t.read_text())
    assert t["num_answer_tags"] == len(recs) and p["num_answer_tags"] == 0
    assert (t["format_rate"], p["format_rate"]) == (1.0, 0.0) and t["answer_formats"] == {"tags": len(recs)}
    for key in ("closed_accuracy", "open_recall", "exact_match", "token_f1"):
        assert t[key] == p[key] == 1.0
    assert t["llava_med"] == p["llava_med"]
    import csv

    with open(out_t.with_suffix(".questions.csv"), newline="") as f:  # the raw output kept beside the answer
        rows = list(csv.DictReader(f))
    assert all(r["raw_output"].startswith("<think>") and not r["prediction"].startswith("<") for r in rows)


def test_clinical_metrics_without_weights_say_why(monkeypatch):
    """An installed package whose model is not in the local Hugging Face cache: unavailable with that reason,
    looked up without a download (a stand-in module plays the installed package; its scorer must never run)."""
    import sys
    import types

    from vlm import report_metrics

    ran = []
    fake = types.ModuleType("RaTEScore")
    fake.RaTEScore = lambda: ran.append(1)
    monkeypatch.setitem(sys.modules, "RaTEScore", fake)
    monkeypatch.setattr(report_metrics, "_cached", lambda repo: repo == report_metrics.RATESCORE_MODELS[0])
    scores, unavailable = report_metrics.clinical_metrics(["a"], ["b"], which=("ratescore",))
    assert scores == {} and not ran
    assert "['FremyCompany/BioLORD-2023-C'] are not in the local Hugging Face cache" in unavailable["ratescore"]
