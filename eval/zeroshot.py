"""Zero-shot classification with a CLIP model and a medical prompt ensemble.

    python -m eval.zeroshot --checkpoint runs/demo/clip --folder data/demo/synth/eval/zeroshot/finding \\
        --prompts configs/prompts/synth_finding.yaml --out runs/demo/zeroshot_finding.json

--checkpoint: a train.clip run folder (its newest checkpoint), a checkpoint folder, or an
open_clip export folder. Data: --folder (one sub-folder per class) or --csv (image, label
columns). Writes OUT (accuracy, balanced accuracy, macro-F1, per-class AUROC, confusion matrix),
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
from vlm.zeroshot import (build_classifier, classification_metrics, image_csv, image_features, image_folder,
                          load_prompts)

log = logging.getLogger("eval.zeroshot")


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
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--prompts", help="prompt ensemble YAML (configs/prompts/); default: the class names")
    p.add_argument("--out", required=True, help="result JSON; PNG plots are written beside it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    args = p.parse_args(argv)
    setup_logging()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_clip(args.checkpoint, use_ema=args.ema)
    model.to(device)
    tokenizer = build_tokenizer(model.arch)
    if args.folder:
        paths, labels, classes = image_folder(args.folder, args.max_images)
    else:
        paths, labels, classes = image_csv(args.csv, args.image_column, args.label_column)
    prompts = load_prompts(args.prompts, classes)
    with torch.no_grad():
        clf = build_classifier(model, tokenizer, prompts, classes, device).float().cpu()
        feats = image_features(model, paths, image_config(info, model.image_size), args.batch_size, device=device)
        probs = (float(model.logit_scale.exp()) * feats @ clf.T).softmax(-1).numpy()
    labels_np = np.array(labels)
    result = classification_metrics(probs, labels_np, classes)
    result.update(checkpoint=str(args.checkpoint), prompts=args.prompts, data=args.folder or args.csv)
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
