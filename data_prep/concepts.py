"""Tag text with concepts from a vocabulary: whole-word, case-insensitive, longest match first.

A concept preceded in its clause by a negation cue ("no effusion", "without mass") is marked
``"negated": true`` (a NegEx-style window of a few words), so training can tell absence from presence.

Uses an Aho-Corasick automaton (pyahocorasick), so tagging costs one pass over the text however
large the vocabulary. ``python -m data_prep.concepts --vocab FILE "text"`` prints the spans.
"""
from __future__ import annotations

import argparse
import json
import sys

import re

import ahocorasick

from vlm.data.concepts import VocabularyConfig, load_vocabulary


NEGATION_CUES = {"no", "not", "without", "negative", "absent", "free", "nor", "neither"}
NEGATION_WINDOW = 5  # words before the concept, within its clause
_CLAUSE_END = re.compile(r"[.;:!?\n]|\bbut\b")


def is_negated(text: str, start: int) -> bool:
    clause = _CLAUSE_END.split(text[max(0, start - 80):start])[-1]
    words = re.findall(r"[a-z]+", clause.lower())[-NEGATION_WINDOW:]
    return any(w in NEGATION_CUES for w in words)


class ConceptTagger:
    def __init__(self, vocab: VocabularyConfig):
        self.vocab = vocab
        self.automaton = ahocorasick.Automaton()
        for c in vocab.concepts:
            for term in [c.name, *c.synonyms]:
                t = term.lower().strip()
                if t:
                    self.automaton.add_word(t, (len(t), c.name, c.cui))
        self.empty = len(self.automaton) == 0
        if not self.empty:
            self.automaton.make_automaton()

    @classmethod
    def from_file(cls, path) -> "ConceptTagger":
        return cls(load_vocabulary(path))

    def tag(self, text: str) -> list[dict]:
        """``[{"name", "cui", "span": [start, end]}]`` (+ ``"negated": true``), non-overlapping, in order."""
        if self.empty or not text:
            return []
        low = text.lower()  # same length as text for the scripts we tag (ASCII medical English)
        if len(low) != len(text):
            return []
        cands = []
        for end, (n, name, cui) in self.automaton.iter(low):
            start = end - n + 1
            before = low[start - 1] if start > 0 else " "
            after = low[end + 1] if end + 1 < len(low) else " "
            if before.isalnum() or after.isalnum():
                continue  # inside a word: "mass" in "massive"
            cands.append((start, end + 1, name, cui))
        cands.sort(key=lambda c: (c[0], -(c[1] - c[0])))
        out, last_end = [], -1
        for start, end, name, cui in cands:
            if start >= last_end:
                c = {"name": name, "cui": cui, "span": [start, end]}
                if is_negated(text, start):
                    c["negated"] = True
                out.append(c)
                last_end = end
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.concepts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default="configs/concepts/medical.yaml", help="vocabulary YAML")
    p.add_argument("text", nargs="*", help="texts to tag (default: one per line on stdin)")
    args = p.parse_args(argv)
    tagger = ConceptTagger.from_file(args.vocab)
    for line in args.text or (ln.rstrip("\n") for ln in sys.stdin):
        print(json.dumps({"text": line, "concepts": tagger.tag(line)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
