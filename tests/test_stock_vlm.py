"""Stock Hugging Face VLMs (vlm/models/stock.py, vlm/data/stock_chat.py): every family loads through
AutoModelForImageTextToText + AutoProcessor from a folder, its parts are found, batched generation
equals stock transformers one prompt at a time, labels mask exactly the answers and the end of turn,
packed rows give the padded loss and gradients (3-D mRoPE and Gemma 3's image blocks included)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm.data.chat import IGNORE, ChatConfig, SkipExample
from vlm.models.tiny_vlm import FAMILIES, save_tiny_vlm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("vlms")
    return {f: save_tiny_vlm(base / f, f, dtype="bfloat16" if f in ("qwen2_5_vl", "gemma3") else "float32")
            for f in FAMILIES}


def _load(folder):
    from vlm.models.stock import load_stock_vlm

    model, processor = load_stock_vlm(folder, dtype="float32")
    return model.eval(), processor


IMAGES = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (40, 64), (10, 200, 90)),
          Image.new("RGB", (64, 64), (90, 90, 250))]
for _i, _im in enumerate(IMAGES):  # some texture, so that the images give different features
    for _x in range(0, _im.width, 7):
        _im.putpixel((_x, (_x * 3 + _i) % _im.height), (255, 255, 255))
QUESTIONS = ["What imaging modality is this?", "Is there a nodule in the right upper lung?", "Describe the findings."]


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_and_freezing(folders, family):
    from vlm.models.stock import PARTS, decoder_layers, freeze_parts, part_of, vlm_parts

    model, _ = _load(folders[family])
    parts = vlm_parts(model)
    kinds = {part_of(n, parts) for n, _ in model.named_parameters()}
    assert kinds == set(PARTS), (family, parts)
    if family.startswith("qwen"):  # the patch merger is the projector although it lives in model.visual
        assert part_of("model.visual.merger.mlp.0.weight", parts) == "projector"
        assert part_of("model.visual.blocks.0.attn.qkv.weight", parts) == "vision"
    counts = freeze_parts(model, ["vision"])
    assert counts["vision"] == 0 and counts["projector"] > 0 and counts["llm"] > 0
    frozen = {part_of(n, parts) for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision"}
    names = {c.__name__ for c in decoder_layers(model)}
    assert any("DecoderLayer" in n for n in names), names
    assert not any("Embedding" in n for n in names)
    with pytest.raises(ValueError, match="unknown part"):
        freeze_parts(model, ["vison"])


def _reference_answers(model, processor, max_new_tokens):
    """Stock transformers, one prompt at a time: the processor and model.generate, nothing of ours."""
    from eval.generate import stock_prompt
    from vlm.models.stock import stop_token_ids

    out = []
    for q, img in zip(QUESTIONS, IMAGES):
        inputs = processor(text=[stock_prompt(processor, q)], images=[[img]], add_special_tokens=False,
                           return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_token_ids(model, processor),
                                 pad_token_id=processor.tokenizer.pad_token_id)
        out.append(seq[0, inputs["input_ids"].shape[1]:].tolist())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_stock_one_at_a_time(folders, family):
    from eval.generate import generate_stock, stock_prompt

    model, processor = _load(folders[family])
    ref = _reference_answers(model, processor, 6)
    texts = [processor.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ref]
    prompts = [stock_prompt(processor, q) for q in QUESTIONS]
    batched = generate_stock(model, processor, prompts, [[im] for im in IMAGES], batch_size=3, max_new_tokens=6)
    assert batched == texts, family
    assert any(t for t in texts), "the reference answers are all empty: nothing was compared"


END_OF_TURN = {"qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "gemma3": "<end_of_turn>", "llava": "</s>",
               "llava_next": "</s>", "idefics3": "<end_of_utterance>"}
CONVS = [
    [{"role": "user", "content": "<image>\nWhat imaging modality is this?"}, {"role": "assistant", "content": "CT"}],
    [{"role": "user", "content": "<image>\nIs there a nodule?"},
     {"role": "assistant", "content": "Yes, in the right upper lung."},
     {"role": "user", "content": "Which side?"}, {"role": "assistant", "content": "Right"}],
    [{"role": "user", "content": "<image>\nDescribe the findings."}, {"role": "assistant", "content": "The lungs are clear."}],
]


def _runs(ids, labels):
    """The labelled tokens as contiguous runs (one per answer)."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_answers_and_the_end_of_turn(folders, family):
    from vlm.data.stock_chat import encode_stock

    model, processor = _load(folders[family])
    ex = encode_stock(CONVS[1], [IMAGES[1]], processor, ChatConfig())
    runs = [processor.tokenizer.decode(r, skip_special_tokens=False).strip() for r in _runs(ex["input_ids"], ex["labels"])]
    eot = END_OF_TURN[family]
    assert runs == [f"Yes, in the right upper lung.{eot}", f"Right{eot}"], (family, runs)
    # the processor's expansion is what the model expects: a forward pass accepts it
    batch = {k: torch.tensor([v]) for k, v in ex["tokens"].items()}
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ex["input_ids"]]), **batch, **ex["images"])
    assert out.logits.shape[1] == len(ex["input_ids"])
    assert sum(ex["expanded"]) > 0  # image tokens came from the processor, not from the text


def _loss(model, batch):
    from vlm.data.stock_chat import packed_block_masks, packed_positions

    inputs = {k: v for k, v in batch.items() if k not in ("keys", "labels", "seq_lens")}
    if "seq_lens" in batch:
        inputs["position_ids"] = packed_positions(model, batch)
        masks = packed_block_masks(model, batch)
        if masks is not None:
            inputs["attention_mask"] = masks
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def _grads(model, batch):
    model.zero_grad()
    loss = _loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded_loss_and_gradients(folders, family):
    from vlm.data.stock_chat import StockCollate, encode_stock

    model, processor = _load(folders[family])
    model.train()
    exs = [encode_stock(c, [im], processor, ChatConfig()) for c, im in zip(CONVS, IMAGES)]
    pad_id = processor.tokenizer.pad_token_id
    padded = StockCollate(False, 512, pad_id)(exs)
    packed = StockCollate(True, 512, pad_id)(exs)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 3
    l1, g1 = _grads(model, padded)
    l2, g2 = _grads(model, packed)
    assert torch.allclose(l1, l2, rtol=1e-5), (family, float(l1), float(l2))
    assert g1.keys() == g2.keys()
    from vlm.models.stock import part_of, vlm_parts

    parts = vlm_parts(model)  # (vision layers after the one the model reads, pooling heads: no gradient)
    assert {n for n, _ in model.named_parameters() if part_of(n, parts) != "vision"} <= g1.keys()
    for n in g1:
        err = float((g1[n] - g2[n]).abs().max())  # relative to the gradient's scale (Gemma 3's reach 1e4)
        assert err <= 1e-5 * float(g1[n].abs().max()) + 1e-6, (family, n, err)


def test_packing_needs_per_conversation_mrope_and_image_blocks(folders):
    """What the packed path computes is necessary: Qwen2-VL with plain restarting positions instead of its
    per-conversation 3-D positions, and Gemma 3 with transformers' own packed mask (from the positions)
    instead of its image-block masks, give other logits than ours, which equal the conversation's alone."""
    from vlm.data.stock_chat import StockCollate, encode_stock, packed_block_masks, packed_positions
    from vlm.models.stock import load_stock_vlm

    def logits(model, batch, positions, masks):
        inputs = {k: v for k, v in batch.items() if k not in ("keys", "labels", "seq_lens")}
        inputs["position_ids"] = positions
        if masks is not None:
            inputs["attention_mask"] = masks
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[0]

    for family in ("qwen2_vl", "gemma3"):
        model, processor = load_stock_vlm(folders[family], dtype="float32")
        model.eval()
        exs = [encode_stock(c, [im], processor, ChatConfig()) for c, im in zip(CONVS, IMAGES)]
        packed = StockCollate(True, 512, 0)(exs)
        pos = packed_positions(model, packed)
        right = logits(model, packed, pos, packed_block_masks(model, packed))
        wrong = logits(model, packed, pos[0], None) if family == "qwen2_vl" else logits(model, packed, pos, None)
        # the last conversation of the packed row (rows keep the stream's order) against it alone, unpacked
        assert packed["seq_lens"] == [[len(ex["input_ids"]) for ex in exs]]
        at, n = sum(packed["seq_lens"][0][:-1]), packed["seq_lens"][0][-1]
        alone = StockCollate(False, 512, 0)(exs[-1:])
        with torch.no_grad():
            want = model(**{k: v for k, v in alone.items() if k not in ("keys", "labels")}, use_cache=False).logits[0]
        assert (right[at:at + n] - want).abs().max() < 1e-4, family
        assert (wrong[at:at + n] - want).abs().max() > 1e-3, family


def test_truncation_never_cuts_an_image(folders):
    from vlm.data.stock_chat import encode_stock

    _, processor = _load(folders["qwen2_vl"])
    full = encode_stock(CONVS[1], [IMAGES[2]], processor, ChatConfig())
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pads = [i for i, t in enumerate(full["input_ids"]) if t == image_id]
    assert len(pads) == 4 and all(full["expanded"][i] for i in pads)
    for cut in (pads[0], pads[2]):  # before the image, or inside it: the image would lose tokens
        with pytest.raises(SkipExample, match="truncation_cuts_image"):
            encode_stock(CONVS[1], [IMAGES[2]], processor, ChatConfig(max_length=cut))
    with pytest.raises(SkipExample, match="too_long"):
        encode_stock(CONVS[1], [IMAGES[2]], processor, ChatConfig(max_length=pads[2], overlong="drop"))
    n = len(full["input_ids"]) - 3
    cut = encode_stock(CONVS[1], [IMAGES[2]], processor, ChatConfig(max_length=n))
    assert cut["input_ids"] == full["input_ids"][:n] and cut["labels"] == full["labels"][:n]


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tunes_on_a_repeated_packed_batch(folders, family):
    """Projector + LLM train (vision frozen, as the shipped configs), 4 AdamW steps on one packed batch:
    the loss falls, the frozen tower does not move, the trained parts do."""
    from vlm.data.stock_chat import StockCollate, encode_stock
    from vlm.models.stock import stock_from_config

    model, processor = stock_from_config({"vlm": str(folders[family]), "dtype": "float32", "freeze": ["vision"]})
    model.train()
    batch = StockCollate(True, 512, processor.tokenizer.pad_token_id)(
        [encode_stock(c, [im], processor, ChatConfig()) for c, im in zip(CONVS, IMAGES)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], (family, losses)
    from vlm.models.stock import part_of, vlm_parts

    parts = vlm_parts(model)
    moved = {part_of(n, parts) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved == {"projector", "llm"}, (family, moved)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_step_matches_one_process(tmp_path, parallel):
    """Qwen2-VL SFT with packed mRoPE rows under DDP / FSDP2 on 2 gloo processes, ranks holding different
    token counts: the same loss and the same weights after the step as one process with the whole batch."""
    from conftest import one_and_two_processes

    one, two = one_and_two_processes(ROOT / "tests" / "dist" / "stock_step.py", tmp_path, parallel)
    assert set(one) == set(two)
    assert torch.allclose(one["loss"], two["loss"], atol=1e-5), (one["loss"], two["loss"])
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), (k, (one[k] - two[k]).abs().max())


def test_train_instruct_then_eval_on_a_stock_vlm(folders, synth_dir, tmp_path):
    """train.instruct with model.vlm (LoRA, packed, bf16 checkpoint loaded as stored), then eval.vqa generate and
    score on the run, sharded over 2 torchrun ranks and merged in question order."""
    import yaml

    from conftest import torchrun
    from vlm.checkpoint import model_weights

    cfg = {"model": {"vlm": str(folders["qwen2_5_vl"]), "freeze": ["vision"], "lora": {"r": 8, "alpha": 16},
                     "processor": {"max_pixels": 56 * 56}},
           "chat": {"max_length": 512}, "packing": True, "pack_length": 1024,
           "data": {"sources": [{"path": str(synth_dir / "instruct")}], "batch_size": 4, "num_workers": 1},
           "optim": {"lr": 2e-3, "warmup_steps": 1},
           "train": {"output_dir": str(tmp_path / "run"), "steps": 6, "save_every": 3, "log_every": 1,
                     "progress": False, "tensorboard": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "train.instruct", "--config", str(tmp_path / "cfg.yaml")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable parameters by part {'vision': 0, 'projector':" in r.stderr
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    w3, w6 = (model_weights(tmp_path / "run" / "checkpoints" / f"step_0000000{s}") for s in (3, 6))
    moved = {k.split(".")[1] for k in w3 if not torch.equal(w3[k], w6[k])}
    assert any(".lora_" in k for k in w3 if not torch.equal(w3[k], w6[k]))
    assert not any(k.startswith("model.visual.blocks.") and not torch.equal(w3[k], w6[k]) for k in w3), moved
    assert (tmp_path / "run" / "processor" / "processor_config.json").is_file() or \
        (tmp_path / "run" / "processor" / "preprocessor_config.json").is_file()
    out = tmp_path / "answers.jsonl"
    r = torchrun(2, ["-m", "eval.vqa", "generate", "--checkpoint", str(tmp_path / "run"), "--benchmark", "slake",
                     "--data-root", str(synth_dir / "eval" / "slake"), "--out", str(out), "--batch-size", "4",
                     "--max-new-tokens", "4"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    questions = [q for q in json.loads((synth_dir / "eval/slake/test.json").read_text()) if q.get("q_lang", "en") == "en"]
    assert [a["question_id"] for a in answers] == [q["qid"] for q in questions]
    from eval.vqa import main as vqa_main

    assert vqa_main(["score", "--benchmark", "slake", "--data-root", str(synth_dir / "eval" / "slake"),
                     "--predictions", str(out), "--out", str(tmp_path / "score.json"), "--bootstrap", "0"]) == 0
    assert json.loads((tmp_path / "score.json").read_text())["num_missing"] == 0
    # the run exports as the stock class + processor, and eval.ask answers with stock transformers alone
    from eval.ask import main as ask_main
    from train.export import main as export_main

    assert export_main(["--checkpoint", str(tmp_path / "run"), "--to", "transformers", "--out",
                        str(tmp_path / "export"), "--adapter", str(tmp_path / "adapter")]) == 0
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folders["qwen2_5_vl"]) and adapter["r"] == 8
    assert adapter["modules_to_save"] == ["model.visual.merger"]
    cfg_out = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg_out["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    img = next((synth_dir / "eval" / "slake" / "imgs").rglob("source.jpg"))
    assert ask_main(["--model", str(tmp_path / "export"), "--image", str(img), "--question", "What modality?",
                     "--out", str(tmp_path / "ask.json")]) == 0
    assert json.loads((tmp_path / "ask.json").read_text())["kind"] == "transformers"


def _tuned(folder, seed: int, conv, image):
    """A stock VLM with LoRA on its LLM, the adapters and the projector moved off their start (seeded), one
    conversation's inputs and the tuned model's logits on them -> (model, processor, inputs, logits)."""
    from train.config import LLM_LORA_TARGET
    from vlm.data.stock_chat import encode_stock
    from vlm.models.stock import stock_from_config, vlm_parts

    model, processor = stock_from_config({"vlm": str(folder), "dtype": "float32", "freeze": ["vision"],
                                          "lora": {"r": 4, "alpha": 8, "target": LLM_LORA_TARGET}})
    g = torch.Generator().manual_seed(seed)
    proj = vlm_parts(model)["projector"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n or any(n.startswith(q) for q in proj):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    ex = encode_stock(conv, [image], processor, ChatConfig())
    inputs = {"input_ids": torch.tensor([ex["input_ids"]]), **{k: torch.tensor([v]) for k, v in ex["tokens"].items()},
              **ex["images"]}
    with torch.no_grad():
        return model, processor, inputs, model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_stock_transformers_with_identical_logits(folders, family, tmp_path):
    """LoRA-tuned (adapters moved off zero, projector changed) -> export_stock -> stock AutoModelForImageTextToText
    + AutoProcessor: the same logits as the tuned model with its adapters, in the family's own class."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm.models.stock import export_stock

    model, processor, inputs, tuned = _tuned(folders[family], 0, CONVS[1], IMAGES[0])
    out = export_stock(model, processor, tmp_path / "export")
    stock = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=False).eval()
    assert type(stock).__name__ == type(model).__name__
    assert not any(".lora_" in n for n in stock.state_dict())
    reloaded = AutoProcessor.from_pretrained(out, trust_remote_code=False)
    again = reloaded(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]}],
        tokenize=False)], images=[[IMAGES[0]]], add_special_tokens=False, return_tensors="pt")
    first = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]}],
        tokenize=False)], images=[[IMAGES[0]]], add_special_tokens=False, return_tensors="pt")
    assert all(torch.equal(first[k], again[k]) for k in first)  # the processor round-trips too
    with torch.no_grad():
        theirs = stock(**inputs).logits
    assert torch.allclose(tuned, theirs, atol=1e-4, rtol=1e-4), (family, float((tuned - theirs).abs().max()))
    base = AutoModelForImageTextToText.from_pretrained(folders[family], trust_remote_code=False, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, theirs, atol=1e-3)  # the tuning is in the export


def test_eval_takes_a_stock_folder_with_processor_settings(folders, synth_dir, tmp_path):
    """eval.vqa generate straight on a downloaded-style stock folder (bf16 on disk), Qwen2-VL's pixel budget
    set on the command line; a setting the image processor does not have is a one-line error (exit 2)."""
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "eval.vqa", "generate", "--checkpoint", str(folders["qwen2_5_vl"]), "--benchmark",
            "slake", "--data-root", str(synth_dir / "eval" / "slake"), "--batch-size", "8", "--max-new-tokens", "3"]
    r = subprocess.run([*base, "--out", str(tmp_path / "a.jsonl"), "--processor", "max_pixels=3136",
                        "--processor", "min_pixels=784"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    n = sum(1 for q in json.loads((synth_dir / "eval/slake/test.json").read_text()) if q.get("q_lang", "en") == "en")
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == n
    r = subprocess.run([*base, "--out", str(tmp_path / "b.jsonl"), "--processor", "max_pixel=3136"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "has no setting(s) ['max_pixel']" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "b.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "idefics3"])
def test_flash_attention_varlen_packing_equals_padded(folders, family):
    """On a GPU with flash-attn: packed rows through flash-attention's varlen kernels (the restarts of the
    text position ids) give the padded loss, mRoPE included (bf16 tolerance)."""
    pytest.importorskip("flash_attn")
    from vlm.data.stock_chat import StockCollate, encode_stock
    from vlm.models.stock import load_stock_vlm

    model, processor = load_stock_vlm(folders[family], dtype="bfloat16", attn_impl="flash_attention_2")
    model.cuda()
    exs = [encode_stock(c, [im], processor, ChatConfig()) for c, im in zip(CONVS, IMAGES)]
    padded = StockCollate(False, 512, processor.tokenizer.pad_token_id)(exs)
    packed = StockCollate(True, 512, processor.tokenizer.pad_token_id)(exs)
    on = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
    with torch.no_grad():
        a = _loss(model, {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in padded.items()})
        from vlm.data.stock_chat import packed_positions

        on["position_ids"] = packed_positions(model, packed).cuda()
        inputs = {k: v for k, v in on.items() if k not in ("keys", "labels", "seq_lens")}
        logits = model(**inputs, use_cache=False).logits
        b = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), on["labels"][:, 1:].reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    assert torch.allclose(a.float(), b.float(), rtol=2e-2), (family, float(a), float(b))


@pytest.mark.gpu
def test_qlora_on_a_stock_vlm_trains_adapters_only(folders):
    """QLoRA on a stock VLM: the LLM's linears in 4 bit, vision tower / projector / head unquantized; two steps
    move the adapters and the projector, nothing else."""
    pytest.importorskip("bitsandbytes")
    from train.config import LLM_LORA_TARGET
    from vlm.data.stock_chat import StockCollate, encode_stock
    from vlm.models.stock import part_of, stock_from_config, vlm_parts

    model, processor = stock_from_config({"vlm": str(folders["qwen2_vl"]), "dtype": "bfloat16", "freeze": ["vision"],
                                          "llm_quantize": "4bit",
                                          "lora": {"r": 4, "alpha": 8, "target": LLM_LORA_TARGET}})
    model.cuda().train()
    parts = vlm_parts(model)
    assert all(p.dtype != torch.uint8 for n, p in model.named_parameters() if part_of(n, parts) != "llm")
    assert any(p.dtype == torch.uint8 for n, p in model.named_parameters() if part_of(n, parts) == "llm")
    batch = StockCollate(True, 512, processor.tokenizer.pad_token_id)(
        [encode_stock(c, [im], processor, ChatConfig()) for c, im in zip(CONVS, IMAGES)])
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _loss(model, batch)
        loss.backward()
        opt.step()
    moved = {("adapter" if ".lora_" in n else part_of(n, parts)) for n, p in model.named_parameters()
             if not torch.equal(before[n], p)}
    assert moved == {"adapter", "projector"}, moved


def test_qlora_config_errors_are_clear(folders):
    from train.config import AssistantModelConfig, LLM_LORA_TARGET, LoraConfig
    from vlm.models.stock import stock_from_config

    with pytest.raises(ValueError, match="needs model.lora.r > 0"):
        AssistantModelConfig(vlm="Qwen/Qwen2.5-VL-7B-Instruct", llm_quantize="4bit")
    AssistantModelConfig(vlm="Qwen/Qwen2.5-VL-7B-Instruct", llm_quantize="4bit", lora=LoraConfig(r=8))
    with pytest.raises(ValueError, match="replaces model.vision"):
        AssistantModelConfig(vlm="Qwen/Qwen2.5-VL-7B-Instruct", vision="runs/clip")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs (bitsandbytes|a CUDA GPU)"):
            stock_from_config({"vlm": str(folders["qwen2_vl"]), "llm_quantize": "4bit",
                               "lora": {"r": 4, "alpha": 8, "target": LLM_LORA_TARGET}})


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_adapter_folder_loads_onto_the_stock_base_with_peft(folders, family, tmp_path):
    """export_adapter: PeftModel.from_pretrained(stock base, folder) gives the tuned model's logits (LoRA on the
    LLM, the projector as modules_to_save: Qwen2-VL's merger inside the vision module, Gemma 3's projector)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlm.models.stock import export_adapter

    model, processor, inputs, tuned = _tuned(folders[family], 1, CONVS[0], IMAGES[2])
    folder = export_adapter(model, str(folders[family]), tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"]
    base = AutoModelForImageTextToText.from_pretrained(folders[family], trust_remote_code=False, dtype=torch.float32)
    with torch.no_grad():
        untuned = base(**inputs).logits
        peft_model = PeftModel.from_pretrained(base, folder).eval()
        theirs = peft_model(**inputs).logits
    assert not torch.allclose(untuned, tuned, atol=1e-3)
    assert torch.allclose(tuned, theirs, atol=1e-4, rtol=1e-4), float((tuned - theirs).abs().max())


@pytest.mark.parametrize("impl", ["eager", "flash_attention_2"])
def test_gemma3_packing_with_other_attention_implementations(folders, impl):
    """eager adds its mask to the scores: the packed image-block masks are additive there (packed = padded);
    flash-attention's causal varlen kernels cannot express them: a clear error, not a wrong loss."""
    from vlm.data.stock_chat import StockCollate, encode_stock, packed_block_masks
    from vlm.models.stock import load_stock_vlm

    model, processor = load_stock_vlm(folders["gemma3"], dtype="float32", attn_impl="eager")
    exs = [encode_stock(c, [im], processor, ChatConfig()) for c, im in zip(CONVS, IMAGES)]
    packed = StockCollate(True, 512, 0)(exs)
    if impl == "flash_attention_2":
        model.config.get_text_config()._attn_implementation = impl
        with pytest.raises(ValueError, match="needs model.attn_impl sdpa or eager, not flash_attention_2"):
            packed_block_masks(model, packed)
        return
    with torch.no_grad():
        a, b = _loss(model, StockCollate(False, 512, 0)(exs)), _loss(model, packed)
    assert torch.allclose(a, b, rtol=1e-5), (float(a), float(b))


def test_an_image_the_processor_refuses_is_a_counted_skip(folders, tmp_path):
    """Qwen2-VL refuses aspect ratios beyond 200: one such image is a skip (image_rejected) in training, and in
    eval an error naming the question, never a crash of the whole run without a name."""
    from vlm.data.stock_chat import encode_stock

    _, processor = _load(folders["qwen2_vl"])
    with pytest.raises(SkipExample, match="image_rejected"):
        encode_stock(CONVS[0], [Image.new("RGB", (10, 3000))], processor, ChatConfig())
    from eval.generate import answer_file
    from vlm.models.stock import load_stock_vlm

    model, processor = load_stock_vlm(folders["qwen2_vl"], dtype="float32")
    (tmp_path / "tall.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (10, 3000)).save(tmp_path / "tall.png")
    IMAGES[0].save(tmp_path / "ok.png")
    items = [("q1", "What is shown?", str(tmp_path / "ok.png")), ("q2", "And here?", str(tmp_path / "tall.png"))]
    with pytest.raises(ValueError, match="question_id q2: the model's image processor refused its image"):
        answer_file(model, processor.tokenizer, {"processor": processor}, items, tmp_path / "a.jsonl", "question_id",
                    batch_size=2, max_new_tokens=2)


def test_a_mistyped_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from vlm.models.stock import is_stock_source, load_stock_vlm

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert not is_stock_source("runs/missing_run") and is_stock_source("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(ValueError, match="runs/missing_run: no such folder"):
        load_stock_vlm("runs/missing_run")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local folder, and the hub repo could not be read"):
        load_stock_vlm("nobody-here/no-such-vlm")


def test_eval_suite_on_a_stock_folder(folders, synth_dir, tmp_path):
    """eval.suite with a stock VLM folder as the checkpoint: VQA (SLAKE layout) and report generation (R2Gen
    layout) through the processor, scored; processor settings from the suite config."""
    import yaml

    from eval.suite import main as suite_main

    cfg = {"checkpoint": str(folders["idefics3"]), "out": str(tmp_path / "suite"), "batch_size": 8,
           "vqa_max_new_tokens": 3, "report_max_new_tokens": 6, "bootstrap": 0,
           "processor": {"size": {"longest_edge": 32}},
           "benchmarks": [{"name": "slake", "data_root": str(synth_dir / "eval" / "slake")},
                          {"name": "iu_xray", "annotation": str(synth_dir / "eval" / "iu_xray" / "annotation.json")}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(cfg))
    assert suite_main(["--config", str(tmp_path / "suite.yaml")]) == 0
    summary = json.loads((tmp_path / "suite" / "summary.json").read_text())
    text = json.dumps(summary)
    assert "slake" in text and "iu_xray" in text
    reports = (tmp_path / "suite" / "iu_xray_predictions.jsonl").read_text().splitlines()
    ann = json.loads((synth_dir / "eval" / "iu_xray" / "annotation.json").read_text())
    assert len(reports) == len(ann["test"])
