"""eval.compare: McNemar's exact test and the paired bootstrap on hand-computed cases (and scipy's binomial
test as the reference), and the entry point on hand-written per-question files."""
import csv
import json

import numpy as np
import pytest

from eval.compare import main, mcnemar_exact, paired_bootstrap


@pytest.mark.parametrize("a_only,b_only,p", [(1, 2, 1.0), (0, 6, 2 / 64), (2, 8, 2 * (1 + 10 + 45) / 1024),
                                             (0, 0, 1.0), (5, 5, 1.0)])
def test_mcnemar_exact_hand_computed(a_only, b_only, p):
    both = 7  # concordant pairs do not count
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * 3)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * 3)
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"]) == (a_only, b_only) and r["p"] == pytest.approx(p, rel=1e-12)


def test_mcnemar_equals_scipy_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (15, 200, 20000):
        a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
        r = mcnemar_exact(a, b)
        want = stats.binomtest(min(r["a_only"], r["b_only"]), r["a_only"] + r["b_only"], 0.5).pvalue
        assert r["p"] == pytest.approx(want, rel=1e-9)


def test_paired_bootstrap():
    same = np.array([1.0, 0.0, 1.0, 1.0])
    assert paired_bootstrap(same, same, 500, 0) == [0.0, 0.0]
    assert paired_bootstrap(np.zeros(6), np.ones(6), 500, 0) == [1.0, 1.0]
    a, b = np.array([1.0, 0, 0, 1, 0, 1, 1, 0]), np.array([1.0, 1, 0, 1, 1, 1, 0, 1])
    # by hand: the same resampled indices for both runs, the mean difference per resample, its percentiles
    idx = np.random.default_rng(3).integers(0, 8, size=(400, 8))
    diffs = [np.mean([b[i] - a[i] for i in row]) for row in idx]
    assert paired_bootstrap(a, b, 400, 3) == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)])


def _vqa_result(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"benchmark": name, "closed_accuracy": 0.0}))
    with open(folder / f"{name}.questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question_id", "answer_type", "strict_correct", "exact_match", "recall"])
        for qid, kind, value in rows:
            w.writerow([qid, kind, value if kind == "CLOSED" else "", value if kind == "OPEN" else "",
                        value if kind == "OPEN" else ""])
    return folder / f"{name}.json"


def test_compare_two_vqa_results(tmp_path, capsys):
    a = _vqa_result(tmp_path / "a", "slake", [(1, "CLOSED", 1), (2, "CLOSED", 0), (3, "CLOSED", 0), (4, "OPEN", 0.5),
                                              (5, "OPEN", 1)])
    b = _vqa_result(tmp_path / "b", "slake", [(1, "CLOSED", 1), (2, "CLOSED", 1), (3, "CLOSED", 1), (4, "OPEN", 1),
                                              (5, "OPEN", 1)])
    assert main([str(a), str(b), "--out", str(tmp_path / "c.json"), "--bootstrap", "200"]) == 0
    r = json.loads((tmp_path / "c.json").read_text())["benchmarks"]["slake"]
    assert r["closed_accuracy"]["a"] == pytest.approx(1 / 3) and r["closed_accuracy"]["diff"] == pytest.approx(2 / 3)
    assert r["closed_accuracy"]["mcnemar"] == {"a_only": 0, "b_only": 2, "p": 0.5}
    assert r["open_recall"]["diff"] == pytest.approx(0.25) and "mcnemar" not in r["open_recall"]
    assert r["exact_match"]["n"] == 2
    assert "| slake | closed_accuracy | 3 |" in capsys.readouterr().out
    assert (tmp_path / "c.md").is_file()


def test_compare_refuses_different_questions_and_wrong_inputs(tmp_path, capsys):
    a = _vqa_result(tmp_path / "a", "slake", [(1, "CLOSED", 1), (2, "CLOSED", 0)])
    b = _vqa_result(tmp_path / "b", "slake", [(1, "CLOSED", 1), (3, "CLOSED", 0)])
    assert main([str(a), str(b)]) == 2
    assert "slake: the two runs answered different questions (1 only in A, 1 only in B)" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), str(b)]) == 2  # a folder without summary.json
    assert "not an eval.suite output folder" in capsys.readouterr().err
    (tmp_path / "a" / "slake.questions.csv").unlink()
    assert main([str(a), str(a)]) == 2
    assert "slake.questions.csv not found" in capsys.readouterr().err


def test_compare_suite_folders_with_reports(tmp_path):
    ref = "Findings: There is a 12 mm nodule in the left upper lung zone. Impression: Left upper nodule."
    preds = {"a": [ref + " Unchanged since the prior study.", "Findings: A right effusion. Impression: Effusion."],
             "b": [ref, "Findings: A left nodule. Impression: Left nodule."]}
    for run, texts in preds.items():
        d = tmp_path / run
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"benchmarks": {"iu_xray": {}}}))
        (d / "iu_xray.json").write_text(json.dumps({"benchmark": "iu_xray", "bleu_4": 0.1}))
        with open(d / "iu_xray.reports.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "reference", "prediction"])
            for i, t in enumerate(texts):
                w.writerow([f"s{i}", ref, t])
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.json")]) == 0
    r = json.loads((tmp_path / "c.json").read_text())["benchmarks"]["iu_xray"]
    assert r["reports_with_prior_exam"]["a"] == 0.5 and r["reports_with_prior_exam"]["b"] == 0.0
    assert r["reports_with_hallucinated_finding"]["mcnemar"] == {"a_only": 1, "b_only": 0, "p": 1.0}
    assert r["rouge_l"]["diff"] > 0
