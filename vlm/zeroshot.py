"""Zero-shot classification and retrieval with a CLIP model, shared by training (periodic
evaluation) and the eval entry points.

Prompt ensembles (configs/prompts/*.yaml): every class has synonyms, every synonym is put into
every template; the text embeddings of a class are averaged and renormalised (CLIP's ensembling).
Retrieval computes features in batches and ranks in chunks, so memory is O(chunk x N), not N^2.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vlm.data.transforms import ImageConfig, MedicalImageTransform

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class PromptConfig:
    """A YAML under configs/prompts/: templates with {c}, and synonyms per class (keys = folder names)."""

    name: str = "prompts"
    templates: list[str] = field(default_factory=lambda: ["a photo of {c}."])
    classes: dict[str, list[str]] = field(default_factory=dict)
    # optional, for ConceptCLIP-style fusion: concept names whose presence supports each class
    concepts: dict[str, list[str]] = field(default_factory=dict)
    # optional, for multi-label zero-shot (eval.probe multilabel): templates stating the class is absent
    negative_templates: list[str] = field(default_factory=list)

    def __post_init__(self):
        bad = [t for t in [*self.templates, *self.negative_templates] if "{c}" not in t]
        if bad:
            raise ValueError(f"prompt templates need a {{c}} placeholder: {bad}")
        if not self.templates:
            raise ValueError("prompts need at least one template")
        empty = [k for k, v in self.classes.items() if not v]
        if empty:
            raise ValueError(f"classes without any name: {empty}")


def load_prompts(path: Optional[str | Path], class_names: list[str]) -> PromptConfig:
    """The prompt file, or a default (the class folder names, '_' as spaces) when none is given."""
    if path is None:
        return PromptConfig(classes={c: [c.replace("_", " ")] for c in class_names})
    from vlm.config import load_config

    cfg = load_config(PromptConfig, path)
    missing = [c for c in class_names if c not in cfg.classes]
    if missing:
        raise ValueError(f"{path}: no prompts for classes {missing} (it has {sorted(cfg.classes)})")
    return cfg


@torch.no_grad()
def build_classifier(model, tokenizer, prompts: PromptConfig, class_names: list[str], device="cpu") -> torch.Tensor:
    """(K, D) normalised class embeddings from the prompt ensemble, in ``class_names`` order."""
    weights = []
    for c in class_names:
        texts = [t.format(c=syn) for syn in prompts.classes[c] for t in prompts.templates]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True)
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


class ImageListDataset(Dataset):
    def __init__(self, paths: list[str], image_cfg: ImageConfig):
        self.paths, self.transform = paths, MedicalImageTransform(image_cfg)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return self.transform.from_bytes(f.read())


def image_folder(folder: str | Path, max_images: int = 0) -> tuple[list[str], list[int], list[str]]:
    """ROOT/<class>/*.png -> (paths, label indices, class names sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"zero-shot folder not found: {folder}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders")
    paths, labels = [], []
    for i, c in enumerate(classes):
        for p in sorted((folder / c).iterdir()):
            if p.suffix.lower() in IMAGE_EXTS:
                paths.append(str(p))
                labels.append(i)
    if max_images and len(paths) > max_images:
        idx = np.random.default_rng(0).choice(len(paths), max_images, replace=False)
        idx.sort()
        paths, labels = [paths[i] for i in idx], [labels[i] for i in idx]
    return paths, labels, classes


def image_csv(path: str | Path, image_col: str = "image", label_col: str = "label",
              image_root: Optional[str] = None) -> tuple[list[str], list[int], list[str]]:
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or image_col not in rows[0] or label_col not in rows[0]:
        raise ValueError(f"{path}: needs columns {image_col!r} and {label_col!r}")
    root = Path(image_root) if image_root else path.parent
    classes = sorted({r[label_col] for r in rows})
    return [str(root / r[image_col]) for r in rows], [classes.index(r[label_col]) for r in rows], classes


@torch.no_grad()
def image_features(model, paths: list[str], image_cfg: ImageConfig, batch_size: int = 64, workers: int = 0,
                   device="cpu", concept_emb: Optional[torch.Tensor] = None):
    """(N, D) image features; with ``concept_emb`` (K, D) also (N, K) best-patch concept similarities."""
    loader = DataLoader(ImageListDataset(paths, image_cfg), batch_size=batch_size, num_workers=workers)
    return _encode_batches(model, (x for x in loader), device, concept_emb)


def _encode_batches(model, batches, device, concept_emb=None):
    feats, sims = [], []
    for x in batches:
        x = x.to(device)
        if concept_emb is None:
            feats.append(model.encode_image(x, normalize=True).float().cpu())
        else:
            pooled, patches = model.encode_image_with_patches(x)
            feats.append(pooled.float().cpu())
            sims.append(torch.einsum("kd,bnd->bkn", concept_emb.to(patches), patches).amax(-1).float().cpu())
    f = torch.cat(feats) if feats else torch.empty(0)
    return f if concept_emb is None else (f, torch.cat(sims) if sims else torch.empty(0))


@torch.no_grad()
def shard_features(model, folder: str | Path, class_names: list[str], image_cfg: ImageConfig, batch_size: int = 64,
                   device="cpu", concept_emb: Optional[torch.Tensor] = None):
    """Features and labels of a shard folder: a sample's class is the class name found in meta.labels
    (samples with none or several are skipped and counted)."""
    from vlm.data.shards import DataConfig, ShardLoader, SourceConfig

    cfg = DataConfig(sources=[SourceConfig(str(folder))], batch_size=batch_size, num_workers=0, shuffle_buffer=0,
                     shuffle_shards=False, require_text=False, image=image_cfg)
    labels, images, unlabeled = [], [], 0
    for batch in ShardLoader(cfg):
        for img, meta in zip(batch["images"], batch["meta"]):
            found = [class_names.index(c) for c in meta.get("labels") or [] if c in class_names]
            if len(found) != 1:
                unlabeled += 1
                continue
            labels.append(found[0])
            images.append(img)
    if not images:
        raise ValueError(f"{folder}: no sample has exactly one of the classes {class_names} in meta.labels")
    chunks = (torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
    out = _encode_batches(model, chunks, device, concept_emb)
    return out, labels, unlabeled


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str], batch_size: int = 256, device="cpu") -> torch.Tensor:
    out = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """accuracy, balanced accuracy, macro-F1, per-class one-vs-rest AUROC (and their mean)."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

    k = len(class_names)
    pred = probs.argmax(1)
    auroc = {}
    for i, c in enumerate(class_names):
        y = labels == i
        auroc[c] = float(roc_auc_score(y, probs[:, i])) if 0 < y.sum() < len(y) else None
    valid = [v for v in auroc.values() if v is not None]
    return {
        "num_images": int(len(labels)), "num_classes": k,
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if len(labels) else 0.0,
        "macro_f1": float(f1_score(labels, pred, labels=list(range(k)), average="macro", zero_division=0)),
        "auroc": auroc, "mean_auroc": float(np.mean(valid)) if valid else None,
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
        "classes": class_names,
    }


def fused_probs(model, feats: torch.Tensor, clf: torch.Tensor, concept_sims: Optional[torch.Tensor] = None,
                class_concepts: Optional[list[list[int]]] = None, fusion: float = 0.0) -> torch.Tensor:
    """Class probabilities; with ``fusion`` > 0, ConceptCLIP-style concept evidence is added:
    logit_k = scale * <image, class_k> + fusion * mean_{c in concepts(k)} (concept_scale * s_c + concept_bias),
    where s_c is the best patch similarity of concept c (the alignment head's own scale and bias)."""
    logits = float(model.logit_scale.exp()) * feats @ clf.T
    if fusion > 0 and concept_sims is not None and class_concepts:
        cl = float(model.concept_logit_scale.exp()) * concept_sims + float(model.concept_logit_bias)
        extra = torch.stack([cl[:, idx].mean(1) if idx else torch.zeros(len(cl)) for idx in class_concepts], 1)
        logits = logits + fusion * extra
    return logits.softmax(dim=-1)


def class_concept_index(prompts: PromptConfig, class_names: list[str]) -> tuple[list[str], list[list[int]]]:
    names = sorted({c for k in class_names for c in prompts.concepts.get(k, [])})
    return names, [[names.index(c) for c in prompts.concepts.get(k, [])] for k in class_names]


@torch.no_grad()
def zeroshot_eval(model, tokenizer, folder: str | Path, prompts_path: Optional[str], image_cfg: ImageConfig,
                  max_images: int = 0, device="cpu", batch_size: int = 64) -> tuple[dict, np.ndarray, np.ndarray]:
    """Zero-shot classification of an image folder -> (metrics, probabilities (N, K), labels (N,))."""
    paths, labels, classes = image_folder(folder, max_images)
    prompts = load_prompts(prompts_path, classes)
    clf = build_classifier(model, tokenizer, prompts, classes, device).float().cpu()
    feats = image_features(model, paths, image_cfg, batch_size, device=device)
    scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    probs = (scale * feats @ clf.T).softmax(dim=-1).numpy()
    labels_np = np.array(labels)
    return classification_metrics(probs, labels_np, classes), probs, labels_np


def recall_at_k(queries: torch.Tensor, targets: torch.Tensor, query_to_targets: list[list[int]],
                ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """R@K of queries (Q, D) against targets (T, D); a query is right if any of its targets ranks < K.

    Scores are computed ``chunk`` queries at a time: memory O(chunk x T)."""
    hits = {k: 0 for k in ks}
    for s in range(0, len(queries), chunk):
        scores = queries[s:s + chunk] @ targets.T  # (c, T)
        for i, row in enumerate(scores):
            best_true = row[query_to_targets[s + i]].max()
            rank = int((row > best_true).sum())  # targets strictly better than the best correct one
            for k in ks:
                hits[k] += rank < k
    n = max(1, len(queries))
    return {f"r{k}": hits[k] / n for k in ks}


def retrieval_eval(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: list[int],
                   ks=(1, 5, 10)) -> dict:
    """Image<->text R@K; ``text_to_image[j]`` is the image index of caption j (several captions per image allowed)."""
    img_to_txt: list[list[int]] = [[] for _ in range(len(image_feats))]
    for j, i in enumerate(text_to_image):
        img_to_txt[i].append(j)
    i2t = recall_at_k(image_feats, text_feats, img_to_txt, ks)
    t2i = recall_at_k(text_feats, image_feats, [[i] for i in text_to_image], ks)
    out = {f"image_to_text_{k}": v for k, v in i2t.items()}
    out.update({f"text_to_image_{k}": v for k, v in t2i.items()})
    out["mean_recall"] = float(np.mean(list(i2t.values()) + list(t2i.values())))
    return out

