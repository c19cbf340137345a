"""Zero-shot and retrieval metrics (hand-computed), the eval entry points, and the open_clip export
round trip through stock open_clip."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO
from vlm.zeroshot import PromptConfig, build_classifier, classification_metrics, recall_at_k, retrieval_eval


def test_recall_at_k_hand_computed():
    q = torch.tensor([[1.0, 0], [0, 1.0], [0.6, 0.8]])
    t = torch.tensor([[1.0, 0], [0, 1.0], [0.8, 0.6]])
    # q0 -> t0: rank 0; q1 -> t2 (0.6) behind t1 (1.0): rank 1; q2 -> t1 (0.8) behind t2 (0.96): rank 1
    r = recall_at_k(q, t, [[0], [2], [1]], ks=(1, 2, 3), chunk=2)
    assert r == {"r1": pytest.approx(1 / 3), "r2": 1.0, "r3": 1.0}
    # two captions for image 0: either counts
    out = retrieval_eval(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), [0, 0, 1])
    assert out["image_to_text_r1"] == 1.0 and out["text_to_image_r1"] == pytest.approx(2 / 3)  # caption 0 points at image 1


def test_classification_metrics_hand_computed():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    m = classification_metrics(probs, labels, ["a", "b"])
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["confusion_matrix"] == [[1, 0], [1, 2]]
    assert m["auroc"]["a"] == 1.0 and m["auroc"]["b"] == 1.0


def test_prompt_ensemble_is_mean_of_normalised_then_renormalised():
    from vlm.models.clip import MedCLIP, build_tokenizer

    torch.manual_seed(0)
    model, tok = MedCLIP("tiny-vit-text").eval(), build_tokenizer("tiny-vit-text")
    prompts = PromptConfig(templates=["a {c}.", "{c} seen."], classes={"x": ["mass", "tumor"], "y": ["cyst"]})
    clf = build_classifier(model, tok, prompts, ["x", "y"])
    with torch.no_grad():
        e = model.encode_text(tok(["a mass.", "mass seen.", "a tumor.", "tumor seen."]))
    ref = torch.nn.functional.normalize(e.mean(0), dim=-1)
    assert torch.allclose(clf[0], ref, atol=1e-6) and torch.allclose(clf.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="placeholder"):
        PromptConfig(templates=["no placeholder"])


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    """A few steps of train.clip on the small corpus (32 px variant of the tiny model)."""
    import subprocess
    import sys

    arch = json.loads((REPO / "configs/model/tiny-vit-text.json").read_text())
    arch["vision_cfg"].update(image_size=32, patch_size=8)
    tmp = tmp_path_factory.mktemp("clip")
    (tmp / "tiny32.json").write_text(json.dumps(arch))
    z = synth_dir / "eval/zeroshot"
    args = ["--config", str(REPO / "configs/clip/demo.yaml"), f"model.name={tmp / 'tiny32.json'}",
            f"data.sources.0.path={synth_dir / 'pretrain'}", "data.batch_size=32", "data.num_workers=0",
            "data.image.size=32", f"train.output_dir={tmp / 'run'}", "train.steps=8", "train.save_every=0",
            "train.progress=false", "train.eval_every=4", "optim.ema_decay=0.9", f"zeroshot.0.folder={z / 'modality'}",
            f"zeroshot.1.folder={z / 'finding'}"]
    r = subprocess.run([sys.executable, "-m", "train.clip", *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


def test_periodic_zeroshot_during_training(trained):
    result = json.loads((trained / "result.json").read_text())
    assert set(result["zeroshot"]) == {"modality", "finding"}
    evals = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines() if "eval/modality/accuracy" in x]
    assert [e["step"] for e in evals] == [4, 8]
    assert (trained / "checkpoints/step_00000008/ema.safetensors").exists()


def test_eval_entry_points(trained, synth_dir, tmp_path):
    from eval.retrieval import main as retrieval_main
    from eval.zeroshot import main as zeroshot_main

    out = tmp_path / "zs.json"
    assert zeroshot_main(["--checkpoint", str(trained), "--folder", str(synth_dir / "eval/zeroshot/modality"),
                          "--prompts", str(REPO / "configs/prompts/synth_modality.yaml"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_images"] == 40 and {"accuracy", "balanced_accuracy", "macro_f1", "auroc"} <= set(r)
    assert (tmp_path / "zs_confusion.png").stat().st_size > 1000 and (tmp_path / "zs_roc.png").exists()
    out = tmp_path / "ret.json"
    assert retrieval_main(["--checkpoint", str(trained), "--pairs", str(synth_dir / "eval/retrieval.jsonl"),
                           "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_images"] == 40 and 0 <= r["image_to_text_r1"] <= r["image_to_text_r5"] <= r["image_to_text_r10"]
    assert (tmp_path / "ret_recall.png").exists()
    assert zeroshot_main(["--checkpoint", str(trained), "--folder", str(synth_dir / "eval/zeroshot/modality"),
                          "--prompts", str(REPO / "configs/prompts/synth_finding.yaml"), "--out", str(out)]) == 2


def test_open_clip_export_round_trip(trained, tmp_path):
    import open_clip

    from train.export import main as export_main
    from vlm.models.clip import load_clip

    out = tmp_path / "export"
    assert export_main(["--checkpoint", str(trained), "--to", "open_clip", "--out", str(out)]) == 0
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    stock, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    ours, _ = load_clip(trained)
    stock.eval()
    x = torch.randn(3, 3, 32, 32)
    t = tok(["chest x-ray with a small nodule", "normal head CT", "histopathology slide"])
    with torch.no_grad():
        assert torch.allclose(stock.encode_image(x, normalize=True), ours.encode_image(x), atol=1e-6)
        assert torch.allclose(stock.encode_text(t, normalize=True), ours.encode_text(t), atol=1e-6)
    assert "Zero-shot results" in (out / "README.md").read_text()
    # our loader reads the export too
    again, _ = load_clip(out)
    with torch.no_grad():
        assert torch.allclose(again.encode_image(x), ours.encode_image(x), atol=1e-6)


def test_push_to_hub_offline_is_a_clear_error(trained, tmp_path, capsys, monkeypatch):
    from train.export import main as export_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert export_main(["--checkpoint", str(trained), "--to", "open_clip", "--out", str(tmp_path / "e"),
                        "--push-to-hub", "someone/model"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_zeroshot_on_shards_with_concept_fusion(trained, synth_dir, tmp_path):
    from eval.zeroshot import main as zeroshot_main

    out = tmp_path / "zs.json"
    base = ["--checkpoint", str(trained), "--shards", str(synth_dir / "pretrain"),
            "--prompts", str(REPO / "configs/prompts/synth_finding.yaml"), "--out", str(out)]
    assert zeroshot_main(base) == 0
    plain = json.loads(out.read_text())
    assert plain["num_images"] == 240 and plain["unlabeled_skipped"] == 0
    assert zeroshot_main(base + ["--concept-fusion", "0.5"]) == 0
    fused = json.loads(out.read_text())
    assert fused["concept_fusion"] == 0.5 and fused["num_images"] == 240
    assert fused["auroc"] != plain["auroc"]  # the concept evidence changed the scores
    assert zeroshot_main(["--checkpoint", str(trained), "--shards", str(synth_dir / "pretrain"),
                          "--prompts", str(REPO / "configs/prompts/synth_modality.yaml"), "--out", str(out),
                          "--concept-fusion", "0.5"]) == 2  # no concepts in that prompt file


def test_linear_probe_entry_point(trained, synth_dir, tmp_path, capsys):
    """eval.probe linear: features from the pretraining shards (a sample's class matched in meta.labels) and
    the class-folder test set; every run and the per-fraction summary in the result."""
    from eval.probe import main

    out = tmp_path / "probe.json"
    test = synth_dir / "eval/zeroshot/modality"
    assert main(["linear", "--checkpoint", str(trained), "--train-shards", str(synth_dir / "pretrain"), "--test",
                 str(test), "--fractions", "0.1,1", "--seeds", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["classes"] == sorted(p.name for p in test.iterdir() if p.is_dir())
    assert r["num_train_images"] > 0 and r["train_skipped"] == 0 and set(r["by_fraction"]) == {"0.1", "1.0"}
    assert r["by_fraction"]["1.0"]["accuracy"]["mean"] > 1 / len(r["classes"])  # above chance after 8 steps
    assert "| 1 |" in capsys.readouterr().out
    assert main(["linear", "--checkpoint", str(trained), "--train-shards", str(synth_dir / "pretrain"), "--test",
                 str(test), "--fractions", "0,1", "--out", str(out)]) == 2


def test_multilabel_and_retrieval_entry_points(trained, synth_dir, tmp_path, capsys):
    """CheXpert-layout labels over the synthetic finding images (effusion and mass columns, an uncertain and a
    blank label, a row naming a missing image and one leaving the image root): AUROC per finding, skips
    counted; image-to-image retrieval on the class folders."""
    from eval.probe import main

    root = synth_dir / "eval/zeroshot/finding"
    rows = ["Path,Sex,Age,Frontal/Lateral,AP/PA,Pleural Effusion,Mass"]
    for i, p in enumerate(sorted(root.glob("*/*.png"))):
        cls = p.parent.name
        eff = "-1.0" if i == 0 else ("1.0" if cls == "effusion" else "0.0")
        rows.append(f"{cls}/{p.name},,,Frontal,PA,{eff},{'1.0' if cls == 'mass' else ('' if i == 1 else '0.0')}")
    rows += ["none/missing.png,,,Frontal,PA,0.0,0.0", "../../slake/test.json,,,Frontal,PA,0.0,0.0"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "prompts.yaml").write_text(
        "templates: ['there is a {c}.', 'an image showing a {c}.']\nnegative_templates: ['no {c}.', 'an image with no {c}.']\n"
        "classes:\n  pleural_effusion: [effusion, pleural effusion]\n  mass: [mass, large mass]\n")
    out = tmp_path / "ml.json"
    assert main(["multilabel", "--checkpoint", str(trained), "--labels", str(tmp_path / "labels.csv"), "--layout",
                 "chexpert", "--image-root", str(root), "--prompts", str(tmp_path / "prompts.yaml"),
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    n = len(rows) - 3
    assert r["num_images"] == n and r["skipped"] == {"missing_image": 1, "outside_root": 1}
    eff = r["per_finding"]["pleural_effusion"]
    assert eff["num_positive"] + eff["num_negative"] == n - 1  # the uncertain label left out (ignore)
    assert r["per_finding"]["mass"]["num_positive"] + r["per_finding"]["mass"]["num_negative"] == n  # blank: 0
    assert 0 <= eff["auroc"] <= 1 and r["label_counts"] == {"uncertain": 1, "blank": 1}
    assert "pleural_effusion" in capsys.readouterr().out
    out = tmp_path / "ret.json"
    assert main(["retrieval", "--checkpoint", str(trained), "--folder", str(root), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r) >= {"r1", "r5", "r10", "chance_r1", "per_class_r1"} and r["r10"] >= r["r1"]
