"""Export a trained checkpoint to a folder that a stock library loads, and optionally push it.

    python -m train.export --checkpoint runs/demo/clip --to open_clip --out exports/medclip [--push-to-hub org/name]

--to open_clip: a train.clip checkpoint (run folder, or checkpoints/step_N) -> open_clip folder
(open_clip_config.json with preprocessing, open_clip_model.safetensors, tokenizer files, model
card); load it with open_clip.create_model_from_pretrained('local-dir:OUT').
--to transformers: the instruction-tuned assistant (train.instruct) -> a transformers folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vlm.utils import cli, setup_logging

log = logging.getLogger("train.export")


def export_clip(args) -> Path:
    from vlm.hub import clip_model_card, export_open_clip
    from vlm.models.clip import load_clip

    model, info = load_clip(args.checkpoint, use_ema=args.ema)
    image = info.get("image") or {}
    from vlm.data.transforms import CLIP_MEAN, CLIP_STD

    results = None
    run_dir = Path(args.checkpoint)
    for candidate in (run_dir / "result.json", run_dir.parent.parent / "result.json"):
        if candidate.is_file():
            results = json.loads(candidate.read_text()).get("zeroshot")
            break
    card = clip_model_card(args.name or Path(args.out).name, model.arch, info, results)
    out = export_open_clip(model, args.out, image.get("mean", list(CLIP_MEAN)), image.get("std", list(CLIP_STD)),
                           card)
    log.info("open_clip folder -> %s (load with open_clip.create_model_from_pretrained('local-dir:%s'))", out, out)
    return out


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder or a checkpoint folder")
    p.add_argument("--to", required=True, choices=["open_clip", "transformers"])
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hugging Face repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--name", help="model name for the card (default: the output folder's name)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = p.parse_args(argv)
    setup_logging()
    if args.to == "open_clip":
        out = export_clip(args)
    else:
        raise ValueError("--to transformers exports an instruction-tuned assistant (train.instruct), which this "
                         "checkpoint is not; use --to open_clip for a CLIP checkpoint")
    if args.push_to_hub:
        from vlm.hub import push_to_hub

        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as e:  # network, auth, permissions
            print(f"error: push to {args.push_to_hub} failed: {e}", file=sys.stderr)
            return 1
        log.info("pushed to %s", url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
