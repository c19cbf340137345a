"""Errors that name what is wrong, in one line, with exit 2 and nothing written; values that are not
accepted; empty generated reports counted beside the protocol's numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CLIP = ["--config", str(REPO / "configs/clip/demo.yaml"), "train.progress=false", "zeroshot=[]"]

BAD_VALUES = {
    "optim.lr=-1": "optim.lr must be a positive number, got -1",
    "optim.lr=.nan": "optim.lr must be a positive number, got nan",
    "optim.grad_clip=-1": "optim.grad_clip must be a finite number >= 0",
    "optim.beta2=1.5": "optim.beta1 and optim.beta2 must be in [0, 1)",
    "optim.warmup_steps=-3": "optim.warmup_steps must be >= 0",
    "train.save_every=-1": "train.save_every must be >= 0 (0: only at the end), got -1",
    "train.keep_last=-2": "train.keep_last must be >= 0 (0: keep all), got -2",
    "train.log_every=0": "train.log_every must be >= 1, got 0",
    "train.max_nonfinite=0": "train.max_nonfinite must be >= 1, got 0",
    "train.eval_every=-5": "train.eval_every must be >= 0",
    "optim.min_lr_ratio=2": "optim.min_lr_ratio must be in [0, 1]",
}
CLIP_ONLY = {
    "loss.logit_scale_max=.nan": "loss.logit_scale_max must be a finite number > 1, got nan",
    "loss.logit_scale_max=-1": "loss.logit_scale_max must be a finite number > 1, got -1",
    "loss.concept_weight=.nan": "loss.concept_weight must be a finite number >= 0, got nan",
}


def one_error_line(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


@pytest.mark.parametrize("entry, override", [(e, o) for e in ("train.clip", "train.instruct") for o in sorted(BAD_VALUES)]
                         + [("train.clip", o) for o in sorted(CLIP_ONLY)])
def test_values_that_are_not_accepted(entry, override, tmp_path, capsys, drill):
    import importlib

    out = tmp_path / "run"
    cfg = REPO / ("configs/clip/demo.yaml" if entry == "train.clip" else "configs/instruct/demo_stage2.yaml")
    with drill.input(f"{entry} {override}"):
        rc = importlib.import_module(entry).main(["--config", str(cfg), f"train.output_dir={out}", override])
        lines = one_error_line(capsys)
        expected = {**BAD_VALUES, **CLIP_ONLY}[override]
        assert rc == 2 and len(lines) == 1 and expected in lines[0] and str(cfg) in lines[0], lines
        assert not out.exists()


YAML = {
    "unclosed flow": (b"train:\n  steps: [1,\n", "not valid YAML (line 3, column 1: expected the node content"),
    "tab indentation": (b"train:\n\tsteps: 3\n", "not valid YAML (line 2, column 1: found character '\\t'"),
    "not UTF-8": (b"train:\n  output_dir: \xff\xfe\n", "not UTF-8 text (byte 21)"),
    "a list at the top": (b"- 1\n- 2\n", "top level must be a mapping, got list"),
    "a recursive alias": (b"a: &a [*a]\n", "not valid YAML (a recursive alias)"),
}


@pytest.mark.parametrize("case", sorted(YAML))
def test_invalid_yaml_is_one_line_naming_the_file(case, tmp_path, capsys, drill):
    from train.clip import main

    data, expected = YAML[case]
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(data)
    with drill.input(f"config file: {case}"):
        rc = main(["--config", str(cfg)])
        lines = one_error_line(capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {cfg}: {expected}"), lines


def test_invalid_state_json_of_an_unchecksummed_checkpoint(tmp_path, capsys, drill, synth_dir, tiny32):
    """A checkpoint of an earlier version (no checksums.json) with a broken state.json: one line naming it."""
    from train.clip import main

    out = tmp_path / "run"
    args = [*CLIP, f"model.name={tiny32}", f"data.sources.0.path={synth_dir / 'pretrain'}", "data.num_workers=0",
            "data.batch_size=8", "data.image.size=32", f"train.output_dir={out}", "train.steps=1",
            "train.tensorboard=false", "optim.warmup_steps=0"]
    assert main(args) == 0
    step = out / "checkpoints/step_00000001"
    (step / "checksums.json").unlink()
    (step / "state.json").write_text('{"step": 1, "data": [')
    capsys.readouterr()
    with drill.input("invalid state.json (no checksums)"):
        rc = main([*args[:-2], "train.steps=2", "train.resume=latest", "optim.warmup_steps=0"])
        lines = [x for x in one_error_line(capsys) if x.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and f"{step / 'state.json'}: unreadable" in lines[0], lines


def test_non_utf8_predictions_name_file_and_line(tmp_path, capsys, drill):
    from eval.report import main as report_main
    from eval.vqa import main as vqa_main

    preds = tmp_path / "p.jsonl"
    preds.write_bytes(b'{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": "\xe9t\xe9"}\n')
    with drill.input("non-UTF-8 VQA predictions"):
        rc = vqa_main(["score", "--benchmark", "slake", "--data-root", str(REPO / "tests/fixtures/slake"),
                       "--split", "validate", "--predictions", str(preds), "--out", str(tmp_path / "r.json")])
        lines = one_error_line(capsys)
        assert rc == 2 and lines == [f"error: {preds}:2: not UTF-8 text (byte 62)"], lines
    with drill.input("non-UTF-8 report predictions"):
        rc = report_main(["score", "--benchmark", "iu_xray", "--annotation", str(REPO / "tests/fixtures/iu_xray/annotation.json"),
                          "--split", "val", "--predictions", str(preds), "--out", str(tmp_path / "r2.json")])
        lines = one_error_line(capsys)
        assert rc == 2 and lines == [f"error: {preds}:2: not UTF-8 text (byte 62)"], lines
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r2.json").exists()


def test_predictions_with_line_separators_in_strings_and_a_bom(tmp_path, capsys, drill):
    """json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw inside strings: still one line each."""
    from eval.report import main

    ann = REPO / "tests/fixtures/iu_xray/annotation.json"
    ids = [r["id"] for r in json.loads(ann.read_text())["val"]]
    preds = tmp_path / "p.jsonl"
    body = "".join(json.dumps({"id": i, "text": "heart normal.\u2028no effusion\u0085."}, ensure_ascii=False) + "\n"
                   for i in ids)
    preds.write_bytes(b"\xef\xbb\xbf" + body.encode())
    with drill.input("predictions: raw U+2028/U+0085 in strings, a BOM"):
        rc = main(["score", "--benchmark", "iu_xray", "--annotation", str(ann), "--split", "val", "--predictions",
                   str(preds), "--out", str(tmp_path / "r.json"), "--no-clinical"])
        assert rc == 0, capsys.readouterr().err[-2000:]
        assert json.loads((tmp_path / "r.json").read_text())["num_reports"] == len(ids)


def test_empty_reports_are_counted_and_the_protocol_numbers_kept(tmp_path, capsys, drill):
    """Empty and whitespace reports: num_empty in the result and a warning; BLEU/ROUGE-L as the protocol gives."""
    from eval.report import main

    ann = REPO / "tests/fixtures/iu_xray/annotation.json"
    ids = [r["id"] for r in json.loads(ann.read_text())["val"]]
    preds = tmp_path / "p.jsonl"
    texts = ["", "   ", ".", "\u200b"] + ["the heart is normal in size. no effusion."] * (len(ids) - 4)
    preds.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
    with drill.input("empty and whitespace reports"):
        rc = main(["score", "--benchmark", "iu_xray", "--annotation", str(ann), "--split", "val", "--predictions",
                   str(preds), "--out", str(tmp_path / "r.json"), "--no-clinical"])
        err = capsys.readouterr().err
        assert rc == 0, err
        result = json.loads((tmp_path / "r.json").read_text())
        assert result["num_empty"] == 4 and result["num_reports"] == len(ids)
        assert "4 of 10 reports are empty (no letter or digit)" in err
        assert result["rouge_l"] > 0  # the protocol still scores " ." against the references: kept as published
