"""The synthetic corpus (layout, determinism, consistency) and data_prep.inspect."""
from __future__ import annotations

import json
import re
import shutil

from data_prep.inspect import main as inspect_main
from data_prep.synth import FINDINGS, MODALITIES, caption, make_case, render, report, vqa
from data_prep.synth import main as synth_main
from vlm.data.schema import read_manifest

import numpy as np


def test_layout(synth_dir):
    for kind in ("pretrain", "instruct"):
        assert read_manifest(synth_dir / kind).num_samples == 240
    slake = json.loads((synth_dir / "eval/slake/test.json").read_text())
    assert {"img_id", "img_name", "question", "answer", "q_lang", "answer_type", "qid"} <= set(slake[0])
    assert all((synth_dir / "eval/slake/imgs" / r["img_name"]).is_file() for r in slake)
    assert {r["answer_type"] for r in slake} == {"OPEN", "CLOSED"}
    ann = json.loads((synth_dir / "eval/iu_xray/annotation.json").read_text())
    assert set(ann) == {"train", "val", "test"} and ann["test"]
    for rec in ann["test"]:
        assert len(rec["image_path"]) == 2
        assert all((synth_dir / "eval/iu_xray/images" / p).is_file() for p in rec["image_path"])
    zs = synth_dir / "eval/zeroshot"
    assert {d.name for d in (zs / "modality").iterdir()} == set(MODALITIES)
    assert {d.name for d in (zs / "finding").iterdir()} == set(FINDINGS)
    assert sum(1 for _ in (zs / "modality").rglob("*.png")) == 40


def test_deterministic_for_a_seed(synth_dir, tmp_path):
    args = ["--num-train", "240", "--num-test", "40", "--image-size", "32", "--shard-size", "50", "--workers", "2",
            "--quiet"]
    assert synth_main(["--out", str(tmp_path / "again"), *args]) == 0
    for kind in ("pretrain", "instruct"):
        a, b = read_manifest(synth_dir / kind), read_manifest(tmp_path / "again" / kind)
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (synth_dir / "eval/slake/test.json").read_bytes() == (tmp_path / "again/eval/slake/test.json").read_bytes()
    assert synth_main(["--out", str(tmp_path / "again"), *args]) == 2  # not empty, no --overwrite


def test_everything_derives_from_one_ground_truth():
    for i in range(200):
        case = make_case(0, "train", i)
        rng = np.random.default_rng(i)
        cap = caption(case, rng).lower()
        if case.finding == "none":
            assert re.search(r"no acute abnormality|normal|unremarkable", cap)
        else:
            assert case.finding in cap and case.side in cap
        for qa in vqa(case, rng):
            q, a = qa["question"], qa["answer"]
            if q.startswith("Is there a "):
                assert (a == "yes") == (q.split()[3] == case.finding)
            if q == "What is the main finding?":
                assert a == ("no abnormality" if case.finding == "none" else case.finding)
            if q.startswith("Which side"):
                assert a == case.side
        if case.modality == "chest_xray":
            r = report(case, rng)
            assert r.startswith("Findings:") and "Impression:" in r
        img = render(case, 32)
        assert img.dtype == np.uint8 and img.shape[:2] == (32, 32)


def test_findings_change_the_pixels():
    """The finding is visible: the same case rendered with and without it differs where it was drawn."""
    case = next(c for c in (make_case(1, "train", i) for i in range(100)) if c.finding == "mass")
    normal = make_case(1, "train", 0)
    normal.__dict__.update(modality=case.modality, finding="none", side=None, zone=None, size_mm=None,
                           seed=case.seed)
    diff = np.abs(render(case, 64).astype(int) - render(normal, 64).astype(int))
    assert diff.max() > 60


def test_inspect_ok_then_detects_tampering(synth_dir, tmp_path, capsys):
    assert inspect_main([str(synth_dir / "pretrain")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "chest x-ray" in out
    copy = tmp_path / "copy"
    shutil.copytree(synth_dir / "pretrain", copy)
    shard = sorted(copy.glob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert inspect_main([str(copy), "--json"]) == 1
    report_ = json.loads(capsys.readouterr().out)
    assert any("sha256" in p for p in report_["problems"])
    (copy / "shard-000009.tar.tmp").write_bytes(b"")
    assert inspect_main([str(copy), "--no-verify"]) == 1
    assert "interrupted" in capsys.readouterr().out
    assert inspect_main([str(tmp_path)]) == 2
