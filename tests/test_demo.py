"""`make demo` at test size (DEMO_CONFIGS=configs/demo/tiny, a 240-case corpus): the same Makefile,
entry points and configs as the real demo, only less work. Checks the summary's keys, the report and
its images, the exports answering through the stock libraries, resuming, a failing stage's message,
and (evaluation issue) sharded generation under torchrun merging to the single-process answers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, torchrun

SKIP_AT_ROOT = {".git", ".venv", ".peer-venv", "runs", "data", ".pytest_cache", "medvlm.egg-info"}
SUMMARY_KEYS = ["zeroshot.modality_accuracy", "zeroshot.finding_accuracy", "retrieval.image_to_text_r1",
                "vqa.closed_accuracy", "vqa.open_recall", "report.bleu_4", "report.rouge_l", "exports.open_clip",
                "exports.transformers", "seconds"]


def make_demo(root: Path, *extra: str) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)  # the virtual environment running the tests (make test's .venv)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    # INSTALL=: the copy uses the tests' environment as it is (never an editable install of the temporary copy)
    return subprocess.run(["make", "--no-print-directory", "demo", f"VENV={venv}", "INSTALL=", "DEMO_CONFIGS=configs/demo/tiny",
                           "SYNTH_TRAIN=240", "SYNTH_TEST=24", *extra], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "repo"
    shutil.copytree(REPO, root, ignore=lambda d, names: [n for n in names if n == "__pycache__" or (
        Path(d) == REPO and n in SKIP_AT_ROOT)])
    r = make_demo(root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, r


def get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def test_demo_summary_report_and_exports(demo):
    root, r = demo
    assert "(1/15) synth" in r.stdout and "(15/15) summary" in r.stdout
    s = json.loads((root / "runs/demo/summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert get(s, key) is not None, key
    for name in ("open_clip", "transformers"):
        assert not Path(s["exports"][name]).is_absolute() and (root / s["exports"][name]).is_dir()
    assert 0 <= s["report"]["bleu_4"] <= 1
    # every stage learns, even at test size, by margins the tiny demo reaches reliably (measured: modality
    # 0.79-0.92 of 24 images, chance 0.2; image->text R@1 0.17-0.25, chance 0.04; open VQA exact match 0.55,
    # the most frequent open answer 0.13; report ROUGE-L 0.54, the constant report 0.15)
    assert s["zeroshot"]["modality_accuracy"] >= 0.5
    assert s["retrieval"]["image_to_text_r1"] >= 2 * s["retrieval"]["chance_r1"]
    test = json.loads((root / "data/demo/synth/eval/slake/test.json").read_text())
    opened = [str(q["answer"]).lower() for q in test if q.get("answer_type") == "OPEN" and q.get("q_lang") == "en"]
    majority = max(opened.count(a) for a in set(opened)) / len(opened)
    vqa = json.loads((root / "runs/demo/suite/slake.json").read_text())
    assert vqa["exact_match"] >= majority + 0.2, (vqa["exact_match"], majority)
    assert s["report"]["rouge_l"] >= s["report"]["baseline_rouge_l"] + 0.1
    assert s["report"]["baseline_text"] == "No acute abnormality." and "baseline_bleu_4" in s["report"]
    assert s["seconds"] > 0 and set(s["stage_seconds"]) >= {"clip", "stage2", "eval", "preference", "eval_preference"}
    # the preference stage: DPO from the stage-2 run, evaluated the same way (at test size only the plumbing:
    # the learning is measured on the full demo, README)
    pref = s["preference"]
    keys = {"closed_accuracy", "open_recall", "bleu_4", "rouge_l", "prior_exam_sentence_rate",
            "hallucinated_finding_rate"}
    assert keys <= set(pref["before"]) and set(pref["before"]) == set(pref["after"]) == set(pref["change"])
    assert pref["before"]["closed_accuracy"] == s["vqa"]["closed_accuracy"]
    m = [json.loads(x) for x in (root / "runs/demo/preference/metrics.jsonl").read_text().splitlines()]
    assert abs(m[0]["loss"] - 0.6931) < 1e-3 and all("rewards/margins" in x for x in m)  # the SFT model vs itself
    assert (root / "data/demo/shards/preference/manifest.json").is_file()
    kinds = {a["kind"]: a for a in s["asked"]}
    assert set(kinds) == {"open_clip", "transformers"}
    assert kinds["open_clip"]["answer"] in kinds["open_clip"]["labels"]
    readme = (root / "runs/demo/README.md").read_text()
    for png in ("training_curves.png", "zeroshot_finding_confusion.png"):
        assert f"]({png})" in readme and (root / "runs/demo" / png).stat().st_size > 1000
    suite = json.loads((root / "runs/demo/suite/summary.json").read_text())
    assert set(suite["benchmarks"]) == {"slake", "iu_xray"}
    assert "LLaVA-Med" in (root / "runs/demo/suite/summary.md").read_text()  # anchors beside ours


def test_demo_resumes_and_names_a_failing_stage(demo):
    root, _ = demo
    again = make_demo(root)
    assert again.returncode == 0 and "[demo] (" not in again.stdout  # nothing to redo
    (root / "runs/demo/.stages/ask").unlink()
    bad = make_demo(root, "QUESTION_IMAGE=/nonexistent/image.png")
    assert bad.returncode != 0
    assert "stage 'ask' FAILED; see runs/demo/logs/ask.log" in bad.stdout
    good = make_demo(root)
    assert good.returncode == 0
    ran = [line.split(") ")[1].split(" ")[0] for line in good.stdout.splitlines() if line.startswith("[demo] (")]
    assert ran == ["ask", "summary"]


def test_sharded_generation_merges_to_the_single_process_answers(demo):
    root, _ = demo
    single = root / "runs/demo/suite/slake_predictions.jsonl"
    out = root / "runs/sharded.jsonl"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = ["-m", "eval.vqa", "generate", "--checkpoint", "runs/demo/stage2", "--benchmark", "slake",
           "--data-root", "data/demo/synth/eval/slake", "--out", str(out), "--batch-size", "32",
           "--max-new-tokens", "8"]
    r = torchrun(2, cmd, env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == single.read_text()  # same answers, in question order
    assert not list(out.parent.glob("sharded.jsonl.part*"))
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[::2]) + "\n")  # resume: half the answers are kept, the rest regenerated
    r = torchrun(2, cmd, env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == single.read_text()


def test_sample_and_rank_report_pairs(demo, tmp_path):
    """The sample-and-rank recipe on the demo's stage-2 assistant: eval.report generate --num-samples writes
    N sampled reports per study (ids <id>#<k>, reproducible with the seed), data_prep.preference_from_samples
    ranks them into best-vs-worst pairs that data_prep.shards --format preference reads."""
    root, _ = demo
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    ann = root / "data/demo/synth/eval/iu_xray/annotation.json"
    studies = [a["id"] for a in json.loads(ann.read_text())["val"]]
    gen = [sys.executable, "-m", "eval.report", "generate", "--checkpoint", "runs/demo/stage2", "--benchmark",
           "iu_xray", "--annotation", str(ann), "--split", "val", "--num-samples", "3", "--temperature", "1.5",
           "--max-new-tokens", "24", "--batch-size", "16"]
    outs = []
    for name in ("a", "b"):
        r = subprocess.run([*gen, "--out", str(tmp_path / f"{name}.jsonl")], cwd=root, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append((tmp_path / f"{name}.jsonl").read_text())
    assert outs[0] == outs[1]  # same seed, same samples
    lines = outs[0].splitlines(keepends=True)  # killed after 20 samples (a batch and a bit): resumed, the same file
    (tmp_path / "c.jsonl").write_text("".join(lines[:20]))
    r = subprocess.run([*gen, "--out", str(tmp_path / "c.jsonl")], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "c.jsonl").read_text() == outs[0], r.stderr[-2000:]
    rows = [json.loads(x) for x in outs[0].splitlines()]
    assert [r["id"] for r in rows] == [f"{s}#{k}" for s in studies for k in range(3)]
    by_study = {s: {r["text"] for r in rows if r["id"].startswith(s + "#")} for s in studies}
    assert sum(len(t) > 1 for t in by_study.values()) >= len(studies) // 2  # sampling, not greedy
    r = subprocess.run([sys.executable, "-m", "data_prep.preference_from_samples", "--annotation", str(ann), "--split",
                        "val", "--samples", str(tmp_path / "a.jsonl"), "--rank-by", "rouge_l", "--out",
                        str(tmp_path / "pairs.jsonl")], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    r = subprocess.run([sys.executable, "-m", "data_prep.shards", "--format", "preference", "--input",
                        str(tmp_path / "pairs.jsonl"), "--image-root", str(ann.parent / "images"), "--out",
                        str(tmp_path / "shards"), "--workers", "0", "--quiet"], cwd=root, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "shards/manifest.json").read_text())["num_samples"] == len(pairs)
