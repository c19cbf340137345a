"""GRPO in train.preference (objective: grpo, train/grpo.py): rewards on hand-written answers, one step on the
tiny LLaVA assembly (LoRA, full tuning, beta 0) and on a tiny stock Qwen2-VL, the step's loss against
vlm.grpo.grpo_loss recomputed by hand, a short run that learns an easy reward, a 2-process DDP step, and the
config's validation."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vlm.rewards import REWARDS, get_reward, register


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is faster than two spinning on a shared 2-core machine (a step
    that takes 1 s with two threads under load takes 0.05 s with one), and the runs are the same on any machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@register("starts_with_vowel")  # an easy reward for the learning test (also shows how a reward is added)
def starts_with_vowel(completion: str, answer: str, question: str) -> float:
    return float(completion[:1].lower() in "aeiou")


# -- rewards -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,completion,answer,question,want", [
    ("closed_accuracy", "<think>a round opacity</think><answer>Yes, there is.</answer>", "yes", "Is there one?", 1.0),
    ("closed_accuracy", "<think>yes, I see it</think><answer>no</answer>", "yes", "Is there a nodule?", 0.0),  # the
    ("closed_accuracy", "Yes.", "yes", "Is there a nodule?", 1.0),  # reasoning's "yes" does not count; plain answers do
    ("closed_accuracy", "normal", "no", "Is it abnormal?", 0.0),  # strict: "normal" is not "no"
    ("closed_accuracy", "<answer>the heart</answer>", "heart", "Which is larger, the heart or the lung?", 1.0),
    ("closed_accuracy", "<answer>heart or lung</answer>", "heart", "Which is larger, the heart or the lung?", 0.0),
    ("open_exact", "<think>x</think><answer>The right upper lung</answer>", "right upper lung", "Where?", 1.0),
    ("open_exact", "<answer>right lung</answer>", "right upper lung", "Where?", 0.0),
    ("open_recall", "<answer>right lung</answer>", "right upper lung", "Where?", 2 / 3),
    ("open_recall", "<think>right upper lung</think><answer>left</answer>", "right upper lung", "Where?", 0.0),
    ("vqa", "<answer>no</answer>", "No", "Is there an effusion?", 1.0),  # closed: the strict yes/no rule
    ("vqa", "<answer>no effusion, but yes a nodule</answer>", "yes", "Is there a nodule?", 0.0),
    ("vqa", "<answer>upper lung</answer>", "right upper lung", "Where?", 2 / 3),  # open: token recall
    ("format", "<think>a</think>\n<answer>yes</answer>", "no", "q", 1.0),  # format ignores correctness
    ("format", "<answer>yes</answer>", "yes", "q", 0.0),
    ("format", "<think>a</think><answer>yes</answer> more", "yes", "q", 0.0),
])
def test_rewards_on_hand_written_answers(name, completion, answer, question, want):
    assert get_reward(name)(completion, answer, question) == pytest.approx(want)


def test_reward_registry_is_extensible_and_strict():
    assert {"closed_accuracy", "open_exact", "open_recall", "vqa", "format"} <= set(REWARDS)
    assert get_reward("starts_with_vowel")("apple", "", "") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register("vqa")(lambda c, a, q: 0.0)
    with pytest.raises(ValueError, match="unknown reward 'nope'; registered rewards: .*vqa"):
        get_reward("nope")


# -- assets --------------------------------------------------------------------------------------------------------

QAS = [("Is there a nodule?", "{yn}"), ("Where is the nodule?", "the {side} upper lung")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Instruct shards (8 images, each a conversation of a closed and an open question), the tiny LLaVA
    assembly's parts (open_clip vision export at 32 px, ChatML tokenizer) and a tiny stock Qwen2-VL."""
    from PIL import Image

    from data_prep.shards import main as shards_main
    from vlm.models.tiny import train_tokenizer
    from vlm.models.tiny_vlm import save_tiny_vlm
    from conftest import save_tiny_vision

    root = tmp_path_factory.mktemp("grpo")
    recs = []
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30 % 255, 90, 40)).save(root / f"img{i}.png")
        fill = {"yn": "yes" if i % 2 else "no", "side": "right" if i % 3 else "left"}
        conv = []
        for k, (q, a) in enumerate(QAS):
            conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
                     {"from": "gpt", "value": a.format(**fill)}]
        recs.append({"id": f"s{i}", "image": f"img{i}.png", "conversations": conv})
    (root / "vqa.json").write_text(json.dumps(recs))
    assert shards_main(["--format", "llava", "--input", str(root / "vqa.json"), "--out", str(root / "shards"),
                        "--workers", "0", "--quiet"]) == 0
    save_tiny_vlm(root / "qwen", "qwen2_vl")
    save_tiny_vision(root / "vision")
    train_tokenizer("qwen2").save_pretrained(root / "tok")
    return root


def _assembly(root, lora: bool = True) -> dict:
    return {"vision": str(root / "vision"), "tokenizer": str(root / "tok"), "stage": 2,
            "llm_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2},
            **({"lora": {"r": 4, "alpha": 8}} if lora else {})}


def _config(root, out, model: dict, grpo: dict | None = None, steps: int = 2, lr: float = 1e-3, batch: int = 2,
            accum: int = 1, **extra):
    """A run config (objective: grpo) -> (its parsed PreferenceRunConfig, the YAML path)."""
    import yaml

    from train.preference import PreferenceRunConfig
    from vlm.config import load_config

    cfg = {"objective": "grpo", "model": model, "chat": {"max_length": 256},
           "data": {"sources": [{"path": str(root / "shards")}], "batch_size": batch, "num_workers": 0,
                    "image": {"size": 32}},
           "grpo": {"group_size": 4, "max_new_tokens": 6, "beta": 0.1, **(grpo or {})},
           "optim": {"lr": lr, "warmup_steps": 0, "grad_accum": accum, "schedule": "constant"},
           "train": {"output_dir": str(out), "steps": steps, "save_every": 1, "log_every": 1, "progress": False,
                     "tensorboard": False, **extra}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(PreferenceRunConfig, path), str(path)


def _build(cfg):
    from train.grpo import build_grpo_run
    from vlm.utils import seed_everything, torchrun_env

    d = torchrun_env()
    seed_everything(cfg.train.seed)
    model, kw = build_grpo_run(cfg, d)
    seed_everything(cfg.train.seed + d.rank)
    kw.pop("tokenizer")
    return model, kw, d


def _adapter_off_calls(model) -> list:
    """Record, per forward of one adapter layer, whether its adapters were switched off (the LoRA reference)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    calls: list = []
    layer.register_forward_pre_hook(lambda m, args: calls.append(bool(m.disable_adapters)))
    return calls


def _probe(model, kw):
    """A fixed input for comparing models: the first prompt of the stream with a made-up answer."""
    batch = next(iter(kw["loader"]))
    p = batch["prompts"][0]
    ids = torch.tensor([p["input_ids"] + [5, 6, 7]])
    return {"input_ids": ids, "pixel_values": p["pixel_values"][None]}


# -- one step, LoRA / full / beta 0 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lora,beta", [(True, 0.1), (False, 0.1), (True, 0.0)])
def test_one_step_on_the_assembly(assets, tmp_path, lora, beta):
    """G answers per prompt are sampled, the loss is finite; LoRA: only the adapters move and the policy with
    adapters off (the reference) is still the starting model; full tuning: the LLM moves and the reference is a
    frozen copy that does not; beta 0: no reference is built and none is run (LoRA: no forward with adapters
    off, so the projector may train as at stage 2)."""
    from train.trainer import Trainer
    from vlm.models.lora import adapters_disabled

    grpo = {"beta": beta, "rewards": {"vqa": 1.0, "starts_with_vowel": 1.0}}  # the second: answers differ in reward
    cfg, _ = _config(assets, tmp_path / "run", _assembly(assets, lora), grpo, steps=1, lr=1e-2)
    model, kw, d = _build(cfg)
    task = kw["task"]
    assert (task.reference is None) == (lora or beta == 0)
    off = _adapter_off_calls(model) if lora else []
    probe = _probe(model, kw)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_start = {n: p.detach().clone() for n, p in task.reference.named_parameters()} if task.reference else {}
    with torch.no_grad():
        base = model(**probe).logits
    result = Trainer(model, **kw).fit()
    assert math.isfinite(result["metrics"]["loss"]) and result["step"] == 1
    roll = task.last[0]
    assert len(roll["completions"]) == len(roll["prompts"]) * 4 == len(roll["texts"]) == len(roll["rewards"])
    assert all(1 <= len(c) <= 6 for c in roll["completions"])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert moved
    if lora and beta > 0:  # only the adapters train: the policy with them off must stay the starting policy
        assert all(".lora_" in n for n in moved), sorted(n for n in moved if ".lora_" not in n)[:5]
        with torch.no_grad(), adapters_disabled(model):
            assert torch.equal(model(**probe).logits, base)
        assert any(off)  # the reference forward ran (adapters off)
    elif lora:  # no reference: the projector trains beside the adapters (stage 2), and nothing runs adapters-off
        assert all(".lora_" in n or "multi_modal_projector" in n for n in moved)
        assert off and not any(off)
    else:
        assert any(n.startswith("model.language_model.") for n in moved)
        if task.reference is not None:
            assert all(torch.equal(p, ref_start[n]) for n, p in task.reference.named_parameters())
            assert not any(p.requires_grad for p in task.reference.parameters())
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {"loss", "reward", "reward/vqa", "reward_std", "frac_reward_zero_std", "completion_length", "clip_ratio"}
    assert keys <= set(m[-1]) and ("kl" in m[-1]) == (beta > 0)
    assert 1 <= m[-1]["completion_length"] <= 6 and 0 <= m[-1]["reward"] <= 1


# -- the step's loss = grpo_loss by hand -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,scale,temperature", [("grpo", "group", 1.0), ("bnpo", "batch", 1.0),
                                                       ("dr_grpo", "none", 1.0), ("grpo", "group", 0.7)])
def test_step_loss_equals_grpo_loss_by_hand(assets, tmp_path, loss_type, scale, temperature):
    """Two micro-batches through GRPOTask.train_step; then, on the same completions: rewards from the reward
    functions, advantages from group_advantages over all of them, token log-probs of the policy and of the
    reference (adapters off) in one padded batch, and vlm.grpo.grpo_loss over every answer at once. Equal
    loss and gradients: the micro-batch split changes nothing. The log-probabilities are those of the sampling
    distribution (logits / temperature), as TRL computes them."""
    from train.trainer import StepContext
    from vlm.grpo import group_advantages, grpo_loss
    from vlm.models.lora import adapters_disabled
    from vlm.preference import token_logps

    grpo = {"loss_type": loss_type, "scale_rewards": scale, "rewards": {"vqa": 1.0, "open_recall": 0.5},
            "beta": 0.2, "max_new_tokens": 5, "temperature": temperature}
    cfg, _ = _config(assets, tmp_path / "run", _assembly(assets), grpo, batch=1, accum=2)
    model, kw, d = _build(cfg)
    with torch.no_grad():  # adapters away from zero: the policy differs from its reference (KL > 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    task = kw["task"]
    it = iter(kw["loader"])
    batches = [next(it), next(it)]
    model.train()
    out = task.train_step(model, batches, StepContext(model, d, "fp32"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    prompts = [p for r in task.last for p in r["prompts"] for _ in range(4)]
    comps = [c for r in task.last for c in r["completions"]]
    tok = kw["loader"].dataset.sample_fn.tokenizer
    assert [r2 for r in task.last for r2 in r["texts"]] == [tok.decode(c, skip_special_tokens=True).strip()
                                                            for c in comps]
    rewards = torch.tensor([get_reward("vqa")(t, p["answer"], p["question"])
                            + 0.5 * get_reward("open_recall")(t, p["answer"], p["question"])
                            for p, t in zip(prompts, [x for r in task.last for x in r["texts"]])])
    adv = group_advantages(rewards, 4, scale)
    width = max(len(p["input_ids"]) + len(c) for p, c in zip(prompts, comps))
    ids = torch.zeros(len(comps), width, dtype=torch.long)
    labels = torch.full((len(comps), width), -100)
    mask = torch.zeros(len(comps), width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        n = len(p["input_ids"])
        ids[i, :n + len(c)] = torch.tensor(p["input_ids"] + c)
        labels[i, n:n + len(c)] = torch.tensor(c)
        mask[i, :n + len(c)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask,
              "pixel_values": torch.stack([p["pixel_values"] for p in prompts])}
    lp = token_logps(model(**inputs).logits / temperature, labels)
    with torch.no_grad(), adapters_disabled(model):
        ref = token_logps(model(**inputs).logits / temperature, labels)
    want, m = grpo_loss(lp, None, adv, labels[:, 1:] != -100, ref, beta=0.2, loss_type=loss_type,
                        max_completion_length=5)
    want.backward()
    assert float(out["loss"]) == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert float(out["kl"]) == pytest.approx(m["kl"].item(), rel=1e-5) and float(out["kl"]) > 0
    assert float(out["reward"]) == pytest.approx(rewards.mean().item(), rel=1e-6)
    for n, g in grads.items():
        assert torch.allclose(g, model.get_parameter(n).grad, rtol=1e-4, atol=1e-7), n


# -- learning, stock VLM, DDP --------------------------------------------------------------------------------------


def test_a_short_run_learns_an_easy_reward(assets, tmp_path):
    """Reward 1 when the answer starts with a vowel (one-token answers: a bandit over the first token): from
    about a sixth of the answers at the start, the mean reward rises above 0.6 within 9 steps."""
    from train.preference import main

    grpo = {"rewards": {"starts_with_vowel": 1.0}, "beta": 0.0, "group_size": 8, "max_new_tokens": 1,
            "questions": "closed"}
    _, path = _config(assets, tmp_path / "run", _assembly(assets, lora=False), grpo, steps=9, lr=3e-2, batch=2,
                      save_every=0)
    assert main(["--config", path]) == 0
    r = [json.loads(x)["reward"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert first < 0.3 and last > first + 0.4 and last > 0.6, r


def test_a_resumed_run_samples_the_same_answers_and_ends_bit_identical(assets, tmp_path):
    """4 steps straight = 2 steps, then train.resume=latest to 4: the sampling seeds come from (train.seed, rank,
    data position), so the resumed run samples the same answers (same rewards logged) and ends with the same
    weights, bit for bit."""
    from safetensors.torch import load_file

    from train.preference import main

    grpo = {"rewards": {"vqa": 1.0, "starts_with_vowel": 1.0}}
    model = _assembly(assets)
    _, straight = _config(assets, tmp_path / "a", model, grpo, steps=4, lr=1e-2, accum=2, save_every=2)
    _, first = _config(assets, tmp_path / "b", model, grpo, steps=2, lr=1e-2, accum=2, save_every=2)
    _, resumed = _config(assets, tmp_path / "b", model, grpo, steps=4, lr=1e-2, accum=2, save_every=2,
                         resume="latest")
    assert main(["--config", straight]) == 0 and main(["--config", first]) == 0 and main(["--config", resumed]) == 0
    a = load_file(tmp_path / "a/checkpoints/step_00000004/model.safetensors")
    b = load_file(tmp_path / "b/checkpoints/step_00000004/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x)["reward"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x)["reward"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert ra == rb and len(ra) == 4


def test_stock_vlm_step_with_lora_moves_only_the_adapters(assets, tmp_path):
    """A tiny stock Qwen2-VL (its processor renders, expands and preprocesses): two GRPO steps through
    python -m train.preference; between the checkpoints only adapter weights changed."""
    from train.preference import main
    from vlm.checkpoint import model_weights

    model = {"vlm": str(assets / "qwen"), "freeze": ["vision"], "lora": {"r": 4, "alpha": 8}}
    _, path = _config(assets, tmp_path / "run", model, {"rewards": {"vqa": 1.0, "starts_with_vowel": 1.0}}, steps=2,
                      lr=5e-2)
    assert main(["--config", path]) == 0
    w1 = model_weights(tmp_path / "run/checkpoints/step_00000001")
    w2 = model_weights(tmp_path / "run/checkpoints/step_00000002")
    moved = {k for k in w1 if not torch.equal(w1[k], w2[k])}
    assert moved and all(".lora_" in k for k in moved), sorted(k for k in moved if ".lora_" not in k)[:5]
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) for x in m) and "reward/starts_with_vowel" in m[-1]


def test_two_process_ddp_step_leaves_every_rank_with_the_same_weights(tmp_path):
    """One GRPO step (LoRA on a tiny stock Qwen2-VL, KL to adapters-off) under DDP on 2 gloo processes, each
    rank sampling for its own prompts: the step runs, the adapters move, and both ranks hold the same weights."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file

    from conftest import REPO, torchrun

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = torchrun(2, [str(Path(__file__).resolve().parent / "dist" / "grpo_step.py"), str(tmp_path / "w")], env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b, start = (load_file(tmp_path / f"w.{x}") for x in ("rank0", "rank1", "start"))
    assert math.isfinite(float(a["loss"])) and torch.equal(a["loss"], b["loss"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = [k for k in start if not torch.equal(start[k], a[k])]
    assert moved and all(".lora_" in k for k in moved)


# -- config validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("grpo.group_size=1", "grpo.group_size must be >= 2"),
    ("grpo.rewards.accuracy=1.0", "grpo.rewards: unknown reward(s) 'accuracy'; registered: closed_accuracy"),
    ("grpo.loss_type=ppo", "grpo.loss_type must be one of grpo, bnpo, dr_grpo"),
    ("grpo.scale_rewards=std", "grpo.scale_rewards must be one of group, batch, none"),
    ("grpo.prompt=Answer", "grpo.prompt must contain {question}"),
    ("grpo.beta=-1", "grpo.beta must be >= 0"),
    ("objective=ppo", "objective must be one of preference, grpo"),
])
def test_config_errors_name_the_key(assets, tmp_path, override, message, capsys):
    from train.preference import main

    _, path = _config(assets, tmp_path / "run", _assembly(assets))
    assert main(["--config", path, override]) == 2
    err = capsys.readouterr().err
    assert message in err and path in err, err


def test_rewards_given_replace_the_default(assets, tmp_path):
    """The default {vqa: 1.0} applies only when grpo.rewards is not given (not merged into the config's)."""
    cfg, _ = _config(assets, tmp_path / "a", _assembly(assets), {"rewards": {"format": 1.0}})
    assert cfg.grpo.reward_weights == {"format": 1.0}
    cfg, _ = _config(assets, tmp_path / "b", _assembly(assets))
    assert cfg.grpo.reward_weights == {"vqa": 1.0}
