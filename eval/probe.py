"""CLIP downstream protocols on frozen image features: the linear probe, multi-label zero-shot for chest
x-ray findings, image-to-image retrieval by label.

    python -m eval.probe linear --checkpoint runs/demo/clip --train-shards data/demo/synth/pretrain \\
        --test data/demo/synth/eval/zeroshot/finding --out runs/demo/probe_finding.json
    python -m eval.probe linear --checkpoint runs/medclip_vitb16 --train data/chexpert_5x200_train \\
        --test data/chexpert_5x200 --fractions 0.01,0.1,1 --seeds 0,1,2 --out probe.json

Features: the checkpoint's L2-normalised image embeddings, encoded once (as eval.zeroshot encodes them).
Training images: --train (one sub-folder per class) or --train-shards (a shard folder; a sample's class is
the one class name of the test set in its meta.labels, others are skipped and counted). Test images:
--test (one sub-folder per class; its folder names are the classes).

Protocol, per seed and label fraction: a stratified validation split (--val-fraction of the training
images) is held out; the given fraction of the remaining training images is drawn per class (at least one
per class); scikit-learn's multinomial logistic regression is fitted for each C of --c-grid and the C with
the best validation accuracy is refitted on the same training subset and scored on the test set (accuracy,
balanced accuracy, macro-F1, mean one-vs-rest AUROC). Reported: every run, and per fraction the mean and
standard deviation over seeds. Writes OUT (JSON) and prints a table.

    python -m eval.probe multilabel --checkpoint runs/medclip_vitb16 --labels data/chexpert/valid.csv \
        --layout chexpert --image-root data/chexpert --prompts configs/prompts/chest_xray.yaml --out ml.json
    python -m eval.probe retrieval --checkpoint runs/demo/clip --folder data/demo/synth/eval/zeroshot/finding --out r.json

Multi-label zero-shot: each finding's score is cos(image, its positive prompts) - cos(image, its negative
prompts) (the prompt file's ``templates`` and ``negative_templates`` over the finding's synonyms, each set
averaged); AUROC per finding over the images with a label for it, and their mean. Labels are read from
CheXpert's or ChestX-ray14's CSV as released (eval/benchmarks/chest_labels.py: uncertain and blank labels
by documented policies); images outside --image-root or missing are skipped and counted. Image-to-image
retrieval: every image queries the others; R@K is the share whose K nearest hold one of its label.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from vlm.utils import atomic_write_text, cli, setup_logging

log = logging.getLogger("eval.probe")

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def stratified_split(labels: np.ndarray, fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Indices -> (a ``fraction`` of each class, at least one; the rest)."""
    take, rest = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(idx), max(1, int(round(fraction * len(idx)))))
        take += idx[:k].tolist()
        rest += idx[k:].tolist()
    return np.sort(np.array(take, dtype=int)), np.sort(np.array(rest, dtype=int))


def _fit(x, y, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def _scores(model, x, y, num_classes: int) -> dict:
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    pred = probs.argmax(1)
    present = [c for c in range(num_classes) if 0 < (y == c).sum() < len(y)]
    auroc = [roc_auc_score(y == c, probs[:, c]) for c in present]
    return {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(num_classes)), zero_division=0)),
            "mean_auroc": float(np.mean(auroc)) if auroc else None}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2), val_fraction: float = 0.1,
                 c_grid=C_GRID) -> dict:
    runs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        val, pool = stratified_split(train_y, val_fraction, rng)
        for fraction in fractions:
            sub = pool[stratified_split(train_y[pool], fraction, np.random.default_rng([seed, 1]))[0]]
            if len(np.unique(train_y[sub])) < 2:
                raise ValueError(f"{fraction:g} of the training labels holds one class only: nothing to probe")
            val_acc = {c: float((_fit(train_x[sub], train_y[sub], c, seed).predict(train_x[val]) == train_y[val]).mean())
                       for c in c_grid}
            best = max(c_grid, key=lambda c: (val_acc[c], -abs(np.log10(c))))  # ties: the C nearest 1
            model = _fit(train_x[sub], train_y[sub], best, seed)
            runs.append({"seed": seed, "fraction": fraction, "num_train": int(len(sub)), "num_val": int(len(val)),
                         "C": best, "val_accuracy": val_acc[best],
                         **_scores(model, test_x, test_y, num_classes)})
            log.info("seed %d, %g of the labels (%d images): C=%g, test accuracy %.4f", seed, fraction, len(sub),
                     best, runs[-1]["accuracy"])
    summary = {}
    for fraction in fractions:
        rs = [r for r in runs if r["fraction"] == fraction]
        summary[str(fraction)] = {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
                                  for k in ("accuracy", "balanced_accuracy", "macro_f1") } | {
            "num_train": rs[0]["num_train"], "seeds": len(rs)}
    return {"runs": runs, "by_fraction": summary}


def _features(args, classes: list[str], model, img_cfg, device):
    import torch

    from vlm.zeroshot import image_features, image_folder, shard_features

    with torch.no_grad():
        if args.train_shards:
            train_x, train_y, skipped = shard_features(model, args.train_shards, classes, img_cfg, args.batch_size,
                                                       device)
        else:
            paths, train_y, train_classes = image_folder(args.train)
            if train_classes != classes:
                raise ValueError(f"--train {args.train} has classes {train_classes}, --test has {classes}")
            train_x, skipped = image_features(model, paths, img_cfg, args.batch_size, device=device), 0
        paths, test_y, _ = image_folder(args.test)
        test_x = image_features(model, paths, img_cfg, args.batch_size, device=device)
    return train_x.numpy(), np.array(train_y), test_x.numpy(), np.array(test_y), skipped


NEGATIVE_TEMPLATES = ("no {c}.", "no evidence of {c}.", "chest x-ray without {c}.")


def _prompt_embedding(model, tokenizer, texts: list[str], device):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True).float().cpu()
    return F.normalize(emb.mean(0), dim=-1)


def multilabel_zeroshot(feats, labels: list[list], findings: list[str], pos_emb: dict, neg_emb: dict) -> dict:
    """feats (N, D) normalised; labels[i][j] 1 / 0 / None for finding j; pos_emb / neg_emb: finding -> (D,).
    Per finding: score = cos(image, positive prompts) - cos(image, negative prompts), AUROC over the images whose
    label is not None."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for j, f in enumerate(findings):
        keep = [i for i, row in enumerate(labels) if row[j] is not None]
        y = np.array([labels[i][j] for i in keep])
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        entry = {"num_positive": n_pos, "num_negative": n_neg, "auroc": None}
        if n_pos and n_neg:
            s = (feats[keep] @ pos_emb[f] - feats[keep] @ neg_emb[f]).numpy()
            entry["auroc"] = float(roc_auc_score(y, s))
        out[f] = entry
    scored = [v["auroc"] for v in out.values() if v["auroc"] is not None]
    return {"per_finding": out, "mean_auroc": float(np.mean(scored)) if scored else None,
            "num_findings_scored": len(scored)}


def image_retrieval(feats, labels: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Image-to-image R@K by label: every image queries all the others; a hit when one of its K nearest has
    its label. Also R@1 per class."""
    import torch

    sims = feats @ feats.T
    sims.fill_diagonal_(-float("inf"))  # an image never retrieves itself
    order = torch.topk(sims, k=min(max(ks), len(feats) - 1), dim=1).indices.numpy()
    same = labels[order] == labels[:, None]  # (N, K)
    out = {f"r{k}": float(same[:, :k].any(1).mean()) for k in ks}
    out["per_class_r1"] = {int(c): float(same[labels == c, 0].mean()) for c in np.unique(labels)}
    return out


def _files_inside(paths: list[str], root: Path) -> tuple[dict[int, str], dict]:
    """{index: resolved path} of the paths that are files inside ``root`` (vlm.data.paths.resolve_inside:
    nothing outside the root is looked at); the others counted (outside_root, missing_image)."""
    from vlm.data.paths import resolve_inside

    keep, skipped = {}, {}
    for i, p in enumerate(paths):
        q = resolve_inside(root, p)
        why = "outside_root" if q is None else None if q.is_file() else "missing_image"
        if why:
            skipped[why] = skipped.get(why, 0) + 1
        else:
            keep[i] = str(q)
    return keep, skipped


def run_multilabel(args) -> dict:
    import torch

    from eval.benchmarks.chest_labels import read_labels
    from eval.zeroshot import load_for_eval
    from vlm.zeroshot import image_features, load_prompts

    table = read_labels(args.labels, args.layout, args.image_root, args.uncertain, args.blank)
    prompts = load_prompts(args.prompts, [])
    wanted = args.findings.split(",") if args.findings else [f for f in table.findings if f in prompts.classes
                                                              and f != "no_finding"]
    missing = [f for f in wanted if f not in table.findings or f not in prompts.classes]
    if missing or not wanted:
        raise ValueError(f"findings {missing or wanted} need a column in {args.labels} ({table.findings}) and "
                         f"prompts in {args.prompts} ({sorted(prompts.classes)})")
    keep, skipped = _files_inside(table.paths, Path(args.image_root))
    if not keep:
        raise ValueError(f"none of the {len(table.paths)} images of {args.labels} is a file under {args.image_root}")
    cols = [table.findings.index(f) for f in wanted]
    labels = [[table.labels[i][c] for c in cols] for i in keep]
    model, tokenizer, img_cfg, device = load_for_eval(args.checkpoint)
    neg_templates = prompts.negative_templates or list(NEGATIVE_TEMPLATES)
    pos = {f: _prompt_embedding(model, tokenizer, [t.format(c=s) for s in prompts.classes[f] for t in prompts.templates],
                                device) for f in wanted}
    neg = {f: _prompt_embedding(model, tokenizer, [t.format(c=s) for s in prompts.classes[f] for t in neg_templates],
                                device) for f in wanted}
    with torch.no_grad():
        feats = image_features(model, list(keep.values()), img_cfg, args.batch_size, device=device)
    result = multilabel_zeroshot(feats, labels, wanted, pos, neg)
    result.update(checkpoint=str(args.checkpoint), labels=str(args.labels), layout=args.layout,
                  uncertain=args.uncertain, blank=args.blank, num_images=len(keep), skipped=skipped,
                  label_counts=table.counts, negative_templates=neg_templates)
    return result


def run_retrieval(args) -> dict:
    import torch

    from eval.zeroshot import load_for_eval
    from vlm.zeroshot import image_features, image_folder

    paths, labels, classes = image_folder(args.folder)
    if len(paths) < 2:
        raise ValueError(f"{args.folder}: image retrieval needs at least 2 images")
    model, _, img_cfg, device = load_for_eval(args.checkpoint)
    with torch.no_grad():
        feats = image_features(model, paths, img_cfg, args.batch_size, device=device)
    ks = tuple(int(k) for k in args.ks.split(","))
    r = image_retrieval(feats, np.array(labels), ks)
    r["per_class_r1"] = {classes[c]: v for c, v in r["per_class_r1"].items()}
    counts = np.bincount(labels, minlength=len(classes))
    # chance of R@1: a random other image has the query's label
    r["chance_r1"] = float(sum(n * (n - 1) for n in counts) / (len(labels) * (len(labels) - 1)))
    r.update(checkpoint=str(args.checkpoint), folder=str(args.folder), num_images=len(paths), classes=classes)
    return r


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    lin = sub.add_parser("linear", help="logistic regression on frozen image features at several label fractions")
    lin.add_argument("--checkpoint", required=True, help="a train.clip run or checkpoint, or an open_clip export")
    src = lin.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", help="training images, one sub-folder per class")
    src.add_argument("--train-shards", help="a shard folder (a sample's class: the test class in its meta.labels)")
    lin.add_argument("--test", required=True, help="test images, one sub-folder per class")
    lin.add_argument("--fractions", default="0.01,0.1,1", help="label fractions (default 0.01,0.1,1)")
    lin.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    lin.add_argument("--val-fraction", type=float, default=0.1, help="held out to choose C (default 0.1)")
    lin.add_argument("--c-grid", default=",".join(f"{c:g}" for c in C_GRID), help="inverse regularisation values")
    lin.add_argument("--batch-size", type=int, default=64)
    lin.add_argument("--out", required=True, help="result JSON")
    ml = sub.add_parser("multilabel", help="multi-label zero-shot: per-finding AUROC from positive/negative prompts")
    ml.add_argument("--checkpoint", required=True)
    ml.add_argument("--labels", required=True, help="the label CSV as released (CheXpert or ChestX-ray14)")
    ml.add_argument("--layout", required=True, choices=["chexpert", "nih"])
    ml.add_argument("--image-root", required=True, help="the folder the CSV's image paths are relative to")
    ml.add_argument("--prompts", default="configs/prompts/chest_xray.yaml",
                    help="prompt file: classes = finding keys (e.g. pleural_effusion), templates, negative_templates")
    ml.add_argument("--findings", help="comma-separated finding keys (default: every finding with a column and "
                                       "prompts, but no_finding)")
    ml.add_argument("--uncertain", default="ignore", choices=["ignore", "zeros", "ones"],
                    help="CheXpert's -1 labels: left out of the finding's AUROC (default), negative, positive")
    ml.add_argument("--blank", default="zeros", choices=["zeros", "ignore"],
                    help="CheXpert's empty labels (not mentioned): negative (default) or left out")
    ml.add_argument("--batch-size", type=int, default=64)
    ml.add_argument("--out", required=True, help="result JSON")
    ret = sub.add_parser("retrieval", help="image-to-image retrieval: R@K of an image's label among its neighbours")
    ret.add_argument("--checkpoint", required=True)
    ret.add_argument("--folder", required=True, help="images, one sub-folder per label")
    ret.add_argument("--ks", default="1,5,10")
    ret.add_argument("--batch-size", type=int, default=64)
    ret.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args(argv)
    setup_logging()
    if args.command in ("multilabel", "retrieval"):
        r = run_multilabel(args) if args.command == "multilabel" else run_retrieval(args)
        atomic_write_text(Path(args.out), json.dumps(r, indent=1) + "\n")
        if args.command == "multilabel":
            print("| finding | positives | negatives | AUROC |\n|---|---|---|---|")
            for f, v in r["per_finding"].items():
                print(f"| {f} | {v['num_positive']} | {v['num_negative']} | "
                      f"{'n/a' if v['auroc'] is None else format(v['auroc'], '.4f')} |")
            print(f"mean AUROC: {r['mean_auroc']}")
        else:
            print(" ".join(f"R@{k[1:]}={v:.4f}" for k, v in r.items() if k[0] == "r" and k[1:].isdigit())
                  + f" (chance R@1 {r['chance_r1']:.4f})")
        return 0
    try:
        fractions = [float(x) for x in args.fractions.split(",")]
        seeds = [int(x) for x in args.seeds.split(",")]
        c_grid = [float(x) for x in args.c_grid.split(",")]
    except ValueError:
        raise ValueError("--fractions, --seeds and --c-grid take comma-separated numbers") from None
    if not all(0 < f <= 1 for f in fractions) or not 0 < args.val_fraction < 1 or not all(c > 0 for c in c_grid):
        raise ValueError("--fractions must be in (0, 1], --val-fraction in (0, 1), --c-grid positive")
    from eval.zeroshot import load_for_eval
    from vlm.zeroshot import image_folder

    t0 = time.time()
    classes = image_folder(args.test)[2]
    model, _, img_cfg, device = load_for_eval(args.checkpoint)
    train_x, train_y, test_x, test_y, skipped = _features(args, classes, model, img_cfg, device)
    log.info("features: %d training images (%d skipped: not exactly one class), %d test images, %d classes",
             len(train_y), skipped, len(test_y), len(classes))
    result = linear_probe(train_x, train_y, test_x, test_y, len(classes), fractions, seeds, args.val_fraction, c_grid)
    result.update(checkpoint=str(args.checkpoint), classes=classes, num_train_images=int(len(train_y)),
                  num_test_images=int(len(test_y)), train_skipped=skipped, seconds=round(time.time() - t0, 1))
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print("| label fraction | training images | test accuracy (mean ± std over seeds) | balanced accuracy |")
    print("|---|---|---|---|")
    for f, s in result["by_fraction"].items():
        print(f"| {float(f):g} | {s['num_train']} | {s['accuracy']['mean']:.4f} ± {s['accuracy']['std']:.4f} | "
              f"{s['balanced_accuracy']['mean']:.4f} ± {s['balanced_accuracy']['std']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
