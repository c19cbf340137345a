"""Generation prompts per benchmark and the suite's summary beside the published anchors."""
from __future__ import annotations

import pytest

from eval.prompts import load_prompts, vqa_prompt
from eval.suite import Anchor, SuiteConfig, load_anchors, summarize


def test_prompts_per_benchmark_with_closed_options_off_by_default(tmp_path):
    p = load_prompts("slake")
    assert vqa_prompt(p, "Is there a mass?", "CLOSED") == "Is there a mass?"
    with_options = vqa_prompt(p, "Is there a mass?", "CLOSED", options=True)
    assert with_options.startswith("Is there a mass?") and "yes" in with_options and "no" in with_options
    assert vqa_prompt(p, "Which organ?", "OPEN", options=True) == "Which organ?"  # open questions never get options
    assert load_prompts("iu_xray").report.startswith("Write the radiology report")
    custom = tmp_path / "prompts.yaml"
    custom.write_text("benchmarks:\n  default:\n    open: 'Q: {question} A:'\n    closed: 'Q: {question} (yes/no) A:'\n")
    p = load_prompts("vqa_rad", custom)  # not listed: the file's default entry
    assert vqa_prompt(p, "Is it normal?", "CLOSED") == "Q: Is it normal? (yes/no) A:"
    custom.write_text("benchmarks:\n  slake:\n    open: 'no placeholder'\n")
    with pytest.raises(ValueError, match=r"slake.open must contain \{question\}"):
        load_prompts("slake", custom)
    with pytest.raises(FileNotFoundError):
        load_prompts("slake", tmp_path / "missing.yaml")


def test_anchors_file_names_sources_and_settings():
    anchors = load_anchors(None)
    assert anchors
    for a in anchors:
        from eval.benchmarks import CHOICE_BENCHMARKS

        assert "arXiv" in a.source and a.setting and a.note and a.protocol in ("llava_med", "strict", "report", "paper")
        for bench, values in a.results.items():
            assert bench in ("vqa_rad", "slake", "pathvqa", "iu_xray", "mimic_cxr", *CHOICE_BENCHMARKS)
            assert all(0 <= v <= 100 for v in values.values())
            # multiple-choice anchors are accuracies reported with the source's own extraction
            assert (bench in CHOICE_BENCHMARKS) == (a.protocol == "paper") and (
                a.protocol != "paper" or set(values) == {"accuracy"})


def test_summary_sets_ours_beside_the_anchors():
    vqa = {"closed_accuracy": 0.8, "open_recall": 0.5, "exact_match": 0.4, "token_f1": 0.45, "num_closed": 10,
           "num_open": 12, "llava_med": {"closed_accuracy": 0.82, "open_recall": 0.55}}
    rep = {"bleu_1": 0.3, "bleu_4": 0.1, "meteor": None, "rouge_l": 0.3, "cider": 0.2, "num_reports": 5}
    anchors = [Anchor(model="Paper model", source="X et al., arXiv:0000.00000, Table 1", setting="fine-tuned",
                      results={"slake": {"closed_accuracy": 85.0, "open_recall": 80.0}})]
    summary, md = summarize({"slake": vqa, "iu_xray": rep}, anchors, SuiteConfig(checkpoint="ckpt"))
    assert summary["benchmarks"]["slake"]["llava_med"]["closed_accuracy"] == 0.82
    assert summary["benchmarks"]["iu_xray"]["bleu_4"] == 0.1
    assert summary["anchors"][0]["results"] == {"slake": {"closed_accuracy": 85.0, "open_recall": 80.0}}
    assert "| **ours** | strict | 80.0 | 50.0 |" in md and "| **ours** | llava_med | 82.0 | 55.0 |" in md
    assert "| Paper model | llava_med | 85.0 | 80.0 |" in md
    assert "| **ours** | iu_xray | 0.300 | 0.100 | n/a | 0.300 | 0.200 |" in md
    assert "X et al., arXiv:0000.00000, Table 1" in md


def test_run_summary_names_bad_inputs_and_sums_stage_times(tmp_path):
    import json

    from eval.summary import main as summary_main

    zs = {"accuracy": 0.9, "balanced_accuracy": 0.85, "num_classes": 3, "num_images": 30}
    (tmp_path / "zs.json").write_text(json.dumps(zs))
    (tmp_path / "stages").mkdir()
    for name, secs in (("clip", "12"), ("eval", "3")):
        (tmp_path / "stages" / name).write_text(secs + "\n")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"step": i, "loss": 2.0 / i}) + "\n" for i in range(1, 5)))
    out = tmp_path / "out"
    assert summary_main(["--out", str(out), "--zeroshot", f"modality={tmp_path / 'zs.json'}",
                         "--curves", f"clip={tmp_path / 'm.jsonl'}", "--stage-times", str(tmp_path / "stages")]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["zeroshot"]["modality_accuracy"] == 0.9 and s["seconds"] == 15.0
    assert (out / "training_curves.png").stat().st_size > 1000 and "training_curves.png" in (out / "README.md").read_text()
    assert summary_main(["--out", str(out), "--zeroshot", f"finding={tmp_path / 'missing.json'}"]) == 2
    assert summary_main(["--out", str(out), "--export", "no_equals_sign"]) == 2
