"""Benchmark releases that name images outside themselves (``..``, absolute paths, links pointing out) are
refused with the record named, before any image is read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("form", ["dotdot", "absolute", "symlink"])
def test_slake_image_outside_the_release(form, tmp_path, capsys, drill):
    from eval.vqa import main

    root = tmp_path / "slake"
    (root / "imgs").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the model")
    records = json.loads((REPO / "tests/fixtures/slake/validate.json").read_text())
    name = {"dotdot": "../../secret.png", "absolute": str(secret), "symlink": "link.png"}[form]
    if form == "symlink":
        (root / "imgs" / "link.png").symlink_to(secret)
    records[3]["img_name"] = name
    (root / "validate.json").write_text(json.dumps(records))
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"question_id": r["qid"], "text": "yes"}) + "\n" for r in records
                             if r["q_lang"] == "en"))
    with drill.hole(f"eval benchmark image path leaving the release: {form}"):
        rc = main(["score", "--benchmark", "slake", "--data-root", str(root), "--split", "validate",
                   "--predictions", str(preds), "--out", str(tmp_path / "r.json")])
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert rc == 2 and err == [f"error: {root / 'validate.json'}: record 3: its image path leaves {root / 'imgs'}"], err


def test_r2gen_image_outside_the_release(tmp_path, capsys, drill):
    from eval.report import main

    ann = json.loads((REPO / "tests/fixtures/iu_xray/annotation.json").read_text())
    ann["val"][2]["image_path"] = ["../../../etc/passwd"]
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    with drill.hole("eval report image path leaving the release"):
        rc = main(["score", "--benchmark", "iu_xray", "--annotation", str(tmp_path / "annotation.json"), "--split",
                   "val", "--constant", "no acute findings.", "--out", str(tmp_path / "r.json"), "--no-clinical"])
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
        assert rc == 2 and err == [f"error: {tmp_path / 'annotation.json'}: val[2]: its image path leaves "
                                   f"{tmp_path / 'images'}"], err
