"""Export a trained checkpoint to a folder that a stock library loads, and optionally push it.

    python -m train.export --checkpoint runs/demo/clip --to open_clip --out exports/medclip [--push-to-hub org/name]

--to open_clip: a train.clip checkpoint (run folder, or checkpoints/step_N) -> open_clip folder
(open_clip_config.json with preprocessing, open_clip_model.safetensors, tokenizer files, model
card); load it with open_clip.create_model_from_pretrained('local-dir:OUT').
--to transformers: a train.instruct checkpoint -> a transformers folder (LlavaForConditionalGeneration
with LoRA merged, LlavaProcessor with the image preprocessing and chat template; a tuned stock VLM
(model.vlm) as its own class and processor); load it with AutoModelForImageTextToText /
AutoProcessor.from_pretrained(OUT).

    python -m train.export --from llava_med llava-med-v1.5-mistral-7b --to transformers --out exports/llava-med-hf

--from llava_med: a LLaVA-Med checkpoint folder (v1.5 llava_mistral, v1 llava, or LLaVA-1.5-style
llava_llama) -> the same kind of stock transformers folder, with the chat template of LLaVA-Med's
conversation mode (vlm/models/llava_med.py has the tensor mapping). --vision-tower supplies the CLIP vision
model when the checkpoint holds none (default: its config's mm_vision_tower).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vlm.utils import atomic_folder, cli, setup_logging

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
    if cfg.model.vlm:
        return export_stock_run(args, cfg, p, state)
    if getattr(args, "adapter", None):
        raise ValueError("--adapter applies to a stock VLM run (model.vlm): the LLaVA assembly has no stock base "
                         "checkpoint to put an adapter on; its export has the adapters merged")
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
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [medical, llava]\n---\n\n"
            f"# {args.name or out.name}\n\nA LLaVA-style medical assistant trained with this repository's "
            f"train.instruct (stage {cfg.model.stage}, {state['step']} steps{', LoRA merged' if merged else ''}). "
            f"Load it with stock "
            f"transformers:\n\n```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
            f"model = AutoModelForImageTextToText.from_pretrained('PATH')\n"
            f"processor = AutoProcessor.from_pretrained('PATH')\n```\n\nResearch use only; not a medical device.\n")
    log.info("transformers folder -> %s", out)
    return out


def export_stock_run(args, cfg, ckpt: Path, state: dict) -> Path:
    """A train.instruct run of a stock VLM -> the same stock class + its processor (LoRA merged)."""
    from dataclasses import asdict

    from vlm.checkpoint import load_weights_into, model_weights
    from vlm.models.stock import export_stock, stock_from_config

    model, processor = stock_from_config(asdict(cfg.model))
    load_weights_into(model, model_weights(ckpt), str(ckpt))
    if args.adapter:  # before the adapters are merged into the weights
        from vlm.models.stock import export_adapter

        log.info("peft adapter folder -> %s (PeftModel.from_pretrained(%s, ...))",
                 export_adapter(model, cfg.model.vlm, args.adapter), cfg.model.vlm)
    name = args.name or Path(args.out).name
    card = (f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\nbase_model: {cfg.model.vlm}\n"
            f"tags: [medical]\n---\n\n# {name}\n\n{cfg.model.vlm} fine-tuned with this repository's train.instruct "
            f"({state['step']} steps{', LoRA merged' if cfg.model.lora.r > 0 else ''}; frozen: "
            f"{', '.join(cfg.model.freeze) or 'nothing'}). Load it with stock transformers:\n\n```python\n"
            f"from transformers import AutoModelForImageTextToText, AutoProcessor\n"
            f"model = AutoModelForImageTextToText.from_pretrained('PATH')\n"
            f"processor = AutoProcessor.from_pretrained('PATH')\n```\n\nResearch use only; not a medical device.\n")
    out = export_stock(model, processor, args.out, card)
    log.info("transformers folder (%s) -> %s", type(model).__name__, out)
    return out


def _from_dict(cls, data: dict):
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data)))


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", metavar="SRC", help="the checkpoint to export (or --checkpoint)")
    p.add_argument("--checkpoint", help="a run folder or a checkpoint folder (same as SRC)")
    p.add_argument("--from", dest="source", choices=["ours", "llava_med"], default="ours",
                   help="ours: a train.clip / train.instruct checkpoint; llava_med: a LLaVA-Med checkpoint folder")
    p.add_argument("--to", required=True, choices=["open_clip", "transformers"])
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hugging Face repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--name", help="model name for the card (default: the output folder's name)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--adapter", metavar="DIR",
                   help="a stock VLM run tuned with LoRA: also write its adapters (and the fully trained projector) "
                        "as a peft adapter folder here, for PeftModel.from_pretrained(the base checkpoint, DIR)")
    p.add_argument("--vision-tower", metavar="DIR_OR_ID",
                   help="--from llava_med: the CLIP vision model when the checkpoint has no vision tower weights "
                        "(default: config.json's mm_vision_tower)")
    p.add_argument("--conv-mode", choices=["mistral_instruct", "vicuna_v1", "simple"],
                   help="--from llava_med: the prompt format (default: the one LLaVA-Med's eval uses for the layout)")
    args = p.parse_args(argv)
    if (args.src is None) == (args.checkpoint is None):
        p.error("give the checkpoint once: SRC or --checkpoint")
    args.checkpoint = args.checkpoint or args.src
    if args.source == "llava_med" and args.to != "transformers":
        p.error("--from llava_med converts to --to transformers only")
    if args.adapter and (args.source != "ours" or args.to != "transformers"):
        p.error("--adapter applies to --to transformers of a train.instruct run")
    if args.source == "ours" and (args.vision_tower or args.conv_mode):
        p.error("--vision-tower and --conv-mode apply to --from llava_med")
    setup_logging()
    if args.source == "llava_med":
        from vlm.models.llava_med import convert_llava_med

        out = convert_llava_med(args.checkpoint, args.out, vision_tower=args.vision_tower, conv_mode=args.conv_mode,
                                name=args.name)
    else:
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
