"""Ask an exported model about one image, with the stock libraries only (no code of ours in the loop):
the check that an export is usable by someone who has never seen this repository.

    python -m eval.ask --model runs/demo/exports/transformers --image scan.png --question "What modality is this?"
    python -m eval.ask --model runs/demo/exports/open_clip --image scan.png --labels "chest x-ray,head ct,fundus photo"
    python -m eval.ask --model runs/demo/exports/open_clip --image scan.png --prompts configs/prompts/synth_modality.yaml

A transformers folder (config.json) or hub id is loaded with AutoModelForImageTextToText + AutoProcessor
and answers greedily; an open_clip folder (open_clip_config.json) is loaded with
open_clip.create_model_from_pretrained('local-dir:...') and ranks the labels zero-shot
(--template, default "an image of {}"), or the classes of a prompt-ensemble file (--prompts). Prints the answer; --out writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.utils import atomic_write_text, cli, setup_logging


def ask_transformers(folder, image, question: str, max_new_tokens: int) -> dict:
    """Any stock VLM (folder or hub id): AutoModelForImageTextToText + AutoProcessor, the processor's chat
    template (which writes BOS itself), greedy until the end of the assistant turn."""
    import torch

    from vlm.models.stock import load_stock_vlm, stop_token_ids

    model, processor = load_stock_vlm(folder)
    model.eval()
    if next(model.parameters()).dtype != torch.float32:
        model.float()  # bf16 checkpoints on a CPU
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[[image]], text=[prompt], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(model, processor))
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return {"kind": "transformers", "question": question, "answer": answer}


def ask_open_clip(folder: Path, image, prompts) -> dict:
    """Zero-shot with the stock model and tokenizer; the class embeddings are the prompt ensemble's
    averaged text embeddings (vlm.zeroshot.build_classifier calls only encode_text)."""
    import open_clip
    import torch

    from vlm.remote_code import refuse_remote_code
    from vlm.zeroshot import build_classifier

    refuse_remote_code(folder, "open_clip export")  # open_clip loads the tokenizer from the folder itself
    text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"].get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):  # stock open_clip loads these without trust_remote_code
        if text_cfg.get(key):
            refuse_remote_code(text_cfg[key], "text tower" if key == "hf_model_name" else "tokenizer")
    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    labels = list(prompts.classes)
    with torch.no_grad():
        img = model.encode_image(preprocess(image)[None], normalize=True)
        txt = build_classifier(model, tokenizer, prompts, labels)
        probs = (model.logit_scale.exp() * img @ txt.T).softmax(dim=-1)[0]
    order = probs.argsort(descending=True).tolist()
    return {"kind": "open_clip", "labels": labels, "answer": labels[order[0]],
            "probs": {labels[i]: round(float(probs[i]), 4) for i in order}}


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.ask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported folder (train.export --to transformers|open_clip), or any "
                                                  "stock VLM folder or hub id (Qwen2-VL, Gemma 3, llava-hf, ...)")
    p.add_argument("--image", required=True)
    p.add_argument("--question", help="for an assistant (transformers folder)")
    p.add_argument("--labels", help="comma-separated class names, for a CLIP (open_clip folder)")
    p.add_argument("--template", default="an image of {}", help="CLIP prompt template ({} = the label)")
    p.add_argument("--prompts", help="instead of --labels: a prompt-ensemble YAML (configs/prompts/)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", help="also write the answer as JSON here")
    args = p.parse_args(argv)
    setup_logging()
    from PIL import Image

    from vlm.models.stock import is_stock_source

    folder, image_path = Path(args.model), Path(args.image)
    if not image_path.is_file():
        raise FileNotFoundError(f"--image not found: {image_path}")
    image = Image.open(image_path).convert("RGB")
    if (folder / "open_clip_config.json").is_file():
        from vlm.config import load_config
        from vlm.zeroshot import PromptConfig

        if args.prompts:
            prompts = load_config(PromptConfig, args.prompts)
        elif args.labels:
            labels = [x.strip() for x in args.labels.split(",") if x.strip()]
            prompts = PromptConfig(templates=[args.template.replace("{}", "{c}")], classes={x: [x] for x in labels})
        else:
            raise ValueError(f"{folder} is an open_clip model: pass --labels or --prompts")
        result = ask_open_clip(folder, image, prompts)
    elif (folder / "config.json").is_file() or is_stock_source(args.model):
        if not args.question:
            raise ValueError(f"{folder} is a transformers model: pass --question")
        result = ask_transformers(folder, image, args.question, args.max_new_tokens)
    else:
        raise ValueError(f"{folder}: neither an open_clip export (open_clip_config.json) nor a transformers one")
    result = {"model": str(folder), "image": str(image_path), **result}
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
