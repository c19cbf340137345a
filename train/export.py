"""Export a trained checkpoint to a folder that a stock library loads, and optionally push it.

    python -m train.export --checkpoint runs/demo/clip --to open_clip --out exports/medclip [--push-to-hub org/name]

--to open_clip: a train.clip checkpoint (run folder, or checkpoints/step_N) -> open_clip folder
(open_clip_config.json with preprocessing, open_clip_model.safetensors, tokenizer files, model
card); load it with open_clip.create_model_from_pretrained('local-dir:OUT').
--to transformers: a train.instruct checkpoint -> a transformers folder (LlavaForConditionalGeneration
with LoRA merged, LlavaProcessor with the image preprocessing and chat template); load it with
AutoModelForImageTextToText / AutoProcessor.from_pretrained(OUT).
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


def export_assistant(args) -> Path:
    """A train.instruct checkpoint -> a transformers folder: LlavaForConditionalGeneration (LoRA merged)
    + a LlavaProcessor (image preprocessing, tokenizer, chat template) + a model card."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from train.config import InstructRunConfig
    from train.instruct import build_assistant
    from vlm.checkpoint import list_checkpoints, load_weights_into, model_weights
    from vlm.models.lora import merge_lora
    from vlm.models.vlm import stock_projector

    p = Path(args.checkpoint)
    if (p / "checkpoints").is_dir():
        p = list_checkpoints(p / "checkpoints")[-1]
    state = json.loads((p / "state.json").read_text())
    if "chat" not in state["config"]:
        raise ValueError(f"{p} is not a train.instruct checkpoint (use --to open_clip for a CLIP run)")
    cfg = _from_dict(InstructRunConfig, state["config"])
    cfg.model.init_from = None
    model, tokenizer = build_assistant(cfg)
    load_weights_into(model, model_weights(p), str(p))
    merged = merge_lora(model)
    stock_projector(model)
    model.eval()
    img = cfg.data.image
    vcfg = model.config.vision_config
    image_processor = CLIPImageProcessor(size={"shortest_edge": img.size}, crop_size={"height": img.size, "width": img.size},
                                         image_mean=list(img.mean), image_std=list(img.std), do_center_crop=True,
                                         resample=2)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vcfg.patch_size,
                               vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                               chat_template=tokenizer.chat_template, image_token=cfg.chat.image_token,
                               num_additional_image_tokens=1)
    from vlm.data.chat import end_of_turn_ids

    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)  # stop at the end of the assistant turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [medical, llava]\n---\n\n"
        f"# {args.name or out.name}\n\nA LLaVA-style medical assistant trained with this repository's train.instruct "
        f"(stage {cfg.model.stage}, {state['step']} steps{', LoRA merged' if merged else ''}). Load it with stock "
        f"transformers:\n\n```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"model = AutoModelForImageTextToText.from_pretrained('PATH')\nprocessor = AutoProcessor.from_pretrained('PATH')"
        f"\n```\n\nResearch use only; not a medical device.\n")
    import shutil

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("transformers folder -> %s", out)
    return out


def _from_dict(cls, data: dict):
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data)))


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
    out = export_clip(args) if args.to == "open_clip" else export_assistant(args)
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
