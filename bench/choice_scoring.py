"""Multiple-choice scoring throughput: `eval.vqa score` over a 100,000-question benchmark in MedQA's release format
(written to a temporary folder), with predictions in every form the scorer reads (letters, option texts, "The answer
is X", <think>/<answer> blocks, ramblings it refuses), and MMMU's compat parsing on the same outputs.

    python bench/choice_scoring.py [--questions 100000] [--bootstrap 1000]

Reports wall seconds for the whole command as a user runs it (a fresh `python -m eval.vqa score` process: imports,
reading and checking the release, reading the predictions, scoring, the bootstrap interval, writing the JSON, the
per-question CSV and the markdown), the scoring step alone, and questions per second. There is no peer to run
beside it: MMMU's eval_utils, MedEvalKit and VLMEvalKit are not installable packages (they run from their
repositories), so "peer" is null. Last line: {"bench": "choice_scoring", "ours": questions/s, "peer": null, ...}
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=100_000)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
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
