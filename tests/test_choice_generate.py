"""Generation for multiple-choice and text QA: several images per question, none (text QA), the base LLM alone
(--llm-only, the forgetting check), through eval.vqa generate on the assembly and on a stock VLM."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FIXTURES
from eval.vqa import main as vqa_main


@pytest.fixture(scope="module")
def assembly():
    from test_chat import CHATML, make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.models.clip import MedCLIP
    from vlm.models.vlm import build_llava, openclip_vit_to_hf

    tok = make_tokenizer(CHATML)
    torch.manual_seed(0)
    clip = MedCLIP("tiny-vit-text").eval()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048))
    model = build_llava(openclip_vit_to_hf(clip.clip.visual), llm, image_token_id=tok.convert_tokens_to_ids("<image>"))
    image = {"size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "image_token": "<image>"}
    return model.eval(), tok, image


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_prompts_hold_one_image_block_per_image_and_none_for_text(assembly):
    from vlm.generate import prompt_ids

    model, tok, _ = assembly
    n, image_id = model.config.image_seq_length, tok.convert_tokens_to_ids("<image>")
    assert prompt_ids(tok, "q", "<image>", n, 2).count(image_id) == 2 * n
    assert prompt_ids(tok, "q", "<image>", n, 0).count(image_id) == 0
    assert prompt_ids(tok, "q", "<image>", n).count(image_id) == n  # the default: one image, as before


def test_mixed_items_batched_equal_one_at_a_time(assembly, tmp_path):
    """Items with two images, one image and none in the same chunk: the file holds, for each, what answering it
    alone gives; the second image of a question changes what the model sees."""
    from eval.generate import answer_file

    model, tok, image = assembly
    items = [("two", "Compare the images.", [_png(1), _png(2)]), ("text", "What is the dose of aspirin?", None),
             ("one", "What modality is this?", _png(3)), ("two_b", "Compare the images.", [_png(1), _png(4)])]
    answer_file(model, tok, image, items, tmp_path / "all.jsonl", "question_id", batch_size=4, max_new_tokens=6)
    together = {r["question_id"]: r["text"] for r in map(json.loads, (tmp_path / "all.jsonl").read_text().splitlines())}
    assert list(together) == [i for i, _, _ in items]
    for it in items:
        out = tmp_path / f"{it[0]}.jsonl"
        answer_file(model, tok, image, [it], out, "question_id", batch_size=1, max_new_tokens=6)
        assert json.loads(out.read_text())["text"] == together[it[0]], it[0]
    # the second image reaches the model: the next-token logits differ between "two" and "two_b"
    with torch.no_grad():
        from vlm.data.transforms import ImageConfig, MedicalImageTransform
        from vlm.generate import prompt_ids

        t = MedicalImageTransform(ImageConfig(size=64, mean=image["mean"], std=image["std"]))
        ids = torch.tensor([prompt_ids(tok, "Compare the images.", "<image>", model.config.image_seq_length, 2)])
        logits = [model(input_ids=ids, pixel_values=torch.stack([t.from_bytes(_png(1)), t.from_bytes(_png(k))])).logits[0, -1]
                  for k in (2, 4)]
    assert not torch.allclose(logits[0], logits[1])


def test_a_language_model_alone_refuses_image_questions(assembly, tmp_path):
    from eval.generate import answer_file

    model, tok, _ = assembly
    with pytest.raises(ValueError, match="--llm-only"):
        answer_file(model.model.language_model, tok, {"text_only": True}, [("x", "q", _png(0))], tmp_path / "o.jsonl",
                    "question_id")


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    from vlm.models.tiny_vlm import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", "qwen2_5_vl", dtype="bfloat16")


def _gen(*args):
    return vqa_main(["generate", *map(str, args), "--batch-size", "4", "--max-new-tokens", "4"])


def test_stock_vlm_answers_multi_image_and_text_benchmarks(stock, tmp_path):
    for name in ("mmmu_med", "medxpertqa_mm", "pubmedqa"):
        out = tmp_path / f"{name}.jsonl"
        assert _gen("--checkpoint", stock, "--benchmark", name, "--data-root", FIXTURES / name, "--out", out) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        from eval.benchmarks import CHOICE_BENCHMARKS

        assert [r["question_id"] for r in rows] == [it.qid for it in CHOICE_BENCHMARKS[name](FIXTURES / name).load()]
        assert all(isinstance(r["text"], str) for r in rows)
        assert vqa_main(["score", "--benchmark", name, "--data-root", str(FIXTURES / name), "--predictions", str(out),
                         "--out", str(tmp_path / f"{name}.json"), "--bootstrap", "0"]) == 0


def test_llm_only_is_the_forgetting_check(stock, tmp_path, capsys):
    """--llm-only answers a text benchmark with the base LLM: named with --llm, or recorded in the run's config
    (model.llm); an image benchmark, or a run whose LLM was built from a config, is refused with the reason."""
    from vlm.models.tiny import save_tiny_llm

    llm = save_tiny_llm(tmp_path / "base_llm", "qwen2")
    root = tmp_path / "medqa"
    shutil.copytree(FIXTURES / "medqa", root)
    out = tmp_path / "base.jsonl"
    assert _gen("--checkpoint", "unused", "--llm-only", "--llm", llm, "--benchmark", "medqa", "--data-root", root,
                "--out", out) == 0
    by_flag = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(by_flag) == 8 and all(isinstance(r["text"], str) for r in by_flag)
    # the run records its base LLM (a train.instruct checkpoint's state.json): the same answers without --llm
    ckpt = tmp_path / "run/checkpoints/step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"config": {"chat": {}, "model": {"llm": str(llm)}}}))
    out2 = tmp_path / "recorded.jsonl"
    assert _gen("--checkpoint", ckpt, "--llm-only", "--benchmark", "medqa", "--data-root", root,
                "--out", out2) == 0
    assert [json.loads(x) for x in out2.read_text().splitlines()] == by_flag
    capsys.readouterr()
    assert _gen("--checkpoint", "unused", "--llm-only", "--llm", llm, "--benchmark", "mmmu_med",
                "--data-root", FIXTURES / "mmmu_med", "--out", tmp_path / "x.jsonl") == 2
    assert "--llm-only answers text benchmarks" in capsys.readouterr().err
    (ckpt / "state.json").write_text(json.dumps({"config": {"chat": {}, "model": {"llm": None,
                                                                                   "llm_config": {"model_type": "qwen2"}}}}))
    assert _gen("--checkpoint", ckpt, "--llm-only", "--benchmark", "medqa", "--data-root", root,
                "--out", tmp_path / "y.jsonl") == 2
    assert "no base LLM to compare with; name one with --llm" in capsys.readouterr().err
    # --llm may name a stock VLM (asked without images); --llm alone is a usage error, not silently ignored
    assert _gen("--checkpoint", "unused", "--llm-only", "--llm", stock, "--benchmark", "medqa", "--data-root", root,
                "--out", tmp_path / "vlm_text.jsonl") == 0
    assert len((tmp_path / "vlm_text.jsonl").read_text().splitlines()) == 8
    assert _gen("--checkpoint", stock, "--llm", llm, "--benchmark", "medqa", "--data-root", root,
                "--out", tmp_path / "z.jsonl") == 2
    assert "add --llm-only" in capsys.readouterr().err



def test_two_processes_write_what_one_writes_and_resume(stock, tmp_path):
    """Several-image questions sharded over 2 ranks: the merged file equals one process's, in question order; a
    run stopped half way (half the answers kept) resumes to the same file."""
    import os

    from conftest import REPO, torchrun

    one = tmp_path / "one.jsonl"
    assert _gen("--checkpoint", stock, "--benchmark", "mmmu_med", "--data-root", FIXTURES / "mmmu_med", "--out", one) == 0
    two = tmp_path / "two.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["-m", "eval.vqa", "generate", "--checkpoint", str(stock), "--benchmark", "mmmu_med", "--data-root",
            str(FIXTURES / "mmmu_med"), "--out", str(two), "--batch-size", "2", "--max-new-tokens", "4"]
    r = torchrun(2, args, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert two.read_text() == one.read_text()
    lines = two.read_text().splitlines()
    two.write_text("\n".join(lines[:len(lines) // 2]) + "\n")
    r = torchrun(2, args, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert two.read_text() == one.read_text()


def test_suite_llm_only_answers_the_text_benchmarks_with_the_base_llm(tmp_path):
    """eval.suite llm_only=true: the text benchmarks answered by the base LLM (here named with llm=), the image
    ones skipped and said so; eval.compare sets the run beside the assistant's on what both answered."""
    import yaml

    from eval.compare import compare
    from eval.suite import main as suite_main
    from vlm.models.tiny import save_tiny_llm

    llm = save_tiny_llm(tmp_path / "base_llm", "llama3")
    benches = [{"name": n, "data_root": str(FIXTURES / n)} for n in ("pubmedqa", "mmmu_med", "mmlu_med")]
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint": "unused", "out": str(tmp_path / "base"), "benchmarks": benches,
                                   "batch_size": 4, "vqa_max_new_tokens": 3, "bootstrap": 50}))
    assert suite_main(["--config", str(cfg), "llm_only=true", f"llm={llm}"]) == 0
    s = json.loads((tmp_path / "base/summary.json").read_text())
    assert sorted(s["benchmarks"]) == ["mmlu_med", "pubmedqa"] and s["llm_only"] == str(llm)
    assert len((tmp_path / "base/pubmedqa_predictions.jsonl").read_text().splitlines()) == 5
    assert suite_main(["--config", str(cfg), f"llm={llm}"]) == 2  # llm without llm_only: a usage error
    # the "assistant" run: given predictions (all right) for the same benchmarks
    from eval.benchmarks import CHOICE_BENCHMARKS

    tuned = []
    for n in ("pubmedqa", "mmlu_med"):
        preds = tmp_path / f"{n}.jsonl"
        preds.write_text("".join(json.dumps({"question_id": it.qid, "text": it.answer}) + "\n"
                                 for it in CHOICE_BENCHMARKS[n](FIXTURES / n).load()))
        tuned.append({"name": n, "data_root": str(FIXTURES / n), "predictions": str(preds)})
    cfg.write_text(yaml.safe_dump({"out": str(tmp_path / "tuned"), "benchmarks": tuned, "bootstrap": 50}))
    assert suite_main(["--config", str(cfg)]) == 0
    r = compare(tmp_path / "base", tmp_path / "tuned", n=50)
    assert sorted(r["benchmarks"]) == ["mmlu_med", "pubmedqa"] and r["benchmarks"]["pubmedqa"]["accuracy"]["b"] == 1.0


def test_suite_refuses_to_serve_one_models_answers_to_another(tmp_path, capsys):
    """OUT holds one model's answers (OUT/answers_by.json): an llm_only run, or another checkpoint, in the same OUT is
    refused instead of resuming from them; unknown names and an llm_only run with nothing to ask are errors."""
    import yaml

    from eval.suite import main as suite_main
    from vlm.models.tiny import save_tiny_llm

    a, b = save_tiny_llm(tmp_path / "a", "llama3"), save_tiny_llm(tmp_path / "b", "llama3", seed=1)
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint": "unused", "out": str(tmp_path / "out"), "batch_size": 4,
                                   "vqa_max_new_tokens": 2, "bootstrap": 0,
                                   "benchmarks": [{"name": "pubmedqa", "data_root": str(FIXTURES / "pubmedqa")}]}))
    assert suite_main(["--config", str(cfg), "llm_only=true", f"llm={a}"]) == 0
    assert "the base LLM" in (tmp_path / "out/summary.md").read_text().splitlines()[0]
    assert suite_main(["--config", str(cfg), "llm_only=true", f"llm={a}"]) == 0  # the same model resumes
    capsys.readouterr()
    assert suite_main(["--config", str(cfg), "llm_only=true", f"llm={b}"]) == 2
    assert "would reuse them: give it its own out= folder" in capsys.readouterr().err
    assert suite_main(["--config", str(cfg), "llm_only=true", f"llm={a}", "benchmarks.0.name=pubmedqa_typo"]) == 2
    assert "unknown name 'pubmedqa_typo'" in capsys.readouterr().err
    assert suite_main(["--config", str(cfg), "llm_only=true", "checkpoint=null", f"out={tmp_path / 'o2'}"]) == 2
    assert "llm_only=true needs checkpoint=" in capsys.readouterr().err
