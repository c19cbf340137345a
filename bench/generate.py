"""Generation throughput: batched KV-cache generation (eval.generate) vs LLaVA-Med's evaluation loop as it
runs (llava/eval/model_vqa.py: one question at a time through transformers' `model.generate`, greedy, KV
cache on, stopped by its keyword stopping criterion on the conversation's stop string, which is then cut
off the decoded answer), same model, same prompts; the answers must be identical (the run fails otherwise).

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


class KeywordStop:
    """LLaVA-Med's stopping rule: stop once the newly generated text ends with the stop string (or its token)."""

    def __init__(self, keyword: str, tok, prompt_len: int):
        self.keyword, self.tok, self.start = keyword, tok, prompt_len
        self.ids = tok(keyword, add_special_tokens=False)["input_ids"]

    def __call__(self, output_ids, scores, **kwargs):
        import torch

        new = output_ids[0, self.start:]
        if len(self.ids) and len(new) >= len(self.ids) and new[-len(self.ids):].tolist() == self.ids:
            done = True
        else:
            done = self.tok.decode(new[-8:], skip_special_tokens=False).endswith(self.keyword)
        return torch.full((output_ids.shape[0],), done, dtype=torch.bool, device=output_ids.device)


def peer_answer(model, tok, request: dict, stop: str, max_new_tokens: int) -> str:
    """One question as LLaVA-Med's model_vqa.py answers it."""
    import torch
    from transformers import StoppingCriteriaList

    ids = torch.tensor([request["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=request["pixel_values"][None], do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, use_cache=True,
                             stopping_criteria=StoppingCriteriaList([KeywordStop(stop, tok, ids.shape[1])]))
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return text[:-len(stop)].strip() if stop and text.endswith(stop) else text


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
    from vlm.data.chat import end_of_turn_ids

    # the conversation's stop string (LLaVA-Med's conv.sep2): the text of the template's end-of-turn token
    turn_end = [t for t in end_of_turn_ids(tok) if t != tok.eos_token_id] or [tok.eos_token_id]
    stop = tok.convert_ids_to_tokens(turn_end[0])
    peer_answer(model, tok, requests[0], stop, 2)  # warm-up
    t0 = time.perf_counter()
    single = [peer_answer(model, tok, r, stop, a.max_new_tokens) for r in requests]
    peer = len(requests) / (time.perf_counter() - t0)
    same = sum(x == y for x, y in zip(batched, single))
    print(f"batched {ours:.1f} answers/s, LLaVA-Med's loop {peer:.1f} answers/s, identical answers "
          f"{same}/{len(requests)}", file=sys.stderr)
    if same != len(requests):
        bad = next(i for i, (x, y) in enumerate(zip(batched, single)) if x != y)
        raise SystemExit(f"answers differ (question {bad}: ours {batched[bad]!r}, peer {single[bad]!r})")
    print(result_line("generate", ours, peer, unit="answers/s", batch_size=a.batch_size, questions=len(requests),
                      identical=same == len(requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
