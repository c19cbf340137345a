"""Concept vocabularies (name, optional UMLS CUI, synonyms), shared by data_prep and training.

data_prep tags captions with them (character spans); concept alignment encodes the names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Concept:
    name: str = "???"
    cui: Optional[str] = None  # UMLS concept unique identifier, e.g. C0028259
    synonyms: list[str] = field(default_factory=list)
    group: Optional[str] = None  # e.g. modality | finding | anatomy | attribute

    def __post_init__(self):
        if not self.name.strip():
            raise ValueError("concept name must not be empty")
        if self.cui is not None and not (self.cui.startswith("C") and self.cui[1:].isdigit()):
            raise ValueError(f"concept {self.name!r}: CUI {self.cui!r} is not of the form C0000000")


@dataclass
class VocabularyConfig:
    """A YAML file under configs/concepts/: ``concepts: [{name, cui, synonyms, group}]``."""

    name: str = "vocabulary"
    concepts: list[Concept] = field(default_factory=list)

    def __post_init__(self):
        seen: dict[str, str] = {}
        for c in self.concepts:
            for term in [c.name, *c.synonyms]:
                t = term.lower()
                if t in seen and seen[t] != c.name:
                    raise ValueError(f"term {term!r} belongs to both {seen[t]!r} and {c.name!r}")
                seen[t] = c.name


def load_vocabulary(path: str | Path) -> VocabularyConfig:
    from vlm.config import load_config

    return load_config(VocabularyConfig, path)
