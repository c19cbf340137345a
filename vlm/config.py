"""Typed configuration: YAML files plus dotted ``key=value`` overrides -> dataclasses.

Every component owns one dataclass whose fields are documented and validated in
``__post_init__``. OmegaConf's structured configs do the merging and type checking, so a
YAML key or an override that the dataclass does not declare is an error naming the key and
the file (litgpt and torchtitan behave the same way). Entry points turn ``ConfigError`` into
exit code 2 before anything is written.

    cfg = load_config(DataConfig, "configs/data/demo.yaml", ["batch_size=64", "shuffle.buffer=500"])

A file may start from other files: ``_base_: ../instruct/demo_stage1.yaml`` (a path relative to the
file, or a list of them, merged in order) and then sets only what differs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the file."""

    exit_code = 2


def _describe(err: OmegaConfBaseException) -> str:
    # OmegaConf messages carry 'full_key: ...' lines; keep the first line and the key.
    msg = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{msg} (key: {key})" if key and key not in msg else msg


def parse_overrides(overrides: Sequence[str]) -> list[str]:
    """Validate ``key=value`` overrides; ``--key=value`` and ``key value`` forms are rejected clearly."""
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        out.append(item)
    return out


def yaml_error_line(e: Exception) -> str:
    """A YAML error in one line: where (line, column) and what."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"not valid YAML ({where}{what})"


def _read_yaml(path: Path, chain: tuple = ()) -> dict:
    """A YAML mapping with its ``_base_`` files merged underneath (relative paths, no cycles)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the _base_ of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(map(str, chain))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {yaml_error_line(e)}") from None
    except RecursionError:  # a self-referencing alias (a: &a [*a])
        raise ConfigError(f"{path}: not valid YAML (a recursive alias)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", None) or []
    merged = OmegaConf.create({})
    for b in [bases] if isinstance(bases, str) else bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / b, (*chain, path.resolve())))
    return OmegaConf.to_container(OmegaConf.merge(merged, OmegaConf.create(data)))


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then the overrides."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    base = OmegaConf.structured(cls)
    where = "the defaults"
    try:
        if path is not None:
            path = Path(path)
            where = str(path)
            base = OmegaConf.merge(base, OmegaConf.create(_read_yaml(path)))
        for item in parse_overrides(overrides):
            where = f"the command line ({item})"
            key, value = item.split("=", 1)
            # yaml parsing gives numbers, booleans, null and [lists]; list items by index: sources.0.path=...
            OmegaConf.update(base, key, yaml.safe_load(value) if value else value, merge=True)
        where = (str(path) if path is not None else "the defaults") + (" with the overrides" if overrides else "")
        obj = OmegaConf.to_object(base)
    except ConfigError:
        raise
    except RecursionError:  # a YAML alias that contains itself (a: &a [*a])
        raise ConfigError(f"{where}: not valid YAML (a recursive alias)") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None
    except (ValueError, TypeError) as e:  # raised by a dataclass's __post_init__
        raise ConfigError(f"{where}: {e}") from None
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for logging and for saving beside checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_parser(prog: str, doc: str, example: str):
    """The entry points' shared command line: ``--config FILE`` plus dotted ``key=value`` overrides.
    (Built here, parsed by the entry point: the library never reads argv.)"""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a run config YAML")
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    return p
