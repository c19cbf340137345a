"""Tiny, offline stand-ins of real model families: a tokenizer of the family's kind trained in a second,
a chat template of the family's shape, and a 2-layer LLM of the family's architecture.

Nothing can be downloaded in CI, yet the bugs that matter live in what differs between families:
SentencePiece ``▁word`` tokens whose offsets start at the space, ``[INST] ... [/INST] answer </s>``
templates with a space before EOS, Gemma's ``<start_of_turn>model``, tied embeddings, bf16 checkpoints.
``train.rehearse`` and the tests build these to run shipped configs "as shipped, model shrunk".

    tok = train_tokenizer("mistral")                   # Metaspace BPE + [INST] template + <image>
    llm = tiny_llm("mistral", len(tok), tok)           # MistralForCausalLM, 2 layers, 64 wide
    save_tiny_llm(folder, "mistral", dtype="bfloat16")  # a folder that from_pretrained loads

Tokenizer kinds: ``byte_bpe`` (GPT-2/Llama-3/Qwen2 byte-level BPE), ``metaspace_bpe`` (Llama-2,
Mistral, Phi-3: SentencePiece-style BPE with byte fallback), ``unigram`` (SentencePiece Unigram, as
T5/ALBERT; used here for the Gemma-shaped family). The templates are written for this project in each
family's shape (role markers, where BOS/EOS/end-of-turn tokens and spaces go), not copied.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

IMAGE = "<image>"


@dataclass(frozen=True)
class Family:
    """What a tiny stand-in needs to match: tokenizer kind, template shape, special tokens, architecture."""

    model_type: str  # transformers' model_type of the LLM
    tokenizer: str  # byte_bpe | metaspace_bpe | unigram
    template: str  # jinja chat template (messages with role/content; add_generation_prompt)
    bos: Optional[str]
    eos: str  # the tokenizer's EOS
    end_of_turn: str  # the token that ends an assistant turn (EOS for Llama-2/Mistral)
    specials: tuple = ()  # further special tokens of the template
    pad: str = "<pad>"
    config: dict = field(default_factory=dict)  # architecture overrides beyond the shared tiny sizes


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama-2 / Mistral shape: [INST] user [/INST] then " answer </s>" (Llama-2) or "answer</s>" (Mistral);
# a system message is folded into the first user turn
LLAMA2 = ("{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
          "{% set ns.sys = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
          "{% elif m['role'] == 'user' %}{{ bos_token + '[INST] ' + ns.sys + m['content'] | trim + ' [/INST]' }}"
          "{% set ns.sys = '' %}{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL = ("{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
           "{% set ns.sys = m['content'] + '\n\n' %}{% elif m['role'] == 'user' %}"
           "{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}{% set ns.sys = '' %}"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{% set ns.sys = m['content'] + '\n\n' %}{% else %}"
         "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + ns.sys "
         "+ m['content'] | trim + '<end_of_turn>\n' }}{% set ns.sys = '' %}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

FAMILIES = {
    "qwen2": Family("qwen2", "byte_bpe", CHATML, None, "<|endoftext|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>"),
                    pad="<|endoftext|>"),
    "llama3": Family("llama", "byte_bpe", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "llama2": Family("llama", "metaspace_bpe", LLAMA2, "<s>", "</s>", "</s>", pad="<unk>"),
    "mistral": Family("mistral", "metaspace_bpe", MISTRAL, "<s>", "</s>", "</s>", pad="<unk>"),
    "gemma": Family("gemma3_text", "unigram", GEMMA, "<bos>", "<eos>", "<end_of_turn>",
                    ("<start_of_turn>", "<end_of_turn>"), config={"head_dim": 16, "sliding_window": 512}),
    "phi3": Family("phi3", "metaspace_bpe", PHI3, "<s>", "<|endoftext|>", "<|end|>",
                   ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"), pad="<|endoftext|>"),
}

CORPUS = [
    "Is there a nodule in the right upper lung?", "Yes", "No", "MRI", "CT", "Chest x-ray.",
    "What imaging modality is this?", "Describe the findings.", "A small effusion on the left side.",
    "FINDINGS: The heart size is normal. IMPRESSION: No acute abnormality.", "Which organ is abnormal?",
    "Head CT without contrast shows a hypodense lesion.", "The lungs are clear.", "Where is the mass?",
    "Histopathology slide with hematoxylin and eosin stain.", "Fundus photograph of the retina.",
    "user assistant system model", "0 1 2 3 4 5 6 7 8 9 ( ) , . ; : ? ! - / %", "[INST] [/INST] <<SYS>> <</SYS>>",
]

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 32768}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def train_tokenizer(name: str, vocab_size: int = 600, corpus: Optional[list[str]] = None):
    """A PreTrainedTokenizerFast of the family's kind (trained on a small medical corpus in well under a
    second), with its special tokens, the ``<image>`` token and the family's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = family(name)
    specials = [t for t in dict.fromkeys(["<unk>", fam.pad, fam.bos, fam.eos, *fam.specials, IMAGE]) if t]
    text = (corpus or CORPUS) * 20
    if fam.tokenizer == "byte_bpe":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    elif fam.tokenizer == "metaspace_bpe":  # SentencePiece BPE as Llama-2/Mistral ship it: bytes as fallback
        tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
        tk = _with_byte_tokens(tk)
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    elif fam.tokenizer == "unigram":  # SentencePiece Unigram with byte fallback (Gemma's vocabularies have it)
        tk = Tokenizer(models.Unigram())
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             unk_token="<unk>"))
        tk = _with_byte_tokens(tk)
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    else:
        raise ValueError(f"unknown tokenizer kind {fam.tokenizer!r}")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token=fam.pad, eos_token=fam.eos,
                                  bos_token=fam.bos, additional_special_tokens=[t for t in (*fam.specials, IMAGE)])
    tok.chat_template = fam.template
    return tok


def _with_byte_tokens(tk):
    """The trained BPE plus the 256 byte tokens (<0x00> ... <0xFF>) its byte fallback spells unseen
    characters with (a newline, '[', non-ASCII), as SentencePiece vocabularies carry them."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tk.to_str())
    model = data["model"]
    if model["type"] == "Unigram":  # a list of [piece, log-probability]; ids are positions
        have = {piece for piece, _ in model["vocab"]}
        model["vocab"] += [[f"<0x{b:02X}>", -100.0] for b in range(256) if f"<0x{b:02X}>" not in have]
        model["byte_fallback"] = True
    else:
        vocab = model["vocab"]
        nxt = max(max(vocab.values()), max((t["id"] for t in data["added_tokens"]), default=0)) + 1
        for b in range(256):
            if f"<0x{b:02X}>" not in vocab:
                vocab[f"<0x{b:02X}>"], nxt = nxt, nxt + 1
    return Tokenizer.from_str(json.dumps(data))


def tiny_config(name: str, vocab_size: int, tokenizer=None, **overrides):
    """The family's transformers config at 2 layers x 64 wide (the family's own defaults otherwise)."""
    from transformers import AutoConfig

    fam = family(name)
    kw = {**TINY, **fam.config, "vocab_size": vocab_size, **overrides}
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if tokenizer is not None and getattr(tokenizer, key, None) is not None:
            kw.setdefault(key, getattr(tokenizer, key))
    return AutoConfig.for_model(fam.model_type, **kw)


def save_tiny_llm(folder: str | Path, name: str, dtype: str = "bfloat16", seed: int = 0, tokenizer=None):
    """A tiny causal LM of the family with its tokenizer, saved like a hub checkpoint in ``dtype`` (bf16, as
    Mistral/Llama/Qwen2/Gemma checkpoints are stored) -> the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizer or train_tokenizer(name)
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(tiny_config(name, len(tok), tok))
    llm.to(getattr(torch, dtype))
    folder = Path(folder)
    llm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
