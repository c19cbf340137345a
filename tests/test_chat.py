"""Conversation encoding: only assistant turns are labels (checked by decoding them, per template),
bad conversations are skipped with a reason, and packed rows give the unpacked loss."""
from __future__ import annotations

import pytest
import torch

from vlm.data.chat import (IGNORE, ChatConfig, SkipExample, check_template, encode, fit_length,
                           normalize_conversation, pack)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIAL = ["<image>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<pad>", "</s>"]
CORPUS = ["Is there a nodule in the right upper lung?", "Yes, a small nodule.", "What modality is this?",
          "A chest x-ray.", "Describe the image.", "Head CT with no acute abnormality.", "user assistant system"] * 30


def make_tokenizer(template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"] + SPECIAL))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                  additional_special_tokens=SPECIAL)
    if template:
        tok.chat_template = template
    return tok


CONV = [{"from": "human", "value": "<image>\nIs there a nodule in the right upper lung?"},
        {"from": "gpt", "value": "Yes, a small nodule."},
        {"from": "human", "value": "What modality is this?"},
        {"from": "gpt", "value": "A chest x-ray."}]


@pytest.mark.parametrize("template,eot", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
def test_only_assistant_turns_are_labels(template, eot):
    tok = make_tokenizer(template)
    cfg = ChatConfig()
    check_template(tok, cfg)
    ids, labels = encode(normalize_conversation(CONV, 1), tok, cfg, image_seq_len=5)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 5 and all(labels[i] == IGNORE for i, t in enumerate(ids) if t == image_id)
    # decode each run of consecutive labels: exactly the assistant turns, each with its end-of-turn token
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(lab)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    assert runs == [f"Yes, a small nodule.{eot}", f"A chest x-ray.{eot}"]


FAMILY_CONV = [{"from": "human", "value": "<image>\nIs there a nodule in the right upper lung?"},
               {"from": "gpt", "value": "Yes"},
               {"from": "human", "value": "What imaging modality is this?"}, {"from": "gpt", "value": "MRI"},
               {"from": "human", "value": "Describe the findings."},
               {"from": "gpt", "value": "A small effusion on the left side."}]


def labelled_runs(ids, labels):
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        assert lab in (IGNORE, t)
        if lab != IGNORE:
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", ["qwen2", "llama3", "llama2", "mistral", "gemma", "phi3"])
@pytest.mark.parametrize("system", [None, "You are a radiologist."])
def test_masking_on_every_tokenizer_family(family, system):
    """Byte-level BPE (Qwen2 ChatML, Llama-3), Metaspace BPE (Llama-2 'answer </s>', Mistral, Phi-3) and
    Unigram (Gemma's turns): the labelled tokens are exactly each answer, one-word answers included,
    followed by the template's end-of-turn token; no other token is labelled."""
    from vlm.models.tiny import family as fam_of, train_tokenizer

    tok = train_tokenizer(family)
    eot = tok.convert_tokens_to_ids(fam_of(family).end_of_turn)
    cfg = ChatConfig(system_prompt=system)
    check_template(tok, cfg)
    ids, labels = encode(normalize_conversation(FAMILY_CONV, 1), tok, cfg, image_seq_len=4)
    runs = labelled_runs(ids, labels)
    answers = [t["value"] for t in FAMILY_CONV if t["from"] == "gpt"]
    assert len(runs) == len(answers), [tok.decode(r) for r in runs]
    for run, answer in zip(runs, answers):
        assert run[-1] == eot, tok.decode(run)
        assert tok.decode(run[:-1]).strip() == answer
    assert sum(len(r) for r in runs) == sum(1 for x in labels if x != IGNORE)


@pytest.mark.parametrize("family", ["llama2", "mistral", "gemma", "phi3"])
@pytest.mark.parametrize("answer", ["  Yes  \n", "Ödem, links.", "?", "[/INST] no"])
def test_masking_of_awkward_answers(family, answer):
    """Whitespace around an answer, characters only the byte fallback spells, punctuation, a template marker
    inside the answer: the labels are still exactly the (stripped) answer and the end-of-turn token (an
    unknown character never counts as the end of a turn)."""
    from vlm.models.tiny import family as fam_of, train_tokenizer

    tok = train_tokenizer(family)
    conv = [{"from": "human", "value": "<image>\nWhat is seen?"}, {"from": "gpt", "value": answer}]
    ids, labels = encode(normalize_conversation(conv, 1), tok, ChatConfig(), image_seq_len=2)
    (run,) = labelled_runs(ids, labels)
    assert run[-1] == tok.convert_tokens_to_ids(fam_of(family).end_of_turn)
    assert tok.decode(run[:-1]).strip() == answer.strip()


def test_plain_template_for_stage1():
    tok = make_tokenizer(None)
    cfg = ChatConfig(template="plain")
    conv = [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "Head CT with no acute abnormality."}]
    ids, labels = encode(normalize_conversation(conv, 1), tok, cfg, image_seq_len=3)
    assert ids[:3] == [tok.convert_tokens_to_ids("<image>")] * 3 and labels[:3] == [IGNORE] * 3
    assert tok.decode(labels[3:]) == "Head CT with no acute abnormality.</s>"


def test_bad_conversations_are_skipped_with_reasons():
    cases = [
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], 1, "image_token_mismatch"),
        ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}], 0, "image_token_mismatch"),
        ([{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}], 1, "unknown_role"),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "  "}], 1, "empty_assistant_turn"),
        ([{"from": "human", "value": "<image>\nq"}], 1, "no_assistant_turn"),
    ]
    for conv, n, reason in cases:
        with pytest.raises(SkipExample) as e:
            normalize_conversation(conv, n)
        assert e.value.reason == reason


def test_masking_that_cannot_be_computed_is_skipped():
    tok = make_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}")
    with pytest.raises(SkipExample) as e:
        encode(normalize_conversation(CONV, 1), tok, ChatConfig(), 2)
    assert e.value.reason == "masking_failed"


def test_no_template_is_a_clear_error_before_training():
    with pytest.raises(ValueError, match="no chat template"):
        check_template(make_tokenizer(None), ChatConfig())


def test_truncate_or_drop():
    ids, labels = list(range(20)), [IGNORE] * 5 + list(range(5, 20))
    short = fit_length(ids, labels, ChatConfig(max_length=10), image_id=999)
    assert short == (ids[:10], labels[:10])
    with pytest.raises(SkipExample, match="too_long"):
        fit_length(ids, labels, ChatConfig(max_length=10, overlong="drop"), image_id=999)


@pytest.mark.parametrize("first_image_at", [4, 8, 14])
def test_truncation_never_leaves_an_image_without_its_tokens(first_image_at):
    """A cut inside an image's placeholder block, or before a whole later image, would keep pixels without
    (all) their tokens: the example is skipped and counted instead; a cut after every image truncates."""
    IMG = 99
    ids = list(range(first_image_at)) + [IMG] * 4 + list(range(20, 30))
    labels = [IGNORE] * (first_image_at + 4) + list(range(20, 30))
    if first_image_at + 4 <= 10:
        assert fit_length(ids, labels, ChatConfig(max_length=10), IMG)[0] == ids[:10]
    else:
        with pytest.raises(SkipExample) as e:
            fit_length(ids, labels, ChatConfig(max_length=10), IMG)
        assert e.value.reason == "truncation_cuts_image"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(impl):
    """A packed row (position ids restarting, no mask) gives each example the logits it has alone:
    sdpa runs as vlm/models/varlen.py's per-segment attention, eager through transformers' packed mask."""
    from vlm.models.vlm import build_llm

    torch.manual_seed(0)
    tok = make_tokenizer(CHATML)
    model = build_llm(None, {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 128}, tok, impl).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 12, 5, 12):
        ids = torch.randint(1, len(tok), (n,), generator=g).tolist()
        examples.append((ids, [IGNORE] * 2 + ids[2:]))

    def token_loss_sum(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")

    unpacked = sum(token_loss_sum(model(torch.tensor([i])).logits[0], torch.tensor(l)) for i, l in examples)
    # use_cache=False as in training: transformers looks for packed rows only without a KV cache
    rows = pack(examples, max_len=20)
    assert sorted(n for r in rows for n in r["seq_lens"]) == [5, 7, 12, 12] and len(rows) == 2
    packed = 0.0
    for r in rows:
        logits = model(r["input_ids"][None], position_ids=r["position_ids"][None], use_cache=False).logits[0]
        packed = packed + sum(token_loss_sum(logits[s:s + n], r["labels"][s:s + n])
                              for s, n in zip([0, *torch.tensor(r["seq_lens"]).cumsum(0).tolist()], r["seq_lens"]))
    assert torch.allclose(packed, unpacked, atol=1e-4), (packed, unpacked)
    packed.backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    unpacked.backward()
    for a, b in zip(g_packed, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-5)


def test_pack_first_fit_decreasing():
    ex = [([1] * n, [1] * n) for n in (5, 4, 3, 6, 2)]
    rows = pack(ex, max_len=9)
    assert [r["seq_lens"] for r in rows] == [[3, 6], [5, 4], [2]]  # stream order kept inside a row
    assert [r["index"] for r in rows] == [[2, 3], [0, 1], [4]]
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="does not fit"):
        pack([([1] * 10, [1] * 10)], max_len=9)


@pytest.mark.parametrize("answer", ["a", "assistant", "user", "im"])
def test_answers_that_also_occur_in_the_template_headers(answer):
    """'a' occurs in 'assistant': the answer must be found where the template starts it, not earlier."""
    tok = make_tokenizer(CHATML)
    conv = [{"from": "human", "value": "<image>\nWhat modality is this?"}, {"from": "gpt", "value": answer}]
    ids, labels = encode(normalize_conversation(conv, 1), tok, ChatConfig(), 2)
    assert tok.decode([x for x in labels if x != IGNORE]) == f"{answer}<|im_end|>"
