"""Image-text retrieval: R@1/5/10 both ways, features computed in batches, ranks in chunks.

    python -m eval.retrieval --checkpoint runs/demo/clip --pairs data/demo/synth/eval/retrieval.jsonl \\
        --out runs/demo/retrieval.json

--pairs: JSONL or CSV of image path + caption (relative to the file's folder or --image-root);
several captions of one image count as one image with several correct texts. Writes OUT and
OUT's stem + _recall.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import torch

from eval.plots import recall_png
from eval.zeroshot import load_for_eval
from vlm.utils import atomic_write_text, cli, setup_logging
from vlm.zeroshot import image_features, retrieval_eval, text_features

log = logging.getLogger("eval.retrieval")


def read_pairs(path: Path, image_col: str, text_col: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"--pairs not found: {path}")
    if path.suffix in (".jsonl", ".ndjson"):
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows or image_col not in rows[0] or text_col not in rows[0]:
        raise ValueError(f"{path}: needs {image_col!r} and {text_col!r} fields")
    return [(r[image_col], r[text_col]) for r in rows]


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pairs", required=True, help="JSONL/CSV with image and caption")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--text-column", default="caption")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ema", action="store_true")
    args = p.parse_args(argv)
    setup_logging()
    model, tokenizer, img_cfg, device = load_for_eval(args.checkpoint, args.ema)
    pairs_path = Path(args.pairs)
    pairs = read_pairs(pairs_path, args.image_column, args.text_column)
    root = Path(args.image_root) if args.image_root else pairs_path.parent
    images = list(dict.fromkeys(img for img, _ in pairs))
    index = {img: i for i, img in enumerate(images)}
    with torch.no_grad():
        img_f = image_features(model, [str(root / i) for i in images], img_cfg, args.batch_size, device=device)
        txt_f = text_features(model, tokenizer, [t for _, t in pairs], args.batch_size, device)
    result = retrieval_eval(img_f, txt_f, [index[img] for img, _ in pairs])
    result.update(num_images=len(images), num_texts=len(pairs), checkpoint=str(args.checkpoint),
                  chance_r1=1 / max(1, len(images)))
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    recall_png(result, out.with_name(out.stem + "_recall.png"), out.stem)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("image_to", "text_to"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
