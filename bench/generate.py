"""Generation throughput: batched KV-cache generation (eval.generate) vs one question at a time
(LLaVA-Med's model_vqa loop), same model, same greedy decoding, same answers (checked).

    python bench/generate.py [--checkpoint runs/demo/stage2] [--questions 96] [--batch-size 16]

Uses the demo's stage-2 assistant and the synthetic SLAKE-layout questions (run `make demo`
first). Last line: {"bench": "generate", "ours": answers/s, "peer": answers/s, "ratio": ...}
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, result_line  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(REPO / "runs/demo/stage2"))
    p.add_argument("--data-root", default=str(REPO / "data/demo/synth/eval/slake"))
    p.add_argument("--questions", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args(argv)
    import torch

    from eval.benchmarks import Slake
    from eval.generate import generate
    from vlm.data.transforms import ImageConfig, MedicalImageTransform
    from vlm.models.vlm import load_assistant

    torch.set_num_threads(2)
    model, tok, image = load_assistant(a.checkpoint)
    items = Slake(a.data_root).load()[:a.questions]
    tf = MedicalImageTransform(ImageConfig(size=image["size"], mean=image["mean"], std=image["std"]))
    image_id = tok.convert_tokens_to_ids(image["image_token"])
    n = int(model.config.image_seq_length)
    requests = []
    for it in items:
        prompt = tok.apply_chat_template([{"role": "user", "content": image["image_token"] + "\n" + it.question}],
                                         tokenize=False, add_generation_prompt=True)
        ids = [t for t0 in tok(prompt, add_special_tokens=False)["input_ids"] for t in ([t0] * n if t0 == image_id else [t0])]
        requests.append({"input_ids": ids, "pixel_values": tf.from_bytes(Path(it.image).read_bytes())})
    generate(model, tok, requests[:2], batch_size=2, max_new_tokens=2)  # warm-up
    t0 = time.perf_counter()
    batched = generate(model, tok, requests, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens)
    ours = len(requests) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    single = [generate(model, tok, [r], batch_size=1, max_new_tokens=a.max_new_tokens)[0] for r in requests]
    peer = len(requests) / (time.perf_counter() - t0)
    same = sum(x == y for x, y in zip(batched, single))
    print(f"batched {ours:.1f} answers/s, one at a time {peer:.1f} answers/s, identical answers {same}/{len(requests)}",
          file=sys.stderr)
    print(result_line("generate", ours, peer, unit="answers/s", batch_size=a.batch_size, questions=len(requests),
                      identical=same == len(requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
