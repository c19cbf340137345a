"""Generation prompts per benchmark (configs/eval/prompts.yaml; another file with --prompts).

Each benchmark has an ``open`` and a ``closed`` template ({question} is replaced), a
``closed_options`` template used for closed questions only when asked (--closed-options: the
answer options listed in the prompt, as some papers evaluate; off by default, as LLaVA-Med asks the
bare question), and a ``report`` prompt for report generation. A benchmark missing from the file
uses its ``default`` entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "configs" / "eval" / "prompts.yaml"


@dataclass
class BenchmarkPrompt:
    open: str = "{question}"
    closed: str = "{question}"
    closed_options: str = "{question} Please choose from the following options: yes, no."
    report: str = "Write the radiology report for this chest x-ray."


@dataclass
class EvalPrompts:
    benchmarks: Dict[str, BenchmarkPrompt] = field(default_factory=dict)


def load_prompts(benchmark: str, path: Optional[str | Path] = None) -> BenchmarkPrompt:
    from vlm.config import load_config

    path = Path(path) if path else DEFAULT_FILE
    table = load_config(EvalPrompts, path).benchmarks if path.is_file() else {}
    if path != DEFAULT_FILE and not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    p = table.get(benchmark) or table.get("default") or BenchmarkPrompt()
    for name in ("open", "closed", "closed_options"):
        if "{question}" not in getattr(p, name):
            raise ValueError(f"{path}: benchmarks.{benchmark}.{name} must contain {{question}}")
    return p


def vqa_prompt(p: BenchmarkPrompt, question: str, answer_type: str, options: bool = False) -> str:
    if answer_type == "CLOSED":
        return (p.closed_options if options else p.closed).replace("{question}", question)
    return p.open.replace("{question}", question)
