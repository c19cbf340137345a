"""Chest x-ray label layouts (eval/benchmarks/chest_labels.py: CheXpert and ChestX-ray14 CSVs, uncertain-label
policies), multi-label zero-shot AUROC and image-to-image retrieval (eval.probe), on hand-written cases."""
import numpy as np
import pytest
import torch

from eval.benchmarks.chest_labels import finding_key, read_labels
from eval.probe import image_retrieval, multilabel_zeroshot

CHEXPERT = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Pleural Effusion,Pneumothorax\n"
            "CheXpert-v1.0-small/valid/patient1/study1/view1_frontal.jpg,Male,73,Frontal,AP,,1.0,-1.0,0.0\n"
            "CheXpert-v1.0-small/valid/patient2/study1/view1_frontal.jpg,Female,61,Frontal,PA,1.0,0.0,,0.0\n"
            "CheXpert-v1.0-small/valid/patient3/study1/view1_frontal.jpg,Male,40,Frontal,AP,,,1.0,1.0\n")
NIH = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
       "00000001_000.png,Cardiomegaly,0,1,58,M,PA\n"
       "00000001_001.png,Cardiomegaly|Effusion,1,1,58,M,PA\n"
       "00000002_000.png,No Finding,0,2,81,M,PA\n")


def test_finding_keys():
    assert finding_key("Pleural Effusion") == "pleural_effusion" == finding_key("Effusion")
    assert finding_key("Enlarged Cardiomediastinum") == "enlarged_cardiomediastinum"


@pytest.mark.parametrize("uncertain,blank,effusion,cardio", [
    ("ignore", "zeros", [None, 0.0, 1.0], [1.0, 0.0, 0.0]),
    ("zeros", "zeros", [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]),
    ("ones", "ignore", [1.0, None, 1.0], [1.0, 0.0, None]),
])
def test_chexpert_layout_and_policies(tmp_path, uncertain, blank, effusion, cardio):
    (tmp_path / "valid.csv").write_text(CHEXPERT)
    t = read_labels(tmp_path / "valid.csv", "chexpert", tmp_path, uncertain, blank)
    assert t.findings == ["no_finding", "cardiomegaly", "pleural_effusion", "pneumothorax"]
    assert t.paths[0] == str(tmp_path / "CheXpert-v1.0-small/valid/patient1/study1/view1_frontal.jpg")
    assert [row[2] for row in t.labels] == effusion and [row[1] for row in t.labels] == cardio
    assert t.counts == {"uncertain": 1, "blank": 4}


def test_nih_layout(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH)
    t = read_labels(tmp_path / "Data_Entry_2017.csv", "nih", tmp_path / "images")
    eff, card, none = (t.findings.index(k) for k in ("pleural_effusion", "cardiomegaly", "no_finding"))
    assert [row[eff] for row in t.labels] == [0.0, 1.0, 0.0] and [row[card] for row in t.labels] == [1.0, 1.0, 0.0]
    assert [row[none] for row in t.labels] == [0.0, 0.0, 1.0] and len(t.findings) == 15


@pytest.mark.parametrize("layout,text,message", [
    ("chexpert", "Path,Cardiomegaly\na.jpg,2.0\n", "line 2, Cardiomegaly: label '2.0' is not"),
    ("chexpert", "Image,Cardiomegaly\na.jpg,1.0\n", "not CheXpert's layout"),
    ("nih", "Image Index,Finding Labels\na.png,Cardiomegaly|Tumour\n", "line 2: finding labels ['Tumour']"),
    ("nih", "Path,Cardiomegaly\n", "not ChestX-ray14's layout"),
])
def test_malformed_label_files_name_the_line(tmp_path, layout, text, message):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        read_labels(tmp_path / "l.csv", layout, tmp_path)


def test_multilabel_auroc_hand_computed():
    """Scores cos(pos) - cos(neg) ranked against the labels; None labels left out of that finding."""
    feats = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    pos, neg = {"a": torch.tensor([1.0, 0.0])}, {"a": torch.tensor([0.0, 1.0])}
    # scores 1, 0.2, -1, -0.2; labels 1, 0, 0, None -> the positive ranks first: AUROC 1
    r = multilabel_zeroshot(feats, [[1.0], [0.0], [0.0], [None]], ["a"], pos, neg)
    assert r["per_finding"]["a"] == {"num_positive": 1, "num_negative": 2, "auroc": 1.0}
    # labels 0, 1, 1, 0: positives score 0.2 and -1, negatives 1 and -0.2 -> 1 of 4 pairs right: 0.25
    r = multilabel_zeroshot(feats, [[0.0], [1.0], [1.0], [0.0]], ["a"], pos, neg)
    assert r["per_finding"]["a"]["auroc"] == pytest.approx(0.25) and r["mean_auroc"] == pytest.approx(0.25)
    r = multilabel_zeroshot(feats, [[1.0], [1.0], [1.0], [None]], ["a"], pos, neg)  # one class only: no AUROC
    assert r["per_finding"]["a"]["auroc"] is None and r["mean_auroc"] is None


def test_image_retrieval_hand_computed():
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]]),
                                          dim=1)
    labels = np.array([0, 0, 1, 1, 1])
    r = image_retrieval(feats, labels, ks=(1, 2))
    # nearest other image: 0->1 (0 ok), 1->0 (ok), 2->3 (ok), 3->2 (ok), 4 -> 1 or 3 (cos .78 vs .78: 3 by sims)
    assert r["r2"] == 1.0 and r["per_class_r1"][0] == 1.0 and 0.8 <= r["r1"] <= 1.0
