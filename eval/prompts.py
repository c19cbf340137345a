"""Generation prompts per benchmark (configs/eval/prompts.yaml; another file with --prompts).

Each benchmark has an ``open`` and a ``closed`` template ({question} is replaced), a
``closed_options`` template used for closed questions only when asked (--closed-options: the
answer options listed in the prompt, as some papers evaluate; off by default, as LLaVA-Med asks the
bare question), and a ``report`` prompt for report generation. Multiple-choice and text QA benchmarks use
``choice`` ({question}, {options}: the options one a line, each written with ``option``: {letter} and {text};
{context}: PubMedQA's abstract) and, for MMMU's few open questions, ``open``. A benchmark missing from the file
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
    choice: str = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
    option: str = "{letter}. {text}"


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
    for name in ("open", "closed", "closed_options", "choice"):
        if "{question}" not in getattr(p, name):
            raise ValueError(f"{path}: benchmarks.{benchmark}.{name} must contain {{question}}")
    if "{options}" not in p.choice:
        raise ValueError(f"{path}: benchmarks.{benchmark}.choice must contain {{options}}")
    if "{letter}" not in p.option or "{text}" not in p.option:
        raise ValueError(f"{path}: benchmarks.{benchmark}.option must contain {{letter}} and {{text}}")
    return p


def vqa_prompt(p: BenchmarkPrompt, question: str, answer_type: str, options: bool = False) -> str:
    if answer_type == "CLOSED":
        return (p.closed_options if options else p.closed).replace("{question}", question)
    return p.open.replace("{question}", question)


def choice_prompt(p: BenchmarkPrompt, question: str, options: dict, context: str = "") -> str:
    """A multiple-choice question with its options listed (``choice`` and ``option`` templates); a question without
    options (MMMU's open ones) uses ``open``. Each placeholder is filled once, so braces in a question stay as they
    are."""
    if not options:
        return p.open.replace("{question}", question)
    listed = "\n".join(p.option.replace("{letter}", k).replace("{text}", v) for k, v in options.items())
    return _fill(p.choice, {"question": question, "options": listed, "context": context})


def _fill(template: str, values: dict) -> str:
    import re

    return re.sub(r"\{(question|options|context)\}", lambda m: values[m.group(1)], template)
