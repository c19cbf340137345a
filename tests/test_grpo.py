"""GRPO pieces (vlm/grpo.py): answer extraction and format reward on hand-written outputs, group advantages and
the clipped loss on hand-computed batches, and parity of the loss and its gradients with TRL's GRPOTrainer on
the same tiny model, samples and rewards."""
from __future__ import annotations

import math
import tempfile
import warnings

import pytest
import torch

from vlm.grpo import extract_answer, format_reward, group_advantages, grpo_loss


@pytest.mark.parametrize("text,answer,fmt", [
    ("<think>The right lung has a nodule.</think><answer>yes</answer>", "yes", 1.0),
    ("<think>\nlook\n</think>\n<answer> Left lower lobe </answer>\n", "Left lower lobe", 1.0),
    ("<THINK>a</THINK><ANSWER>No</ANSWER>", "No", 1.0),
    ("<answer>yes</answer>", "yes", 0.0),  # no reasoning block
    ("<think>a</think><answer>yes</answer> extra", "yes", 0.0),  # text after the answer
    ("<think>a</think><answer>no</answer><answer>yes</answer>", "yes", 0.0),  # two answers: the last counts
    ("<think>a <answer>x</answer></think><answer>yes</answer>", "yes", 0.0),  # an answer tag inside the reasoning
    ("<think>unfinished <answer>yes", "<think>unfinished <answer>yes", 0.0),  # no complete tag: as it is
    ("yes", "yes", 0.0),
    ("", "", 0.0),
    ("Looking at the lungs, the answer is yes.", "yes", 0.0),  # "the answer is X": X, to the sentence's end
    ("The final answer is: left upper lobe", "left upper lobe", 0.0),
    ("The answer is (B) lung. It could not be A.", "(B) lung", 0.0),
    ("<think>yes or no? The answer is yes, or no.</think> no", "no", 0.0),  # the reasoning never counts
    (" no ", " no ", 0.0),  # a plain answer: unchanged
])
def test_answer_extraction_and_format_reward(text, answer, fmt):
    assert extract_answer(text) == answer
    assert format_reward(text) == fmt


@pytest.mark.parametrize("text,kind", [("<think>a</think><answer>b</answer>", "tags"), ("So the answer is b.", "answer_is"),
                                       ("<think>a</think> b", "after_think"), ("b", "plain"), ("<answer>b", "plain")])
def test_answer_format(text, kind):
    from vlm.grpo import answer_format

    assert answer_format(text) == kind


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 3)
    s1 = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # Bessel-corrected std of (1, 0, 0)
    want = [(1 - 1 / 3) / (s1 + 1e-4), -1 / 3 / (s1 + 1e-4), -1 / 3 / (s1 + 1e-4), 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert group_advantages(r, 3, "none").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)


def test_clipped_loss_hand_computed():
    """Two answers of one token each: the ratio 1.5 is clipped at 1.2 for a positive advantage (the min), not for
    a negative one; plus beta times the k3 KL."""
    logps = torch.tensor([[math.log(0.6)], [math.log(0.6)]])
    old = torch.tensor([[math.log(0.4)], [math.log(0.4)]])  # ratio 1.5
    ref = torch.tensor([[math.log(0.5)], [math.log(0.5)]])
    mask = torch.ones(2, 1)
    loss, m = grpo_loss(logps, old, torch.tensor([1.0, -1.0]), mask, ref, beta=0.1, kl_ratio_correction=False)
    kl = 0.5 / 0.6 - math.log(0.5 / 0.6) - 1
    want = ((-1.2 + 0.1 * kl) + (1.5 + 0.1 * kl)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    corrected, _ = grpo_loss(logps, old, torch.tensor([1.0, -1.0]), mask, ref, beta=0.1)  # KL x the ratio 1.5
    assert corrected.item() == pytest.approx(((-1.2 + 0.15 * kl) + (1.5 + 0.15 * kl)) / 2, rel=1e-6)
    assert m["clip_ratio"].item() == 1.0 and m["kl"].item() == pytest.approx(kl, rel=1e-5)


trl = pytest.importorskip("trl")


@pytest.mark.parametrize("loss_type,beta,correction", [("grpo", 0.0, True), ("grpo", 0.1, True), ("grpo", 0.1, False),
                                                        ("bnpo", 0.05, True), ("dr_grpo", 0.1, True)])
def test_loss_and_gradients_equal_trl_grpo(loss_type, beta, correction):
    """TRL's GRPOTrainer._compute_loss and ours on the same tiny model, prompt/completion ids, completion
    masks (different lengths), old and reference log-probs and advantages: equal loss and gradients."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from vlm.models.tiny import train_tokenizer
    from vlm.preference import token_logps

    warnings.filterwarnings("ignore")
    tok = train_tokenizer("qwen2")
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], num_generations=2,
                      per_device_train_batch_size=4, loss_type=loss_type, beta=beta, epsilon=0.2,
                      max_completion_length=6, disable_tqdm=True, bf16=False,  # fp32 both sides
                      use_bias_correction_kl=correction)
    trainer = GRPOTrainer(model=folder, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "Is there a nodule?"}] * 4),
                          processing_class=tok)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # what its training loop sets, with no accumulation
    g = torch.Generator().manual_seed(5)
    prompt_ids = torch.randint(5, len(tok) - 5, (4, 5), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(5, len(tok) - 5, (4, 6), generator=g)
    completion_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 2 + [0] * 4])
    old = -torch.rand(4, 6, generator=g) * 3 - 4
    ref = -torch.rand(4, 6, generator=g) * 3 - 4
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 1.0]), 2)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    model.train()
    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    g_theirs = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[:, 5:] = labels[:, 5:].masked_fill(completion_mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
    lp = token_logps(logits, labels)[:, 4:]  # the predictions of the 6 completion tokens
    ours, _ = grpo_loss(lp, old, adv, completion_mask, ref, beta=beta, eps_low=0.2, loss_type=loss_type,
                        max_completion_length=6, kl_ratio_correction=correction)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7), (loss_type, beta)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, g_theirs[n], rtol=1e-4, atol=1e-7), n
