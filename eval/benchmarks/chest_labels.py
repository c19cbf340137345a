"""Chest x-ray finding labels as released, for multi-label zero-shot (eval.probe multilabel).

Two layouts, read as downloaded:

- ``chexpert``: CheXpert's ``train.csv`` / ``valid.csv`` (and CheXpert-style CSVs such as MIMIC-CXR-JPG's
  labels joined to paths): a ``Path`` column (relative to the folder that holds the release folder, e.g.
  ``CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg``) and one column per observation
  ("No Finding", "Cardiomegaly", "Pleural Effusion", ...) holding ``1.0`` (positive), ``0.0`` (negative),
  ``-1.0`` (uncertain) or nothing (not mentioned).
- ``nih``: NIH ChestX-ray14's ``Data_Entry_2017.csv``: ``Image Index`` (a file name under the image folder)
  and ``Finding Labels``, the positive findings joined by ``|`` ("Cardiomegaly|Effusion") or "No Finding";
  every other finding of the 14 is negative. There is no uncertain label.

Label policies (documented, chosen with ``--uncertain`` and ``--blank``): an uncertain label is left out
of that finding's AUROC (``ignore``, the default), or counted as negative (``zeros``) or positive (``ones``),
CheXpert's U-Ignore / U-Zeros / U-Ones; a blank (not mentioned) is negative (``zeros``, the default: the
labeler found no mention) or left out (``ignore``).

Findings are named as prompt-file classes: lower case, spaces and dashes as ``_`` ("Pleural Effusion" ->
``pleural_effusion``); ChestX-ray14's "Effusion" is ``pleural_effusion`` as well.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

ALIASES = {"effusion": "pleural_effusion"}  # ChestX-ray14's names -> CheXpert's where they mean the same
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
CHEXPERT_META = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
POLICIES = ("ignore", "zeros", "ones")


def finding_key(name: str) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


@dataclass
class LabelTable:
    paths: list[str] = field(default_factory=list)  # image paths (resolved under the image root)
    findings: list[str] = field(default_factory=list)  # finding keys
    labels: list[list[float | None]] = field(default_factory=list)  # per image, per finding: 1, 0 or None (left out)
    counts: dict = field(default_factory=dict)  # how many labels were uncertain / blank, per policy applied


def _policy(value: str, uncertain: str, blank: str, counts: dict, where: str) -> float | None:
    v = value.strip()
    if v == "":
        counts["blank"] = counts.get("blank", 0) + 1
        return 0.0 if blank == "zeros" else None
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not 1.0, 0.0, -1.0 or empty") from None
    if x == -1.0:
        counts["uncertain"] = counts.get("uncertain", 0) + 1
        return {"ignore": None, "zeros": 0.0, "ones": 1.0}[uncertain]
    if x not in (0.0, 1.0):
        raise ValueError(f"{where}: label {value!r} is not 1.0, 0.0, -1.0 or empty")
    return x


def read_labels(path, layout: str, image_root, uncertain: str = "ignore", blank: str = "zeros") -> LabelTable:
    """A label CSV as released -> LabelTable; a malformed file or row is an error naming the file and line."""
    if layout not in ("chexpert", "nih"):
        raise ValueError(f"--layout must be chexpert or nih, got {layout!r}")
    if uncertain not in POLICIES or blank not in ("ignore", "zeros"):
        raise ValueError(f"--uncertain must be one of {POLICIES}, --blank ignore or zeros")
    path, root = Path(path), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"--labels {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        rows = list(reader)
    t = LabelTable()
    if layout == "chexpert":
        if "Path" not in cols:
            raise ValueError(f"{path}: not CheXpert's layout (no 'Path' column; columns {cols[:8]})")
        names = [c for c in cols if c not in CHEXPERT_META]
        t.findings = [finding_key(c) for c in names]
        for i, r in enumerate(rows):
            where = f"{path}: line {i + 2}"
            if not r.get("Path"):
                raise ValueError(f"{where}: empty Path")
            t.paths.append(str(root / r["Path"]))
            t.labels.append([_policy(r.get(c) or "", uncertain, blank, t.counts, f"{where}, {c}") for c in names])
    else:
        if "Image Index" not in cols or "Finding Labels" not in cols:
            raise ValueError(f"{path}: not ChestX-ray14's layout (needs 'Image Index' and 'Finding Labels')")
        t.findings = [finding_key(c) for c in NIH_FINDINGS] + ["no_finding"]
        for i, r in enumerate(rows):
            where = f"{path}: line {i + 2}"
            found = {x.strip() for x in (r["Finding Labels"] or "").split("|") if x.strip()}
            unknown = found - set(NIH_FINDINGS) - {"No Finding"}
            if not found or unknown:
                raise ValueError(f"{where}: finding labels {sorted(unknown) or r['Finding Labels']!r} are not "
                                 f"ChestX-ray14's")
            t.paths.append(str(root / r["Image Index"]))
            t.labels.append([float(n in found) for n in NIH_FINDINGS] + [float("No Finding" in found)])
    if not t.paths:
        raise ValueError(f"{path}: no rows")
    return t
