"""Train a small byte-level BPE tokenizer on a corpus's text (captions, conversations, reports),
with the special tokens and ChatML chat template an assistant needs. For the demo's tiny LLM,
built from a config, which has no tokenizer of its own.

    python -m data_prep.tokenizer --shards data/demo/synth/instruct data/demo/synth/pretrain \\
        --out data/demo/tokenizer --vocab-size 2000

The folder loads with transformers.AutoTokenizer.from_pretrained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm.utils import cli, setup_logging

# ChatML; a message's content is a string (training data, "<image>\n" inline) or a list of
# {"type": "image"} / {"type": "text", "text"} parts (transformers processors), rendered alike.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
          "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<unk>", "<pad>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]


def corpus_texts(folders: list[str]):
    from data_prep.inspect import scan_shard
    from vlm.data.schema import read_manifest

    for folder in folders:
        m = read_manifest(folder)
        for s in m.shards:
            for _, parts in scan_shard(Path(folder) / s.name):
                if "txt" in parts:
                    yield parts["txt"].decode("utf-8", "replace")
                meta = json.loads(parts.get("json", b"{}"))
                for turn in meta.get("conversations") or []:
                    yield str(turn.get("value", "")).replace("<image>", "")


def train_tokenizer(texts, vocab_size: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                  additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, help="shard folders whose text to learn from")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=2000)
    args = p.parse_args(argv)
    setup_logging()
    tok = train_tokenizer(corpus_texts(args.shards), args.vocab_size)
    tok.save_pretrained(args.out)
    print(f"tokenizer with {len(tok)} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
