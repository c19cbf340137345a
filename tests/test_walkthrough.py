"""The README's real-data walkthrough runs in order: every path a command reads (directly or through the
config it runs, overrides and _base_ files applied) was written by an earlier command or is one of the
user's downloads, everything a command writes is read later or is a final product, and every config
a command or a docstring names exists. Shipped configs read only what some documented command writes."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO
from test_config import schema_for
from vlm.config import ConfigError, load_config
from vlm.registry import list_models

README = (REPO / "README.md").read_text()
SECTION = "On real data"
# what the walkthrough tells users to download and unpack under data/ (official releases)
DOWNLOADS = ["data/pmc_oa", "data/llava_med", "data/Slake1.0", "data/VQA_RAD", "data/pathvqa",
             "data/iu_xray", "data/mimic_cxr", "data/chexpert_5x200", "data/roco", "data/OmniMedVQA", "data/PMC-VQA",
             "data/MMMU", "data/MedXpertQA", "data/MedQA", "data/medmcqa", "data/pubmedqa", "data/mmlu"]
# the walkthrough's end products: exports and evaluation results
FINAL = ["exports/medclip", "exports/medllava", "runs/zeroshot_cxr.json", "runs/retrieval.json",
         "runs/suite_medical", "runs/suite_medical_full", "runs/suite_breadth"]
CHECKERS = {"data_prep.inspect", "data_prep.stream"}  # they verify a folder; reading it is not using it
READ_FLAGS = {"--input", "--image-root", "--checkpoint", "--folder", "--csv", "--pairs", "--shards",
              "--prompts", "--concepts", "--data-root", "--annotation", "--predictions"}
RUN_SCHEMA = {"train.clip": "clip", "train.instruct": "instruct", "eval.suite": "suite", "data_prep.stream": "data",
              "train.preference": "preference"}
MADE = ("runs/", "shards/", "data/", "exports/")  # made by commands or downloaded, never part of the checkout


@dataclass
class Step:
    text: str  # the command as written (for messages)
    module: str
    config: str | None = None
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # a missing or invalid config

    def identity(self):  # the same step run again (another launcher, resume): same program, config, inputs
        return self.module, self.config, tuple(sorted(self.reads))

    def __str__(self):
        return f"`{self.text[:110]}{' ...' if len(self.text) > 110 else ''}`"


def norm(p: str) -> str:
    return os.path.normpath(p.strip()).removeprefix("./")


def under(p: str, roots) -> bool:
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)


def is_hub_id(p: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", p)) and not p.startswith(MADE)


def available(p: str, written) -> bool:
    """Written by a command, a listed download, a file of the checkout (configs/...) or a hub id."""
    return under(p, written) or under(p, DOWNLOADS) or is_hub_id(p) or (not p.startswith(MADE) and (REPO / p).exists())


def config_paths(cfg) -> tuple[list, list]:
    """(reads, writes) of a loaded run/suite/data config."""
    reads, writes = [], []
    data = getattr(cfg, "data", cfg)
    reads += [s.path for s in getattr(data, "sources", [])]
    model = getattr(cfg, "model", None)
    reads += [getattr(model, k, None) for k in ("vision", "init_from", "llm", "tokenizer", "vlm", "pretrained")]
    for z in getattr(cfg, "zeroshot", []):
        reads += [z.folder, z.prompts]
    if hasattr(cfg, "benchmarks"):
        reads += [cfg.checkpoint, cfg.prompts] + [x for b in cfg.benchmarks for x in (b.data_root, b.annotation, b.predictions)]
        writes.append(cfg.out)
    if hasattr(cfg, "train"):
        writes.append(cfg.train.output_dir)
    return [norm(p) for p in reads if isinstance(p, str) and p], [norm(p) for p in writes]


def parse_commands(block: str) -> list[Step]:
    """Every `python -m X` / `torchrun ... -m X` line of a shell block (continuations joined) as a Step."""
    steps = []
    for line in block.replace("\\\n", " ").splitlines():
        if " -m " not in line:  # prose in a comment may have unbalanced quotes: only parse commands
            continue
        tokens = shlex.split(line, comments=True)
        if "-m" not in tokens:
            continue
        i = tokens.index("-m")
        step, args = Step(" ".join(line.split()), tokens[i + 1]), tokens[i + 2:]
        overrides, j = [], 0
        while j < len(args):
            a, j = args[j], j + 1
            if not a.startswith("-"):  # key=value override, or a positional folder (data_prep.inspect DIR)
                overrides.append(a) if "=" in a else step.reads.append(norm(a))
                continue
            values = []  # a flag's values: none for a switch, several for --shards
            while j < len(args) and not args[j].startswith("-") and (not values or a == "--shards"):
                values, j = values + [args[j]], j + 1
            if a == "--config":
                step.config = values[0]
            elif a == "--out":
                step.writes.append(norm(values[0]))
            elif a in READ_FLAGS:
                step.reads += [norm(v) for v in values]
        if step.config:
            path, kind = REPO / step.config, RUN_SCHEMA.get(step.module)
            try:
                cfg = load_config(schema_for(Path("configs") / kind / "x.yaml") if kind else schema_for(path), path, overrides)
            except ConfigError as e:  # a missing file included
                step.problems.append(f"{step}: {e}")
            else:
                reads, writes = config_paths(cfg)
                step.reads, step.writes = step.reads + reads, step.writes + writes
                if step.module == "train.clip" and cfg.model.name not in list_models():
                    step.problems.append(f"{step}: model.name {cfg.model.name} is not in configs/model/")
        steps.append(step)
    return steps


def bash_blocks(text: str) -> list[tuple[str, str]]:
    """(## section title, block text) of every fenced bash block."""
    out, section = [], ""
    for m in re.finditer(r"^## ([^\n]+)$|^```bash\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            section = m.group(1).strip()
        else:
            out.append((section, m.group(2)))
    return out


WALK = [parse_commands(b) for s, b in bash_blocks(README) if s == SECTION]
ALL_README = [s for _, b in bash_blocks(README) for s in parse_commands(b)]


def test_walkthrough_is_there():
    assert len(WALK) == 3, f"expected the One GPU, Many GPUs and Slurm blocks under '## {SECTION}'"
    assert any(s.module == "data_prep.shards" for s in WALK[0])


def test_walkthrough_reads_what_earlier_steps_wrote():
    """Block 1 is the sequence; blocks 2 and 3 run its steps another way, starting from block 1's shards."""
    shards = [p for s in WALK[0] if s.module.startswith("data_prep.") for p in s.writes]
    errors, writers = [], {}
    for n, block in enumerate(WALK):
        written = dict.fromkeys(shards if n else [])
        for step in block:
            errors += step.problems
            if step.config is None and step.module.startswith("train.") and step.module != "train.export":
                errors.append(f"{step}: runs no --config")
            for p in step.reads:
                if not available(p, written):
                    errors.append(f"{step} reads {p}, which no earlier command writes and which is not a listed download")
            for p in step.writes:  # in any block: a second writer of a path must be the same step
                other = writers.setdefault(p, step)
                if other.identity() != step.identity():
                    errors.append(f"{step} writes {p}, which {other} already wrote from other inputs")
                written[p] = step
    assert not errors, "\n".join(errors)


def test_walkthrough_writes_are_used():
    """What a step writes is read by a later step of its block, or by a step of another block (blocks 2 and 3
    run block 1's steps another way), or is a final product."""
    steps = [(n, i, s) for n, block in enumerate(WALK) for i, s in enumerate(block)]
    errors = []
    for n, i, step in steps:
        for p in step.writes:
            readers = [o for m, k, o in steps if (m != n or k > i) and o.module not in CHECKERS
                       and p not in o.writes and any(under(r, [p]) for r in o.reads)]
            if not readers and p not in FINAL:
                errors.append(f"{step} writes {p}, which no later command reads (and it is not a final product)")
    assert not errors, "\n".join(errors)


def test_downloads_are_documented():
    prose = README.split(f"## {SECTION}", 1)[1].split("\n## ", 1)[0]
    missing = [d for d in DOWNLOADS if d not in prose]
    assert not missing, f"'## {SECTION}' does not tell the user to download {missing}"


def test_configs_named_in_readme_and_docstrings_exist():
    texts = {"README.md": README}
    for pkg in ("data_prep", "train", "eval"):
        texts.update({str(p.relative_to(REPO)): p.read_text() for p in (REPO / pkg).rglob("*.py")})
    missing = [f"{name}: {m}" for name, text in texts.items()
               for m in re.findall(r"configs/[\w./-]+\.(?:yaml|json)", text) if not (REPO / m).is_file()]
    assert not missing, "config files named but missing:\n" + "\n".join(missing)
    problems = [x for s in ALL_README for x in s.problems]
    assert ALL_README and not problems, "README commands whose configs do not load:\n" + "\n".join(problems)


SHIPPED = sorted(p for d in ("clip", "instruct", "preference", "data", "suite", "demo") for p in (REPO / "configs" / d).rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_config_reads_what_a_documented_command_writes(path):
    """A shipped config reads a download, a repo file, a hub id, or what a README command (or a
    data_prep command in the config's own header comment) writes."""
    comments = "\n".join(l.lstrip("#") for l in path.read_text().splitlines() if l.lstrip().startswith("#"))
    written = [p for s in ALL_README + parse_commands(comments) for p in s.writes]
    reads, _ = config_paths(load_config(schema_for(path), path))
    bad = [p for p in reads if not available(p, written)]
    assert not bad, f"{path.relative_to(REPO)} reads {bad}: no README command writes them and they are not downloads"
