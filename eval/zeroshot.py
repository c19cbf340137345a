"""Zero-shot classification with a CLIP model and a medical prompt ensemble.

    python -m eval.zeroshot --checkpoint runs/demo/clip --folder data/demo/synth/eval/zeroshot/finding \\
        --prompts configs/prompts/synth_finding.yaml --out runs/demo/zeroshot_finding.json

--checkpoint: a train.clip run folder (its newest checkpoint), a checkpoint folder, or an
open_clip export folder. Data: --folder (one sub-folder per class), --csv (image, label
columns) or --shards (a shard folder; a sample's class is the class name in its meta.labels).
--concept-fusion W adds ConceptCLIP-style concept evidence (the prompt file's `concepts` per
class, scored on image patches by the alignment head) with weight W. Writes OUT (accuracy, balanced accuracy, macro-F1, per-class AUROC, confusion matrix),
and beside it OUT's stem + _confusion.png and _roc.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from eval.plots import confusion_matrix_png, roc_png
from vlm.data.transforms import ImageConfig
from vlm.models.clip import build_tokenizer, load_clip
from vlm.utils import atomic_write_text, cli, setup_logging
from vlm.zeroshot import (build_classifier, class_concept_index, classification_metrics, fused_probs, image_csv,
                          image_features, image_folder, load_prompts, shard_features)

log = logging.getLogger("eval.zeroshot")


def load_for_eval(checkpoint: str, ema: bool = False):
    """-> (model on the best device, tokenizer, the preprocessing it was trained with, device)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_clip(checkpoint, use_ema=ema)
    model.to(device)
    return model, build_tokenizer(model.arch), image_config(info, model.image_size), device


def image_config(info: dict, size: int) -> ImageConfig:
    """The preprocessing the model was trained with (its checkpoint's, or the export's)."""
    img = info.get("image") or {}
    pre = info.get("preprocess") or {}
    cfg = ImageConfig(size=size)
    for key in ("mean", "std"):
        if key in img:
            setattr(cfg, key, list(img[key]))
        elif key in pre:
            setattr(cfg, key, list(pre[key]))
    return cfg


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.zeroshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="one sub-folder of images per class")
    src.add_argument("--csv", help="a CSV with image and label columns")
    src.add_argument("--shards", help="a shard folder (classes from meta.labels; needs --prompts)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--prompts", help="prompt ensemble YAML (configs/prompts/); default: the class names")
    p.add_argument("--out", required=True, help="result JSON; PNG plots are written beside it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--concept-fusion", type=float, default=0.0, metavar="W",
                   help="weight of concept evidence (needs `concepts` in the prompt file; default 0: off)")
    args = p.parse_args(argv)
    setup_logging()
    model, tokenizer, img_cfg, device = load_for_eval(args.checkpoint, args.ema)
    if args.shards:
        if not args.prompts:
            raise ValueError("--shards needs --prompts (its classes are matched against meta.labels)")
        classes = sorted(load_prompts(args.prompts, []).classes)
    elif args.folder:
        paths, labels, classes = image_folder(args.folder, args.max_images)
    else:
        paths, labels, classes = image_csv(args.csv, args.image_column, args.label_column)
    prompts = load_prompts(args.prompts, classes)
    concept_names, class_concepts = class_concept_index(prompts, classes)
    if args.concept_fusion > 0 and not concept_names:
        raise ValueError(f"--concept-fusion needs a `concepts:` mapping in the prompt file {args.prompts}")
    with torch.no_grad():
        clf = build_classifier(model, tokenizer, prompts, classes, device).float().cpu()
        cemb = model.encode_text(tokenizer(concept_names).to(device)) if args.concept_fusion > 0 else None
        skipped = 0
        if args.shards:
            out, labels, skipped = shard_features(model, args.shards, classes, img_cfg, args.batch_size, device, cemb)
        else:
            out = image_features(model, paths, img_cfg, args.batch_size, device=device, concept_emb=cemb)
        feats, sims = out if cemb is not None else (out, None)
        probs = fused_probs(model, feats, clf, sims, class_concepts, args.concept_fusion).numpy()
    labels_np = np.array(labels)
    result = classification_metrics(probs, labels_np, classes)
    result.update(checkpoint=str(args.checkpoint), prompts=args.prompts, data=args.folder or args.csv or args.shards,
                  concept_fusion=args.concept_fusion, unlabeled_skipped=skipped)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    title = f"{out.stem}: accuracy {result['accuracy']:.3f}"
    confusion_matrix_png(result["confusion_matrix"], classes, out.with_name(out.stem + "_confusion.png"), title)
    roc_png(probs, labels_np, classes, out.with_name(out.stem + "_roc.png"), out.stem)
    print(json.dumps({k: result[k] for k in ("num_images", "accuracy", "balanced_accuracy", "macro_f1",
                                             "mean_auroc")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
