"""Preference losses (vlm/preference.py): hand-computed cases, and parity with TRL (the peer, a test
dependency) on the same tiny model and batch: DPO and IPO through TRL's DPOTrainer loss, SimPO and cDPO
through TRL's CPO loss, ORPO through TRL's ORPO loss."""
from __future__ import annotations

import math
import tempfile
import types
import warnings

import pytest
import torch

from vlm.preference import PreferenceLossConfig, preference_loss, token_logps

PI_W, PI_L, REF_W, REF_L, N_W, N_L = -2.0, -3.3, -2.5, -2.6, 2, 3


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def _ls(x):  # log sigmoid
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "simpo", "orpo"])
def test_hand_computed(loss):
    beta, eps, gamma = 0.1, 0.2 if loss == "cdpo" else 0.0, 0.5
    cfg = PreferenceLossConfig(loss=loss, beta=beta, label_smoothing=eps, gamma=gamma)
    delta = (PI_W - REF_W) - (PI_L - REF_L)  # 0.5 - (-0.7) = 1.2
    if loss == "dpo":
        want = -_ls(beta * delta)
    elif loss == "cdpo":
        want = -(1 - eps) * _ls(beta * delta) - eps * _ls(-beta * delta)
    elif loss == "ipo":
        want = ((PI_W - REF_W) / N_W - (PI_L - REF_L) / N_L - 1 / (2 * beta)) ** 2
    elif loss == "simpo":
        want = -_ls(beta * (PI_W / N_W - PI_L / N_L) - gamma)
    else:
        aw, al = PI_W / N_W, PI_L / N_L  # -1, -1.1
        odds = (aw - al) - (math.log(1 - math.exp(aw)) - math.log(1 - math.exp(al)))
        want = 1.7 / N_W - beta * _ls(odds)  # NLL 1.7 summed over the 2 chosen tokens
    got, metrics = preference_loss(cfg, _t(PI_W), _t(PI_L), _t(N_W), _t(N_L), _t(REF_W), _t(REF_L), nll_w=_t(1.7))
    assert got.item() == pytest.approx(want, rel=1e-12), loss
    assert metrics["rewards/accuracy"].item() == 1.0


def test_config_is_validated():
    with pytest.raises(ValueError, match="loss must be one of"):
        PreferenceLossConfig(loss="kto")
    with pytest.raises(ValueError, match="cdpo needs label_smoothing"):
        PreferenceLossConfig(loss="cdpo")
    with pytest.raises(ValueError, match="label_smoothing applies to cdpo and simpo, not dpo"):
        PreferenceLossConfig(loss="dpo", label_smoothing=0.2)
    with pytest.raises(ValueError, match="does not apply to orpo"):
        PreferenceLossConfig(loss="orpo", gamma=1.0)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss(PreferenceLossConfig(), _t(1), _t(1), _t(1), _t(1))


def test_token_logps_masks_and_shifts():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 2, -100, 4]])
    lp = token_logps(logits, labels)
    ref = torch.log_softmax(logits, -1)
    assert lp.shape == (1, 3)
    assert lp[0, 0] == pytest.approx(float(ref[0, 0, 2])) and lp[0, 1] == 0 and lp[0, 2] == pytest.approx(float(ref[0, 2, 4]))


# -- parity with TRL --------------------------------------------------------------------------------------------

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tiny_llm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.models.tiny import train_tokenizer

    tok = train_tokenizer("qwen2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


PAIRS = [{"prompt": "Is there a nodule in the right upper lung?", "chosen": "Yes, a small nodule.", "rejected": "No"},
         {"prompt": "What imaging modality is this?", "chosen": "CT", "rejected": "A chest x-ray of the left side."},
         {"prompt": "Describe the findings.", "chosen": "The lungs are clear.", "rejected": "A mass."}]


def _ours(policy, ref, batch, cfg):
    """Our loss on TRL's batch: rows [chosen..., rejected...], labels = completion tokens."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    lp = token_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
    n = (labels[:, 1:] != -100).sum(1)
    pi_w, pi_l = lp.sum(1).chunk(2)
    n_w, n_l = n.chunk(2)
    ref_w = ref_l = None
    if cfg.needs_reference:
        with torch.no_grad():
            rl = token_logps(ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
        ref_w, ref_l = rl.sum(1).chunk(2)
    losses, _ = preference_loss(cfg, pi_w, pi_l, n_w, n_l, ref_w, ref_l, nll_w=-pi_w)
    return losses.mean()


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer(tiny_llm, loss):
    """TRL's DPOTrainer computes its loss (and we take its gradients) on its own collated batch with a policy
    that has moved away from the reference; ours on the same batch, policy and reference (TRL's own reference
    model): equal to 1e-5."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    folder, tok = tiny_llm
    warnings.filterwarnings("ignore")
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=3, report_to=[], beta=0.2,
                     loss_type=["sigmoid" if loss == "dpo" else "ipo"], use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=folder, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tok)
    policy = trainer.model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the policy moves; the reference (TRL's own copy from the folder) does not
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = next(iter(trainer.get_train_dataloader()))
    policy.zero_grad()
    theirs = trainer._compute_loss(policy, batch, False)
    theirs.backward()
    g_theirs = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    mine = _ours(policy, trainer.ref_model, batch, PreferenceLossConfig(loss=loss, beta=0.2))
    mine.backward()
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert abs(mine.item() - math.log(2)) > 1e-3  # the policy differs from the reference: not the trivial value
    for n, p in policy.named_parameters():
        assert torch.allclose(p.grad, g_theirs[n], rtol=1e-4, atol=1e-6), n


def _trl_self(**kw):
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu")), **kw)


def test_simpo_and_cdpo_equal_trl_cpo_loss():
    """TRL's CPO loss on precomputed log-probabilities: SimPO (average log-probs, gamma) and the conservative
    sigmoid loss with label smoothing, which on the reference log-ratios is cDPO."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(0)
    pi_w, pi_l = -torch.rand(5, generator=g) * 20, -torch.rand(5, generator=g) * 20
    ref_w, ref_l = -torch.rand(5, generator=g) * 20, -torch.rand(5, generator=g) * 20
    n_w, n_l = torch.randint(1, 30, (5,), generator=g), torch.randint(1, 30, (5,), generator=g)
    for leaf in (pi_w, pi_l):
        leaf.requires_grad_(True)
    ours, _ = preference_loss(PreferenceLossConfig(loss="simpo", beta=2.0, gamma=0.7), pi_w, pi_l, n_w, n_l)
    theirs, _, _ = CPOTrainer.cpo_loss(_trl_self(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=0.7,
                                                 label_smoothing=0.0), pi_w / n_w, pi_l / n_l)
    assert torch.allclose(ours, theirs, rtol=1e-6)
    ga = torch.autograd.grad(ours.sum(), [pi_w, pi_l])
    gb = torch.autograd.grad(theirs.sum(), [pi_w, pi_l])
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(ga, gb))
    ours, _ = preference_loss(PreferenceLossConfig(loss="cdpo", beta=0.3, label_smoothing=0.15), pi_w, pi_l, n_w, n_l,
                              ref_w, ref_l)
    theirs, _, _ = CPOTrainer.cpo_loss(_trl_self(alpha=0.0, loss_type="sigmoid", beta=0.3, simpo_gamma=0.0,
                                                 label_smoothing=0.15), pi_w - ref_w, pi_l - ref_l)
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_orpo_equals_trl_odds_ratio_loss():
    """TRL's ORPO: loss = NLL(chosen) - mean(beta * log sigmoid(log odds)) on average log-probabilities."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(1)
    n_w, n_l = torch.randint(1, 30, (4,), generator=g), torch.randint(1, 30, (4,), generator=g)
    pi_w = (-torch.rand(4, generator=g) * 3 * n_w).requires_grad_(True)
    pi_l = (-torch.rand(4, generator=g) * 3 * n_l).requires_grad_(True)
    nll = -pi_w  # the chosen tokens' NLL summed per pair
    ours, _ = preference_loss(PreferenceLossConfig(loss="orpo", beta=0.25), pi_w, pi_l, n_w, n_l, nll_w=nll)
    ratio_losses, *_ = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.25), pi_w / n_w, pi_l / n_l)
    theirs = nll.sum() / n_w.sum() - ratio_losses.mean()
    assert torch.allclose(ours.mean(), theirs, rtol=1e-6)
    ga = torch.autograd.grad(ours.mean(), [pi_w, pi_l])
    gb = torch.autograd.grad(theirs, [pi_w, pi_l])
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(ga, gb))


# -- train.preference ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pref_assets(tmp_path_factory):
    """A tiny stock Qwen2-VL folder, a tiny LLaVA assembly's parts (open_clip vision export, ChatML tokenizer),
    and preference shards (16 pairs: the chosen answer names the right side, the rejected one the wrong side
    and a prior-exam phrase)."""
    import json

    from PIL import Image

    from data_prep.shards import main as shards_main
    from vlm.models.tiny import train_tokenizer
    from vlm.models.tiny_vlm import save_tiny_vlm

    root = tmp_path_factory.mktemp("pref")
    recs = []
    for i in range(16):
        Image.new("RGB", (32, 32), (i * 15 % 255, 90, 40)).save(root / f"img{i}.png")
        right, wrong = ("right", "left") if i % 2 else ("left", "right")
        recs.append({"id": f"p{i}", "image": f"img{i}.png", "prompt": "Where is the nodule?",
                     "chosen": f"In the {right} upper lung.",
                     "rejected": f"In the {wrong} lower lung, unchanged since the prior exam."})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    sft = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": "<image>\n" + r["prompt"]}, {"from": "gpt", "value": r["chosen"]}]} for r in recs]
    (root / "sft.json").write_text(json.dumps(sft))
    assert shards_main(["--format", "llava", "--input", str(root / "sft.json"), "--out", str(root / "sft_shards"),
                        "--workers", "0", "--quiet"]) == 0
    assert shards_main(["--format", "preference", "--input", str(root / "pairs.jsonl"), "--out",
                        str(root / "shards"), "--workers", "0", "--quiet"]) == 0
    save_tiny_vlm(root / "qwen", "qwen2_vl")
    from conftest import save_tiny_vision

    save_tiny_vision(root / "vision")
    train_tokenizer("qwen2").save_pretrained(root / "tok")
    return root


def _pref_config(root, out, model: dict, loss: str = "dpo", steps: int = 6, lr: float = 5e-3, **extra) -> str:
    import yaml

    cfg = {"model": model, "chat": {"max_length": 256},
           "data": {"sources": [{"path": str(root / "shards")}], "batch_size": 4, "num_workers": 0,
                    "image": {"size": 32}},
           "preference": {"loss": loss, "beta": 0.5, **({"label_smoothing": 0.1} if loss == "cdpo" else {})},
           "optim": {"lr": lr, "warmup_steps": 1},
           "train": {"output_dir": str(out), "steps": steps, "save_every": 3, "log_every": 1, "progress": False,
                     "tensorboard": False, **extra}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _metrics(run):
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


STOCK_LORA = lambda root: {"vlm": str(root / "qwen"), "freeze": ["vision"], "lora": {"r": 8, "alpha": 16}}  # noqa: E731


def test_dpo_with_lora_learns_the_preference_on_a_stock_vlm(pref_assets, tmp_path):
    """LoRA: the reference is the policy with adapters off (first step: loss log 2, margin 0), the margin and
    the implicit-reward accuracy rise, the adapters and projector move, the frozen LLM and vision do not."""
    from train.preference import main
    from vlm.checkpoint import model_weights

    run = tmp_path / "run"
    assert main(["--config", _pref_config(pref_assets, run, STOCK_LORA(pref_assets))]) == 0
    m = _metrics(run)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and m[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert m[-1]["loss"] < 0.3 and m[-1]["rewards/margins"] > 1.0 and m[-1]["rewards/accuracy"] == 1.0
    w3, w6 = model_weights(run / "checkpoints/step_00000003"), model_weights(run / "checkpoints/step_00000006")
    moved = {k for k in w3 if not torch.equal(w3[k], w6[k])}
    # only the adapters: the reference is this model with them off, so nothing else may move (the merger too)
    assert moved and all(".lora_" in k for k in moved), sorted(k for k in moved if ".lora_" not in k)[:5]


def test_lora_reference_is_the_same_model_with_adapters_off(pref_assets):
    """No second copy: the task holds no reference model; switching the adapters off gives the base model's
    logits exactly, and switching them back restores the tuned logits and the trainable flags."""
    from train.config import LLM_LORA_TARGET
    from vlm.models.lora import adapters_disabled
    from vlm.models.stock import load_stock_vlm, stock_from_config

    model, processor = stock_from_config({"vlm": str(pref_assets / "qwen"), "dtype": "float32", "freeze": ["vision"],
                                          "lora": {"r": 4, "alpha": 8, "target": LLM_LORA_TARGET}})
    base, _ = load_stock_vlm(pref_assets / "qwen", dtype="float32")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with adapters_disabled(model) as n:
            off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        want = base(input_ids=ids).logits
    assert n > 0 and torch.equal(off, want) and not torch.allclose(tuned, want) and torch.equal(again, tuned)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _assembly(root, **llm):
    return {"vision": str(root / "vision"), "tokenizer": str(root / "tok"), "stage": 2,
            "llm_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, **llm}}


@pytest.mark.parametrize("loss,precision", [("cdpo", "fp32"), ("simpo", "fp32"), ("orpo", "fp32"), ("ipo", "fp32"),
                                            ("dpo", "bf16"), ("dpo", "bf16-master")])
def test_every_loss_trains_the_llava_assembly_fully(pref_assets, tmp_path, loss, precision):
    """The LLaVA assembly at stage 2, full tuning: a frozen copy of the starting policy is the reference (DPO
    family) or none (SimPO, ORPO); the loss is finite and the margin grows over 4 steps. The first step
    compares identical models (dropout in the config is switched off; under bf16 the reference gets the
    policy's dtypes): loss log 2 exactly, margin 0."""
    from train.preference import main

    extra = {"fp32": {}, "bf16": {"precision": "bf16"}, "bf16-master": {"precision": "bf16", "master_dtype": "bf16"}}
    run = tmp_path / loss
    assert main(["--config", _pref_config(pref_assets, run, _assembly(pref_assets, attention_dropout=0.3), loss=loss,
                                          steps=4, lr=5e-4, **extra[precision])]) == 0
    m = _metrics(run)
    assert all(math.isfinite(x["loss"]) for x in m)
    assert m[-1]["rewards/margins"] > m[0]["rewards/margins"], [x["rewards/margins"] for x in m]
    if loss in ("dpo", "cdpo", "ipo"):
        first = {"dpo": math.log(2), "cdpo": math.log(2), "ipo": (1 / (2 * 0.5)) ** 2}[loss]
        assert m[0]["loss"] == pytest.approx(first, abs=1e-6) and m[0]["rewards/margins"] == 0.0


@pytest.mark.parametrize("lora", [False, True])
def test_preference_after_a_lora_sft_run(pref_assets, tmp_path, lora):
    """model.init_from a LoRA SFT run of the assembly: its adapters are put on, loaded and merged, then the
    preference run tunes fully or with fresh adapters (first step: policy = reference, loss log 2)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from train.preference import main

    sft = {"model": {**_assembly(pref_assets), "lora": {"r": 4, "alpha": 8}}, "chat": {"max_length": 256},
           "data": {"sources": [{"path": str(pref_assets / "sft_shards")}], "batch_size": 4, "num_workers": 0,
                    "require_text": False, "image": {"size": 32}},
           "optim": {"lr": 5e-3, "warmup_steps": 1},
           "train": {"output_dir": str(tmp_path / "sft"), "steps": 2, "progress": False, "tensorboard": False}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "train.instruct", "--config", str(tmp_path / "sft.yaml")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    model = {**_assembly(pref_assets), "init_from": str(tmp_path / "sft"), **({"lora": {"r": 4, "alpha": 8}} if lora else {})}
    run = tmp_path / "pref"
    assert main(["--config", _pref_config(pref_assets, run, model, steps=2, lr=5e-4)]) == 0
    assert _metrics(run)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_pair_that_does_not_fit_is_skipped_not_cut(pref_assets):
    """Truncating a pair could cut the response (the pair would compare an earlier answer of the prompt) or the
    part that makes it the rejected one: a pair longer than chat.max_length is skipped as too_long."""
    from PIL import Image

    from train.preference import PairSample
    from vlm.data.chat import ChatConfig
    from vlm.models.stock import load_processor

    processor = load_processor(pref_assets / "qwen")
    sample = {"key": "k", "image": Image.new("RGB", (32, 32)), "views": [], "meta": {
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A chest CT."},
                          {"from": "human", "value": "Where is the nodule?"}],
        "chosen": "In the right upper lung.", "rejected": "In the left lower lung, unchanged since the prior exam."}}
    full = PairSample(ChatConfig(max_length=4096), processor=processor)(sample)
    n = len(full["rejected"]["input_ids"])
    assert PairSample(ChatConfig(max_length=n - 1), processor=processor)(sample) == "too_long"
    ok = PairSample(ChatConfig(max_length=n), processor=processor)(sample)
    decoded = processor.tokenizer.decode([t for t in ok["rejected"]["labels"] if t != -100])
    assert decoded == "In the left lower lung, unchanged since the prior exam.<|im_end|>"


def test_kill_and_resume_is_bit_identical(pref_assets, tmp_path):
    """6 steps straight = a run SIGKILLed once its step-3 checkpoint is complete, resumed with train.resume=latest:
    the same final weights, bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from conftest import kill_after_checkpoint

    straight, split = tmp_path / "straight", tmp_path / "split"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "train.preference", "--config"]  # every run alike: same threads, same kernels
    r = subprocess.run([*run, _pref_config(pref_assets, straight, STOCK_LORA(pref_assets))], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = _pref_config(pref_assets, split, STOCK_LORA(pref_assets), resume="latest")
    kill_after_checkpoint([*run, cfg], env, split / "checkpoints" / "step_00000003")
    assert not (split / "checkpoints" / "step_00000006" / "COMPLETE").exists()
    r = subprocess.run([*run, cfg], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    a = load_file(straight / "checkpoints/step_00000006/model.safetensors")
    b = load_file(split / "checkpoints/step_00000006/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_two_process_ddp_step_matches_one_process(tmp_path, loss):
    """DPO with a LoRA reference, and ORPO (its NLL a mean over the step's chosen tokens), under DDP on 2 gloo
    processes, ranks holding 1 and 3 pairs: the same loss (the mean over every pair of the step) and the same
    weights after the step as one process."""
    from pathlib import Path

    from conftest import one_and_two_processes

    one, two = one_and_two_processes(Path(__file__).resolve().parent / "dist" / "preference_step.py", tmp_path, loss)
    assert set(one) == set(two)
    assert torch.allclose(one["loss"], two["loss"], atol=1e-6), (one["loss"], two["loss"])
    assert abs(float(one["loss"]) - math.log(2)) > 1e-3
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=1e-5), (k, (one[k] - two[k]).abs().max())


def test_packed_pairs_equal_padded_rows_and_encode_images_once(pref_assets, tmp_path):
    """The assembly's packed pairs (train/pair_packing.py): chosen and rejected of a pair in one row, attention
    kept per part, the pair's image encoded once: the same per-side log-probabilities and the same gradients
    as the padded rows [chosen..., rejected...], with half the vision-tower work."""
    from train.instruct import InstructCollate, build_assistant
    from train.pair_packing import PackedPairCollate, install_encode_once, packed_pair_logps
    from train.preference import PairCollate, PairSample, PreferenceRunConfig
    from vlm.config import load_config
    from vlm.preference import token_logps

    cfg = load_config(PreferenceRunConfig, _pref_config(pref_assets, tmp_path / "r", _assembly(pref_assets)))
    torch.manual_seed(0)
    model, tok = build_assistant(cfg)
    assert install_encode_once(model)
    sample = PairSample(cfg.chat, tok, int(model.config.image_seq_length))
    pairs = []
    for i, (c, r) in enumerate([("In the left upper lung.", "In the right lower lung, unchanged since the prior."),
                                ("No.", "Yes, there is a large mass in the right lower lung zone."),
                                ("A small effusion.", "None.")]):
        conv = [{"from": "human", "value": "<image>\nWhere is the nodule?" if i != 1 else "<image>\nIs it normal?"}]
        pairs.append(sample({"key": f"k{i}", "image": torch.randn(3, 32, 32), "views": [],
                             "meta": {"conversations": conv, "chosen": c, "rejected": r}}))
    seen = []
    model.model.vision_tower.register_forward_hook(lambda m, a, kw: seen.append(a[0].shape[0]) if a else None)
    padded = PairCollate(InstructCollate(False, 0, tok.pad_token_id or 0))(pairs)
    inputs = {k: padded[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    lp_pad = token_logps(model(**inputs, use_cache=False).logits, padded["labels"]).sum(1)
    lp_pad.sum().backward()
    g_pad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = PackedPairCollate(tok.pad_token_id or 0)(pairs)
    assert packed["input_ids"].shape[0] == 3 and packed["pixel_values"].shape[0] == 3
    lp_pack, n_pack = packed_pair_logps(model, packed, torch.device("cpu"))
    lp_pack.sum().backward()
    assert seen == [6, 3]  # 2 images per pair padded, 1 packed
    assert torch.allclose(lp_pack, lp_pad, atol=1e-5), (lp_pack, lp_pad)
    assert torch.equal(n_pack, (padded["labels"][:, 1:] != -100).sum(1))
    for n, p in model.named_parameters():
        if n in g_pad:
            assert torch.allclose(p.grad, g_pad[n], atol=1e-5, rtol=1e-4), n
    # outside encode_once the model is the stock one: every image placeholder gets its own image
    model.zero_grad()
    with torch.no_grad():
        again = token_logps(model(**inputs, use_cache=False).logits, padded["labels"]).sum(1)
    assert torch.allclose(again, lp_pad.detach(), atol=1e-6)
