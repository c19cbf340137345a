"""The synthetic medical corpus: learnable, deterministic, offline.

    python -m data_prep.synth --out data/synth --num-train 2000 --num-test 400 --image-size 64

Every case has one ground truth (modality, finding, side, zone, size) from which everything is
derived: the image (drawn procedurally per modality), a caption in varied natural sentences,
concept spans (tagged with configs/concepts/medical.yaml), closed and open VQA pairs, and for
chest x-rays a two-view FINDINGS/IMPRESSION report. Written as (DESIGN section 4):

    OUT/pretrain/           shards: image + caption + concepts + labels (train cases)
    OUT/instruct/           shards: LLaVA conversations (captioning, VQA, report turns)
    OUT/eval/slake/         SLAKE layout: test.json + imgs/<name>/source.jpg (test cases)
    OUT/eval/iu_xray/       R2Gen layout: annotation.json + images/<id>/{0,1}.png (chest x-rays)
    OUT/eval/zeroshot/      modality/<class>/*.png and finding/<class>/*.png (+ classes.json)
    OUT/eval/retrieval.jsonl  image path + caption pairs of the test cases
    OUT/preference/pairs.jsonl  preference pairs of the training chest x-rays (images: eval/iu_xray/images)
    OUT/preference/shards/  the same pairs as shards (data_prep.shards --format preference)
    OUT/synth.json          the generator's settings and counts

Images follow the radiological convention: the patient's right is on the image's left.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.concepts import ConceptTagger
from data_prep.writer import ImageRef, Pixels, Record, WriteOptions, check_counts, prepare_output, write_shards
from vlm.utils import cli, setup_logging

log = logging.getLogger("data_prep.synth")

MODALITIES = {  # folder name -> (display name, SLAKE-style modality, organ / location)
    "chest_xray": ("chest x-ray", "X-Ray", "Lung"),
    "head_ct": ("head CT", "CT", "Brain"),
    "brain_mri": ("brain MRI", "MRI", "Brain"),
    "histopathology": ("histopathology slide", "Pathology", "Tissue"),
    "fundus": ("fundus photograph", "Fundus", "Retina"),
}
FINDINGS = ("none", "nodule", "mass", "effusion", "cyst")
FINDING_PROBS = (0.28, 0.18, 0.18, 0.18, 0.18)
FINDING_NAMES = {"none": "no abnormality", "nodule": "nodule", "mass": "mass", "effusion": "effusion", "cyst": "cyst"}
SIDES, ZONES = ("left", "right"), ("upper", "middle", "lower")
REGION = {"chest_xray": "lung", "head_ct": "hemisphere", "brain_mri": "hemisphere", "histopathology": "field",
          "fundus": "retina"}
CONCEPTS_FILE = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "medical.yaml"


@dataclass
class Case:
    id: str
    split: str
    modality: str
    finding: str
    side: str | None
    zone: str | None
    size_mm: int | None
    seed: int

    @property
    def size_word(self) -> str | None:
        if self.size_mm is None:
            return None
        return "small" if self.size_mm < 15 else ("large" if self.size_mm >= 35 else "medium-sized")

    @property
    def location(self) -> str | None:
        return None if self.side is None else f"{self.side} {self.zone}"


def make_case(seed: int, split: str, index: int) -> Case:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    modality = list(MODALITIES)[int(rng.integers(len(MODALITIES)))]
    finding = FINDINGS[int(rng.choice(len(FINDINGS), p=FINDING_PROBS))]
    side = zone = size = None
    if finding != "none":
        side = SIDES[int(rng.integers(2))]
        zone = "lower" if finding == "effusion" else ZONES[int(rng.integers(3))]
        lo, hi = {"nodule": (4, 12), "mass": (35, 60), "effusion": (15, 50), "cyst": (15, 30)}[finding]
        size = int(rng.integers(lo, hi + 1))
    return Case(f"{split}{index:06d}", split, modality, finding, side, zone, size, int(rng.integers(2**31)))


# ------------------------------------------------------------------------------------------
# Images


def _grid(s: int):
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
    return y, x


def _disk(y, x, cy, cx, r, soft=0.015):
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    return np.clip((r - d) / soft + 0.5, 0, 1)


def _base(case: Case, s: int, rng, view: int) -> np.ndarray:
    """The modality's anatomy, float32 in [0, 1], (s, s) or (s, s, 3)."""
    y, x = _grid(s)
    j = lambda a: a * (1 + 0.08 * rng.standard_normal())  # anatomical variation
    m = case.modality
    if m == "chest_xray":
        if view == 1:  # lateral view: one lung silhouette, spine at the back
            img = 0.55 * _disk(y, x, 0.5, 0.5, j(0.42), 0.05) + 0.35 * (x > 0.82)
            img -= 0.3 * _disk(y * 0.8, x, 0.42, 0.5, j(0.28), 0.05)
        else:
            body = _disk(y * 0.85, x, 0.45, 0.5, 0.55, 0.05)
            lungs = _disk(y * 0.7, x * 1.4, 0.33, 0.45, j(0.26), 0.04) + _disk(y * 0.7, x * 1.4, 0.33, 0.95, j(0.26), 0.04)
            ribs = 0.5 + 0.5 * np.sin(y * np.pi * j(16) + 2 * np.abs(x - 0.5))
            img = 0.7 * body - 0.45 * np.clip(lungs, 0, 1) + 0.12 * ribs * np.clip(lungs, 0, 1)
            img += 0.35 * _disk(y * 0.6, x * 2.2, 0.38, 1.15, 0.15, 0.05)  # heart / mediastinum
    elif m == "head_ct":
        skull = _disk(y, x, 0.5, 0.5, j(0.44), 0.01) - _disk(y, x, 0.5, 0.5, 0.40, 0.01)
        brain = _disk(y, x, 0.5, 0.5, 0.40, 0.01)
        ventricles = _disk(y * 1.6, x * 3, 0.72, 1.35, j(0.1), 0.02) + _disk(y * 1.6, x * 3, 0.72, 1.65, j(0.1), 0.02)
        img = 0.95 * skull + 0.42 * brain - 0.2 * np.clip(ventricles, 0, 1)
    elif m == "brain_mri":
        head = _disk(y * 0.9, x, 0.45, 0.5, j(0.45), 0.02)
        brain = _disk(y * 0.9, x, 0.45, 0.5, 0.40, 0.02)
        gyri = 0.5 + 0.5 * np.sin(18 * np.arctan2(y - 0.5, x - 0.5) + 25 * np.sqrt((y - 0.5) ** 2 + (x - 0.5) ** 2))
        img = 0.25 * head + 0.35 * brain + 0.2 * brain * gyri
    elif m == "histopathology":
        img = np.stack([0.93 + 0 * x, 0.72 + 0.05 * np.sin(9 * x + 5 * y), 0.82 + 0 * x], -1)
        n = 25
        cy, cx = rng.random(n), rng.random(n)
        nuclei = np.clip(sum(_disk(y, x, cy[i], cx[i], 0.02 + 0.01 * rng.random(), 0.01) for i in range(n)), 0, 1)
        img = img * (1 - 0.45 * nuclei[..., None] * np.array([0.5, 0.9, 0.3]))
    else:  # fundus
        disc = _disk(y, x, 0.5, 0.5, 0.46, 0.02)
        img = np.stack([0.85 * disc, 0.35 * disc, 0.12 * disc], -1)
        od = _disk(y, x, 0.5, j(0.62), 0.07, 0.03)
        img += od[..., None] * np.array([0.15, 0.5, 0.45])
        for k in range(4):
            vessel = np.exp(-(((y - 0.5) - (x - 0.62) * np.tan(0.5 + k * 0.7)) ** 2) / 0.0004) * disc
            img -= vessel[..., None] * np.array([0.25, 0.2, 0.05])
    return np.asarray(img, dtype=np.float32)


def _lesion(case: Case, s: int, rng, view: int) -> tuple[np.ndarray, float]:
    """(mask in [0, 1], contrast sign) of the finding, or (zeros, 0)."""
    y, x = _grid(s)
    if case.finding == "none":
        return np.zeros((s, s), np.float32), 0.0
    cx = 0.32 if case.side == "right" else 0.68  # patient's right on the image's left
    if view == 1:
        cx = 0.45
    cy = {"upper": 0.32, "middle": 0.5, "lower": 0.68}[case.zone] + 0.03 * rng.standard_normal()
    cx += 0.03 * rng.standard_normal()
    r = 0.01 + case.size_mm / 60 * 0.14
    if case.finding == "nodule":
        return _disk(y, x, cy, cx, max(r, 0.05), 0.01), 1.0
    if case.finding == "mass":
        wobble = 1 + 0.18 * np.sin(5 * np.arctan2(y - cy, x - cx) + rng.random() * 6)
        d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / wobble
        return np.clip((r - d) / 0.02 + 0.5, 0, 1), 0.9
    if case.finding == "effusion":  # fluid filling the base of one side, flat top
        level = 0.88 - case.size_mm / 50 * 0.3
        half = (x < 0.5) if case.side == "right" else (x >= 0.5)
        band = np.clip((y - level) / 0.02, 0, 1) * half * (y < 0.93) * (np.abs(x - 0.5) > 0.06)
        return band.astype(np.float32), 0.8
    r = max(r, 0.06)
    ring = _disk(y, x, cy, cx, r + 0.03, 0.01) - _disk(y, x, cy, cx, r, 0.01)  # cyst: bright rim, dark core
    return 1.2 * ring - 0.9 * _disk(y, x, cy, cx, r, 0.01), 0.9


def render(case: Case, size: int, view: int = 0) -> np.ndarray:
    """The case's image as uint8, (size, size) grayscale or (size, size, 3) colour."""
    rng = np.random.default_rng([case.seed, view])
    img = _base(case, size, rng, view)
    mask, contrast = _lesion(case, size, rng, view)
    if img.ndim == 3:
        color = {"histopathology": np.array([-0.45, -0.55, -0.15]), "fundus": np.array([0.1, 0.55, 0.5])}[case.modality]
        img = img + contrast * mask[..., None] * color
    else:
        img = img + 0.5 * contrast * mask
    gain, bias = 1 + 0.1 * rng.standard_normal(), 0.04 * rng.standard_normal()
    img = img * gain + bias + 0.035 * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def render_pixels(case_dict: dict, size: int, view: int) -> Pixels:
    return Pixels(render(Case(**case_dict), size, view))


# ------------------------------------------------------------------------------------------
# Text


def caption(case: Case, rng) -> str:
    mod, _, _ = MODALITIES[case.modality]
    region = REGION[case.modality]
    pick = lambda options: options[int(rng.integers(len(options)))]
    if case.finding == "none":
        return pick([f"{mod.capitalize()} with no acute abnormality.",
                     f"Normal {mod}: no focal lesion is seen.",
                     f"Unremarkable {mod}; no abnormal findings.",
                     f"{mod.capitalize()} within normal limits, no mass, nodule or effusion."])
    f = "pleural effusion" if case.finding == "effusion" and case.modality == "chest_xray" else case.finding
    loc = f"{case.side} {case.zone} {region}"
    return pick([f"{mod.capitalize()} showing a {case.size_word} {f} in the {loc}.",
                 f"A {case.size_mm} mm {f} is seen in the {loc} on this {mod}.",
                 f"{mod.capitalize()}: {case.size_word} {f}, {case.side} side, {case.zone} zone.",
                 f"There is a {f} in the {loc} ({case.size_mm} mm) on {mod}."])


REPORT_PROMPT = "Write the radiology report for this chest x-ray."
PRIOR_RATE = 0.6  # share of training reports that compare with a prior exam (test studies never do)


def prior_options(case: Case) -> list[str]:
    """Sentences comparing this case with a prior exam (a hallucination when the model never saw one)."""
    f = "pleural effusion" if case.finding == "effusion" else case.finding
    if case.finding == "none":
        return ["No change since the prior radiograph.", "Stable appearance compared with the previous examination."]
    return [f"Compared with the prior radiograph, the {f} is unchanged.",
            f"The {f} is stable since the previous examination.", f"The {f} is new since the prior study."]


def prior_sentence(case: Case) -> str | None:
    """The training report's comparison with a prior exam, or None (decided per case from its own random stream,
    so that every other draw of the corpus stays as it was). Like real archives, the training reports often
    compare with an earlier study that the model is never shown; in a generated report such a sentence is a
    hallucination (the test studies are first exams), the behaviour the demo's preference stage removes."""
    if case.split != "train" or case.modality != "chest_xray":
        return None
    rng = np.random.default_rng([case.seed, 13])
    if rng.random() >= PRIOR_RATE:
        return None
    options = prior_options(case)
    return options[int(rng.integers(len(options)))]


def report(case: Case, rng, prior: str | None = None) -> str:
    """A two-part chest x-ray report; ``prior``: a sentence comparing with a prior exam, put at the end of the
    findings."""
    pick = lambda options: options[int(rng.integers(len(options)))]
    heart = pick(["The heart size is normal.", "Cardiac silhouette is within normal limits.",
                  "Normal heart size."])
    cmp = f"{prior} " if prior else ""
    if case.finding == "none":
        lungs = pick(["The lungs are clear.", "No focal consolidation.", "Lungs are clear bilaterally."])
        return (f"Findings: {heart} {lungs} There is no pleural effusion or pneumothorax. {cmp}"
                f"Impression: No acute cardiopulmonary abnormality.")
    f = "pleural effusion" if case.finding == "effusion" else case.finding
    side = case.side
    finding = {
        "nodule": f"There is a {case.size_mm} mm nodule in the {side} {case.zone} lung zone.",
        "mass": f"A {case.size_mm} mm mass is present in the {side} {case.zone} lung zone.",
        "effusion": f"There is a {case.size_word} {side} pleural effusion.",
        "cyst": f"A thin-walled cyst measuring {case.size_mm} mm is seen in the {side} {case.zone} lung zone.",
    }[case.finding]
    impression = f"{side.capitalize()} pleural effusion." if case.finding == "effusion" else \
        f"{side.capitalize()} {case.zone} {f}."
    return f"Findings: {heart} {finding} No pneumothorax. {cmp}Impression: {impression}"


def vqa(case: Case, rng) -> list[dict]:
    """Closed (yes/no) and open questions, all answered from the ground truth."""
    mod, slake_mod, organ = MODALITIES[case.modality]
    abnormal = case.finding != "none"
    qs = []
    ask_f = FINDINGS[1 + int(rng.integers(4))]
    if rng.random() < 0.5 and abnormal:
        ask_f = case.finding
    qs.append((f"Is there a {ask_f} in this image?", "yes" if ask_f == case.finding else "no", "CLOSED", "Abnormality"))
    qs.append(("Is this image normal?", "no" if abnormal else "yes", "CLOSED", "Abnormality"))
    other = list(MODALITIES)[int(rng.integers(len(MODALITIES)))]
    qs.append((f"Is this a {MODALITIES[other][0]}?", "yes" if other == case.modality else "no", "CLOSED", "Modality"))
    if abnormal:
        s = SIDES[int(rng.integers(2))]
        qs.append((f"Is the abnormality on the {s} side?", "yes" if s == case.side else "no", "CLOSED", "Position"))
    qs.append(("What imaging modality is this?", mod.lower(), "OPEN", "Modality"))
    qs.append(("What is the main finding?", FINDING_NAMES[case.finding], "OPEN", "Abnormality"))
    if abnormal:
        qs.append((f"Where is the {case.finding} located?", f"{case.side} {case.zone}", "OPEN", "Position"))
        qs.append((f"Which side is the {case.finding} on?", case.side, "OPEN", "Position"))
    return [{"question": q, "answer": a, "answer_type": t, "content_type": c, "modality": slake_mod,
             "location": organ} for q, a, t, c in qs]


def case_meta(case: Case) -> dict:
    return {"modality": MODALITIES[case.modality][0], "finding": case.finding, "side": case.side,
            "zone": case.zone, "size_mm": case.size_mm, "labels": [case.modality, case.finding]}


# ------------------------------------------------------------------------------------------
# Writers


def _conversation(case: Case, cap: str, qas: list[dict], rng) -> list[dict]:
    prompts = ["Describe the image.", "What does this image show?", "Give a short description of this image.",
               "Summarize the findings in this image."]
    turns = [(prompts[int(rng.integers(len(prompts)))], cap)]
    turns += [(qa["question"], qa["answer"]) for qa in qas]
    if case.modality == "chest_xray":
        turns.append((REPORT_PROMPT, report(case, rng, prior_sentence(case))))
    order = rng.permutation(len(turns))
    conv = []
    for n, i in enumerate(order):
        q, a = turns[i]
        conv += [{"from": "human", "value": ("<image>\n" + q) if n == 0 else q}, {"from": "gpt", "value": a}]
    return conv


def _records(cases: list[Case], size: int, tagger: ConceptTagger, kind: str):
    for case in cases:
        rng = np.random.default_rng([case.seed, 7])
        cap = caption(case, rng)
        meta = case_meta(case) | {"source": "synth", "split": case.split, "id": case.id}
        if kind == "pretrain":
            meta["concepts"] = tagger.tag(cap)
        else:
            meta["conversations"] = _conversation(case, cap, vqa(case, rng), rng)
        yield Record(f"synth-{case.id}", [ImageRef(render_pixels, (asdict(case), size, 0))], cap, meta, case.id)


def _wrong(case: Case, kind: str, rng) -> Case:
    """``case`` with one fact of its ground truth changed: the finding, its side or its size."""
    from dataclasses import replace

    if kind == "side":
        return replace(case, side="left" if case.side == "right" else "right")
    if kind == "size":  # into another size word: small <-> large
        return replace(case, size_mm=40 if case.size_mm < 15 else 8)
    others = [f for f in FINDINGS if f != case.finding]
    f = others[int(rng.integers(len(others)))]
    if f == "none":
        return replace(case, finding=f, side=None, zone=None, size_mm=None)
    zone = "lower" if f == "effusion" else (case.zone or ZONES[int(rng.integers(3))])
    return replace(case, finding=f, side=case.side or SIDES[int(rng.integers(2))], zone=zone,
                   size_mm=case.size_mm or {"nodule": 8, "mass": 40, "effusion": 30, "cyst": 20}[f])


def preference_pairs(cases: list[Case]) -> list[dict]:
    """Two preference pairs per chest x-ray (data_prep.shards --format preference, images under
    eval/iu_xray/images): its report, chosen = the ground-truth report without a prior-exam sentence, rejected =
    the same report with one fact wrong, taken in turn: a prior-exam sentence, another finding, the other side,
    another size (a normal study gets a finding or a prior-exam sentence); and a closed question about the
    finding or its side, chosen = the right answer, rejected = the wrong one."""
    pairs = []
    for n, case in enumerate(cases):
        rng = np.random.default_rng([case.seed, 17])
        kinds = ("prior", "finding", "side", "size") if case.finding != "none" else ("prior", "finding")
        kind = kinds[n % len(kinds)]
        chosen = report(case, np.random.default_rng([case.seed, 11]))
        if kind == "prior":
            options = prior_options(case)
            wrong_case, prior = case, options[int(rng.integers(len(options)))]
        else:
            wrong_case, prior = _wrong(case, kind, rng), None
        rejected = report(wrong_case, np.random.default_rng([case.seed, 11]), prior)
        image = f"CXR_{case.id}/0.png"
        pairs.append({"id": f"{case.id}-report", "image": image, "prompt": REPORT_PROMPT, "chosen": chosen,
                      "rejected": rejected, "kind": kind})
        if case.finding != "none" and n % 2:
            q, right = f"Which side is the {case.finding} on?", case.side
            wrong = "left" if right == "right" else "right"
        else:
            f = case.finding if case.finding != "none" else FINDINGS[1 + int(rng.integers(4))]
            q, right = f"Is there a {f} in this image?", "yes" if f == case.finding else "no"
            wrong = "no" if right == "yes" else "yes"
        pairs.append({"id": f"{case.id}-vqa", "image": image, "prompt": q, "chosen": right, "rejected": wrong,
                      "kind": "vqa"})
    return pairs


def _save_image(job) -> None:
    case_dict, size, view, path = job
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(Case(**case_dict), size, view)).save(path)


def write_eval(out: Path, test: list[Case], train: list[Case], size: int, pool) -> dict:
    ev = out / "eval"
    jobs, slake, retrieval = [], [], []
    qid = 0
    for n, case in enumerate(test):
        name = f"synth_{case.id}/source.jpg"
        jobs.append((asdict(case), size, 0, str(ev / "slake" / "imgs" / name)))
        rng = np.random.default_rng([case.seed, 7])
        cap = caption(case, rng)
        for qa in vqa(case, rng):
            slake.append({"img_id": n, "img_name": name, "question": qa["question"], "answer": qa["answer"],
                          "q_lang": "en", "location": qa["location"], "modality": qa["modality"],
                          "answer_type": qa["answer_type"], "base_type": "vqa", "content_type": qa["content_type"],
                          "triple": ["vhead", "_", "_"], "qid": qid})
            qid += 1
        for task, cls in (("modality", case.modality), ("finding", case.finding)):
            jobs.append((asdict(case), size, 0, str(ev / "zeroshot" / task / cls / f"{case.id}.png")))
        retrieval.append({"image": f"zeroshot/modality/{case.modality}/{case.id}.png", "caption": cap,
                          "modality": case.modality, "finding": case.finding})
    ann = {"train": [], "val": [], "test": []}
    cxr_train = [c for c in train if c.modality == "chest_xray"]
    n_val = max(1, len(cxr_train) // 10) if len(cxr_train) > 1 else 0
    splits = [("val", cxr_train[:n_val]), ("train", cxr_train[n_val:]),
              ("test", [c for c in test if c.modality == "chest_xray"])]
    for split, cases in splits:
        for case in cases:
            rng = np.random.default_rng([case.seed, 11])
            paths = [f"CXR_{case.id}/0.png", f"CXR_{case.id}/1.png"]
            for v, p in enumerate(paths):
                jobs.append((asdict(case), size, v, str(ev / "iu_xray" / "images" / p)))
            ann[split].append({"id": f"CXR_{case.id}", "report": report(case, rng, prior_sentence(case)),
                               "image_path": paths,
                               "split": split})
    (ev / "slake").mkdir(parents=True, exist_ok=True)
    (ev / "iu_xray").mkdir(parents=True, exist_ok=True)
    list(pool.imap_unordered(_save_image, jobs, chunksize=16) if pool else map(_save_image, jobs))
    (ev / "slake" / "test.json").write_text(json.dumps(slake, indent=1))
    (ev / "iu_xray" / "annotation.json").write_text(json.dumps(ann, indent=1))
    pairs = preference_pairs([c for split, cases in splits if split == "train" for c in cases])
    (out / "preference").mkdir(parents=True, exist_ok=True)
    (out / "preference" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    classes = {"modality": {k: v[0] for k, v in MODALITIES.items()},
               "finding": {k: FINDING_NAMES[k] for k in FINDINGS}}
    for task in classes:  # every class folder exists, even if a small test set has no case of it
        for cls in classes[task]:
            (ev / "zeroshot" / task / cls).mkdir(parents=True, exist_ok=True)
    (ev / "zeroshot" / "classes.json").write_text(json.dumps(classes, indent=1))
    with open(ev / "retrieval.jsonl", "w") as f:
        for r in retrieval:
            f.write(json.dumps(r) + "\n")
    return {"slake_questions": len(slake), "report_studies": {k: len(v) for k, v in ann.items()},
            "preference_pairs": len(pairs),
            "zeroshot_images": len(test)}


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (64-224)")
    p.add_argument("--num-train", type=int, default=2000, help="training cases (pretrain + instruct shards)")
    p.add_argument("--num-test", type=int, default=400, help="held-out cases (evaluation sets)")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    if not 16 <= args.image_size <= 1024:
        raise ValueError("--image-size must be within 16..1024")
    if args.num_train < 1 or args.num_test < 1:
        raise ValueError("--num-train and --num-test must be >= 1")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0 (got {args.seed})")
    check_counts(args.shard_size, args.workers)
    t0 = time.time()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} is not empty; pass --overwrite to regenerate")
    train = [make_case(args.seed, "train", i) for i in range(args.num_train)]
    test = [make_case(args.seed, "test", i) for i in range(args.num_test)]
    tagger = ConceptTagger.from_file(CONCEPTS_FILE)
    opts = WriteOptions(image_format="jpg", jpeg_quality=95)
    counts = {}
    for kind in ("pretrain", "instruct"):
        folder = prepare_output(out / kind, overwrite=True)
        m, _ = write_shards(_records(train, args.image_size, tagger, kind), folder, shard_size=args.shard_size,
                            workers=args.workers, opts=opts, total=len(train), progress=not args.quiet,
                            created_by="data_prep.synth", extra={"format": "synth", "seed": args.seed})
        counts[kind] = m.num_samples
    pool = mp.get_context("fork").Pool(args.workers) if args.workers > 0 else None
    try:
        counts["eval"] = write_eval(out, test, train, args.image_size, pool)
    finally:
        if pool:
            pool.terminate()
    # the pairs as preference shards too (what train.rehearse reads for a preference config's missing data)
    from data_prep.shards import main as shards_main

    if shards_main(["--format", "preference", "--input", str(out / "preference" / "pairs.jsonl"), "--image-root",
                    str(out / "eval" / "iu_xray" / "images"), "--out", str(out / "preference" / "shards"),
                    "--overwrite", "--quiet", "--workers", "0"]) != 0:
        raise RuntimeError("writing the preference shards failed")
    info = {"seed": args.seed, "image_size": args.image_size, "num_train": args.num_train,
            "num_test": args.num_test, "counts": counts, "seconds": round(time.time() - t0, 1)}
    (out / "synth.json").write_text(json.dumps(info, indent=1))
    log.info("synthetic corpus -> %s in %.1fs: %s", out, time.time() - t0, json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
