"""Report factuality scorers (vlm/factuality.py) on hand-written reports, the report-preference tool
(data_prep.preference_from_samples) and the synthetic corpus's preference pairs."""
import json

import pytest

from vlm.factuality import (Finding, factuality_metrics, mentions_prior_exam, positive_findings, remove_unsupported,
                            report_factuality, sentences)

REF = ("Findings: The heart size is normal. There is a 12 mm nodule in the left upper lung zone. No pneumothorax. "
       "Impression: Left upper nodule.")


@pytest.mark.parametrize("sentence,prior", [
    ("Compared with the prior radiograph, the nodule is unchanged.", True),
    ("The effusion is new since the last study.", True),
    ("Interval increase in the left effusion.", True),
    ("The cyst is again seen in the left lower zone.", True),
    ("Stable cardiomegaly.", True),
    ("The consolidation has resolved.", True),
    ("Previously described nodule.", True),
    ("No prior study for comparison.", False),
    ("Comparison: none.", False),
    ("The heart size is normal.", False),
    ("There is a 12 mm nodule in the left upper lung zone.", False),
    ("No acute cardiopulmonary abnormality.", False),
    ("No previous films available; the left effusion is new since the prior study.", True),
    ("Patient hemodynamically stable.", False),
    ("As before, there is a left effusion.", True),
    ("COMPARISON: Chest radiograph dated ___.", True),
])
def test_prior_exam_sentences(sentence, prior):
    assert mentions_prior_exam(sentence) is prior


@pytest.mark.parametrize("text,want", [
    ("There is no pleural effusion or pneumothorax.", set()),
    ("Lungs are clear, without consolidation or effusion.", set()),
    ("Negative for pneumothorax.", set()),
    ("A pneumothorax is not seen.", set()),
    ("There is a small right pleural effusion.", {Finding("effusion", "right")}),
    ("Bilateral effusions.", {Finding("effusion", "bilateral")}),
    ("Left lower cyst; no effusion.", {Finding("cyst", "left")}),
    ("No effusion, but a right upper mass is present.", {Finding("mass", "right")}),
    ("Nodule in the left and right lung.", {Finding("nodule", None)}),  # two sides: none stated for the unit
    ("Cardiomegaly.", {Finding("cardiomegaly", None)}),
    # a negation's scope ends at a new statement and after a few words; sides are the nearest one
    ("No focal consolidation is seen, and there is a large right pneumothorax.", {Finding("pneumothorax", "right")}),
    ("The heart is not enlarged and there is a right pleural effusion.", {Finding("effusion", "right")}),
    ("No pneumothorax, there is a left pleural effusion.", {Finding("effusion", "left")}),
    ("No focal consolidation, pleural effusion, or pneumothorax.", set()),
    ("Small left pleural effusion and right lower lobe atelectasis.",
     {Finding("effusion", "left"), Finding("atelectasis", "right")}),
    ("Right heart border is obscured by a left lower lobe opacity.", {Finding("opacity", "left")}),
    ("Left effusion, no right effusion.", {Finding("effusion", "left")}),
    ("R pleural effusion.", {Finding("effusion", "right")}),
    ("The effusion is no longer seen.", set()),
    ("Possible right lower lobe pneumonia.", {Finding("pneumonia", "right")}),  # hedged: stated (documented)
])
def test_positive_findings(text, want):
    assert positive_findings(text) == want


def test_report_factuality_hand_computed():
    pred = ("Findings: Normal heart size. There is a small right pleural effusion. Compared with the prior "
            "radiograph, the nodule is unchanged. Impression: Unchanged right pleural effusion.")
    assert sentences(pred)[0] == "Findings: Normal heart size."
    r = report_factuality(REF, pred)
    # 4 sentences, 2 of them comparisons; effusion (right) is not in the reference, the nodule (no side) is
    assert r == {"sentences": 4, "prior_exam_sentences": 2, "findings": 2, "hallucinated_findings": 1,
                 "reference_findings": 1, "omitted_findings": 0}
    wrong_side = "Findings: There is a 12 mm nodule in the right upper lung zone. Impression: Right upper nodule."
    assert report_factuality(REF, wrong_side)["hallucinated_findings"] == 1
    normal = "Findings: The lungs are clear. Impression: No acute cardiopulmonary abnormality."
    assert report_factuality(REF, normal) == {"sentences": 2, "prior_exam_sentences": 0, "findings": 0,
                                              "hallucinated_findings": 0, "reference_findings": 1,
                                              "omitted_findings": 1}
    m = factuality_metrics([REF, REF, REF], [pred, wrong_side, normal])
    assert m["prior_exam_sentence_rate"] == pytest.approx(2 / 8)
    assert m["prior_exam_report_rate"] == pytest.approx(1 / 3)
    assert m["hallucinated_finding_rate"] == pytest.approx(2 / 3)  # effusion, right nodule / 3 positive findings
    assert m["hallucinated_report_rate"] == pytest.approx(2 / 3)
    assert m["omitted_finding_rate"] == pytest.approx(1 / 3)
    assert factuality_metrics([REF], [REF])["hallucinated_finding_rate"] == 0.0
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        factuality_metrics([REF, REF], [REF])


def test_remove_unsupported_keeps_headers_and_supported_sentences():
    pred = ("Findings: The heart size is normal. There is a 12 mm nodule in the left upper lung zone. There is a "
            "right pleural effusion. The nodule is stable since the previous examination. Impression: Unchanged "
            "left upper nodule. Right effusion.")
    # the effusion (not in the reference), both comparisons and the unsupported impression go
    assert remove_unsupported(pred, REF) == ("Findings: The heart size is normal. There is a 12 mm nodule in the "
                                             "left upper lung zone.")
    # without a reference only the comparisons go; a removed sentence's header moves to the next one kept
    assert remove_unsupported("Findings: Stable cardiomegaly. The lungs are clear. Impression: No change.") == \
        "Findings: The lungs are clear."
    assert remove_unsupported(REF, REF) == REF


def test_report_score_includes_factuality(tmp_path):
    from eval.report import main

    ann = {"test": [{"id": "a", "report": REF, "image_path": ["a/0.png"]},
                    {"id": "b", "report": "Findings: The lungs are clear. Impression: Normal.",
                     "image_path": ["b/0.png"]}]}
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "a", "text": REF + " Unchanged since the prior study."}) + "\n"
                     + json.dumps({"id": "b", "text": "Findings: A left mass. Impression: Left mass."}) + "\n")
    out = tmp_path / "r.json"
    assert main(["score", "--benchmark", "iu_xray", "--annotation", str(tmp_path / "annotation.json"),
                 "--predictions", str(preds), "--out", str(out), "--no-clinical"]) == 0
    r = json.loads(out.read_text())
    f = r["factuality"]
    assert r["format_rate"] == 0.0
    assert f["prior_exam_sentence_rate"] == pytest.approx(1 / 7) and f["prior_exam_report_rate"] == 0.5
    assert f["hallucinated_finding_rate"] == pytest.approx(1 / 2)  # the mass; the nodule is supported


def _annotation(tmp_path):
    ann = {"train": [{"id": "s1", "report": REF, "image_path": ["s1/0.png", "s1/1.png"]},
                     {"id": "s2", "report": "Findings: The lungs are clear. Impression: Normal.",
                      "image_path": ["s2/0.png"]},
                     {"id": "s3", "report": "Findings: Clear lungs.", "image_path": ["s3/0.png"]}]}
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(ann))
    return path


def _pairs(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_sample_and_rank(tmp_path):
    from data_prep.preference_from_samples import main

    samples = tmp_path / "samples.jsonl"
    good, bad = REF, "Findings: There is a right pleural effusion. Impression: Right pleural effusion."
    samples.write_text("\n".join(json.dumps(r) for r in [
        {"id": "s1#0", "text": bad}, {"id": "s1#1", "text": good}, {"id": "s1#2", "text": good},  # a duplicate
        {"id": "s2#0", "text": "Findings: The lungs are clear. Impression: Normal."},  # one distinct sample only
        {"id": "s2#1", "text": "Findings: The lungs are clear. Impression: Normal."},
        {"id": "zz#0", "text": good}, {"id": "zz#1", "text": bad},  # not a study of the split
        {"id": 5},  # no text
        {"id": True, "text": good},  # not an id
        {"id": "s1#3", "text": "  "},  # empty
    ]) + "\nnot json\n")
    for metric in ("rouge_l", "bleu_4", "factuality"):
        out = tmp_path / f"{metric}.jsonl"
        assert main(["--annotation", str(_annotation(tmp_path)), "--samples", str(samples), "--rank-by", metric,
                     "--out", str(out)]) == 0
        (pair,) = _pairs(out)
        assert (pair["id"], pair["image"], pair["chosen"], pair["rejected"]) == ("s1", "s1/0.png", good, bad)
        assert pair["prompt"] == "Write the radiology report for this chest x-ray."
        assert pair["chosen_score"] > pair["rejected_score"]
        stats = json.loads((tmp_path / f"{metric}.jsonl.stats.json").read_text())
        assert stats["skipped"] == {"bad_row": 3, "duplicate_sample": 2, "empty_sample": 1,
                                    "fewer_than_two_samples": 1, "unknown_study": 1}
    # a margin larger than the difference leaves the study out
    out = tmp_path / "margin.jsonl"
    assert main(["--annotation", str(_annotation(tmp_path)), "--samples", str(samples), "--rank-by", "factuality",
                 "--min-margin", "5", "--out", str(out)]) == 0
    assert out.read_text() == ""
    assert json.loads((tmp_path / "margin.jsonl.stats.json").read_text())["skipped"]["margin_below_min"] == 1


def test_factuality_edits(tmp_path):
    from data_prep.preference_from_samples import main

    out = tmp_path / "edit.jsonl"
    ann = _annotation(tmp_path)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": "s1", "text": REF + " Stable since the prior radiograph."}) + "\n"
                       + json.dumps({"id": "s2", "text": "Findings: The lungs are clear. Impression: Normal."}) + "\n"
                       + json.dumps({"id": "s3", "text": "Unchanged."}) + "\n")
    assert main(["--annotation", str(ann), "--samples", str(samples), "--edit", "--out", str(out)]) == 0
    (pair,) = _pairs(out)
    assert pair["chosen"] == REF and pair["rejected"].endswith("prior radiograph.")
    assert json.loads((tmp_path / "edit.jsonl.stats.json").read_text())["skipped"] == {
        "nothing_left_after_edit": 1, "nothing_to_remove": 1}


def test_preference_from_samples_errors(tmp_path, capsys):
    from data_prep.preference_from_samples import main

    bad = tmp_path / "annotation.json"
    bad.write_text(json.dumps({"train": [{"id": "s1", "report": "x", "image_path": 3}]}))
    assert main(["--annotation", str(bad), "--edit", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "train[0] (id s1): image_path is" in capsys.readouterr().err
    assert main(["--annotation", str(bad), "--rank-by", "rouge_l", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["--annotation", str(tmp_path / "nope.json"), "--edit", "--out", str(tmp_path / "o.jsonl")]) == 2
    ok = _annotation(tmp_path)
    assert main(["--annotation", str(ok), "--samples", str(tmp_path / "missing.jsonl"), "--rank-by", "rouge_l",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--samples not found" in capsys.readouterr().err


def test_synthetic_preference_pairs(synth_dir):
    """data_prep.synth's pairs: chosen is the ground truth (no comparison, nothing unsupported); rejected differs
    from it by one fact (a comparison, a finding, a side or a size), and the training reports compare with a
    prior exam where the test reports never do."""
    from vlm.factuality import factuality_metrics

    pairs = [json.loads(x) for x in (synth_dir / "preference" / "pairs.jsonl").read_text().splitlines()]
    ann = json.loads((synth_dir / "eval" / "iu_xray" / "annotation.json").read_text())
    assert len(pairs) == 2 * len(ann["train"]) > 0
    for p in pairs:
        assert (synth_dir / "eval" / "iu_xray" / "images" / p["image"]).is_file()
        assert p["chosen"] != p["rejected"]
    reports = [p for p in pairs if p["kind"] != "vqa"]
    assert {p["kind"] for p in reports} == {"prior", "finding", "side", "size"}
    chosen = [p["chosen"] for p in reports]
    assert factuality_metrics(chosen, chosen)["prior_exam_sentence_rate"] == 0
    for kind in ("prior", "side"):
        sub = [p for p in reports if p["kind"] == kind]
        m = factuality_metrics([p["chosen"] for p in sub], [p["rejected"] for p in sub])
        assert (m["prior_exam_report_rate"], m["hallucinated_report_rate"]) == ((1.0, 0.0) if kind == "prior"
                                                                                 else (0.0, 1.0))
    train = factuality_metrics([a["report"] for a in ann["train"]], [a["report"] for a in ann["train"]])
    test = factuality_metrics([a["report"] for a in ann["test"]], [a["report"] for a in ann["test"]])
    assert 0.3 < train["prior_exam_report_rate"] < 0.9 and test["prior_exam_report_rate"] == 0


def test_report_rewards_hand_computed():
    """GRPO's report rewards (vlm/rewards.py) score the report inside <answer> like eval.report does."""
    from vlm.rewards import get_reward

    rouge, bleu, fact = (get_reward(n) for n in ("report_rouge_l", "report_bleu_4", "factuality"))
    assert rouge(REF, REF, "") == pytest.approx(1.0) and bleu(REF, REF, "") == pytest.approx(1.0)
    assert rouge(f"<think>left nodule</think><answer>{REF}</answer>", REF, "") == pytest.approx(1.0)
    bad = ("Findings: The heart size is normal. There is a right pleural effusion. Unchanged since the prior study. "
           "Impression: Right effusion.")
    assert fact(REF, REF, "") == 1.0 and fact(bad, REF, "") == 0.0  # one hallucinated finding + one comparison
    assert fact("Findings: Stable. Impression: Left upper nodule.", REF, "") == 0.5
    assert 0 < rouge(bad, REF, "") < 1
    for empty in ("", " . ", "<answer></answer>"):  # never rewarded (R2Gen's cleaning would score " .")
        assert rouge(empty, REF, "") == bleu(empty, REF, "") == fact(empty, REF, "") == 0.0


def test_numbered_lists_and_long_inputs():
    report = "1. Unchanged left effusion. 2. No pneumothorax. 3. No edema."
    assert sentences(report) == ["1. Unchanged left effusion.", "2. No pneumothorax.", "3. No edema."]
    assert factuality_metrics(["x"], [report])["prior_exam_sentence_rate"] == pytest.approx(1 / 3)
    assert remove_unsupported("1. Unchanged left effusion. 2. No pneumothorax.") == "2. No pneumothorax."
    import time

    t = time.time()  # no quadratic look-back: a megabyte of one clause in seconds, not hours
    assert positive_findings("effusion " * 120000) == {Finding("effusion", None)}
    assert positive_findings("no effusion, " * 80000) == set()
    assert time.time() - t < 20


def test_reasoning_reports_are_scored_on_their_answer(tmp_path):
    """eval.report score reads the report inside <answer> (the thinking may name findings the report does not):
    the same scores as the plain reports, format_rate 1, the raw output kept in the CSV."""
    import csv

    from eval.report import main

    ann = {"test": [{"id": "a", "report": REF, "image_path": ["a/0.png"]}]}
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    results = {}
    for name, text in (("plain", REF), ("think", f"<think>Right effusion? No, a left nodule.</think><answer>{REF}</answer>")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": "a", "text": text}) + "\n")
        assert main(["score", "--benchmark", "iu_xray", "--annotation", str(tmp_path / "annotation.json"),
                     "--predictions", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / f"{name}.json"),
                     "--no-clinical"]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    p, t = results["plain"], results["think"]
    assert (p["format_rate"], t["format_rate"]) == (0.0, 1.0)
    assert all(p[k] == t[k] for k in ("bleu_4", "rouge_l", "cider", "factuality"))
    with open(tmp_path / "think.reports.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["prediction"] == REF and row["raw_output"].startswith("<think>")
