"""Multiple-choice scoring throughput: `eval.vqa score` over a 100,000-question benchmark in MedQA's release format
(written to a temporary folder), with predictions in every form the scorer reads (letters, option texts, "The answer
is X", <think>/<answer> blocks, ramblings it refuses), and MMMU's compat parsing on the same outputs.

    python bench/choice_scoring.py [--questions 100000] [--bootstrap 1000]
    python bench/choice_scoring.py --generate 10000 [--nproc 2]   # and the suite's generation pass over 10k questions

Reports wall seconds for the whole command as a user runs it (a fresh `python -m eval.vqa score` process: imports,
reading and checking the release, reading the predictions, scoring, the bootstrap interval, writing the JSON, the
per-question CSV and the markdown), the scoring step alone, and questions per second. There is no peer to run
beside it: MMMU's eval_utils, MedEvalKit and VLMEvalKit are not installable packages (they run from their
repositories), so "peer" is null. Last line: {"bench": "choice_scoring", "ours": questions/s, "peer": null, ...}

--generate N: the generation pass of a ~10k-question text benchmark, as eval.suite runs it: a tiny LLM (2 layers,
64 wide, built here; the time is the harness's, batching, prompts, sharding and merging, not a real model's) answers
N MedQA-format questions through `torchrun --nproc_per_node P -m eval.vqa generate --llm-only --llm ...`
(--batch-size 64, 4 new tokens), one pass sharded over the ranks and merged in question order; then the answers
are scored. Prints the seconds and questions per second of the pass.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

FORMS = ("{L}", "{T}", "The answer is {L}.", "<think>{O} looks possible but no</think><answer>{L}</answer>",
         "({L}) {T}", "{L} and {O}", "I would go with {T} here, most likely", "{O}")


def write_release(root: Path, n: int) -> tuple[Path, Path]:
    import random

    rng = random.Random(0)
    folder = root / "data_clean/questions/US/4_options"
    folder.mkdir(parents=True)
    rel, preds = folder / "phrases_no_exclude_test.jsonl", root / "predictions.jsonl"
    with open(rel, "w") as f, open(preds, "w") as g:
        for i in range(n):
            options = {k: f"option {k.lower()} {rng.randrange(10**6)} of question {i}" for k in "ABCD"}
            letter = rng.choice("ABCD")
            f.write(json.dumps({"question": f"A {20 + i % 60}-year-old presents with finding {i}. What next?",
                                "answer": options[letter], "options": options, "meta_info": "step1",
                                "answer_idx": letter, "metamap_phrases": []}) + "\n")
            said = rng.choice("ABCD")
            other = next(k for k in "ABCD" if k != said)
            text = rng.choice(FORMS).format(L=said, T=options[said], O=other)
            g.write(json.dumps({"question_id": i, "text": text}) + "\n")
    return root, preds


def generation_pass(n: int, nproc: int) -> int:
    import os

    from vlm.models.tiny import save_tiny_llm

    with tempfile.TemporaryDirectory() as tmp:
        root, _ = write_release(Path(tmp) / "medqa", n)
        llm = save_tiny_llm(Path(tmp) / "llm", "qwen2", dtype="float32")
        out = Path(tmp) / "answers.jsonl"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
               "eval.vqa", "generate", "--checkpoint", str(llm), "--llm-only", "--llm", str(llm), "--benchmark",
               "medqa", "--data-root", str(root), "--out", str(out), "--batch-size", "64", "--max-new-tokens", "4"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)), "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        lines = out.read_text().splitlines()
        assert [json.loads(x)["question_id"] for x in lines] == list(range(n)), "answers missing or out of order"
        subprocess.run([sys.executable, "-m", "eval.vqa", "score", "--benchmark", "medqa", "--data-root", str(root),
                        "--predictions", str(out), "--out", str(Path(tmp) / "r.json")], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
    print(f"generation pass, {n} questions on {nproc} ranks (tiny LLM, batch 64): {wall:.1f} s, "
          f"{n / wall:.0f} questions/s; merged in question order and scored")
    print(json.dumps({"bench": "choice_generation_pass", "ours": round(n / wall, 1), "peer": None, "ratio": None,
                      "questions": n, "ranks": nproc, "wall_s": round(wall, 1)}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=100_000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="instead: time the generation pass over N questions (sharded over --nproc ranks)")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    if args.generate:
        return generation_pass(args.generate, args.nproc)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root, preds = write_release(Path(tmp) / "medqa", args.questions)
        print(f"[bench] wrote {args.questions} questions and predictions in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
        out = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "eval.vqa", "score", "--benchmark", "medqa", "--data-root", str(root),
                        "--predictions", str(preds), "--out", str(out), "--bootstrap", str(args.bootstrap)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        r = json.loads(out.read_text())
        assert r["num_questions"] == args.questions
        # MMMU's parsing on the same outputs (in-process: the compat block's cost per question)
        from eval.benchmarks import CHOICE_BENCHMARKS
        from vlm.choice_metrics import mmmu_parse_choice

        items = CHOICE_BENCHMARKS["medqa"](root).load()
        texts = [json.loads(x)["text"] for x in preds.read_text().splitlines()]
        t0 = time.perf_counter()
        for it, t in zip(items, texts):
            mmmu_parse_choice(t, it.options, seed=it.qid)
        compat = time.perf_counter() - t0
    print(f"eval.vqa score, {args.questions} questions: {wall:.2f} s wall for the command "
          f"({r['seconds']:.2f} s inside score: load, score, bootstrap {args.bootstrap}, write); "
          f"accuracy {r['accuracy']:.3f}, answered {r['answered_rate']:.3f}")
    print(f"MMMU compat parsing alone: {compat:.2f} s ({args.questions / compat:,.0f} questions/s)")
    print(json.dumps({"bench": "choice_scoring", "ours": round(args.questions / wall, 1), "peer": None, "ratio": None,
                      "questions": args.questions, "wall_s": round(wall, 2), "score_s": r["seconds"],
                      "mmmu_compat_s": round(compat, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
