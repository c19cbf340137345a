"""Configs: every YAML under configs/ loads into its dataclass; bad keys are clear errors (exit 2)."""
from pathlib import Path

import pytest

from conftest import REPO
from vlm.config import ConfigError, load_config
from vlm.data.concepts import VocabularyConfig
from vlm.data.shards import DataConfig


def schema_for(path: Path) -> type:
    """The dataclass a YAML under configs/<kind>/ is validated against (the entry point that reads it)."""
    from train.config import ClipRunConfig, InstructRunConfig
    from train.preference import PreferenceRunConfig
    from eval.prompts import EvalPrompts
    from eval.suite import SuiteConfig
    from vlm.zeroshot import PromptConfig

    schemas = {"data": DataConfig, "concepts": VocabularyConfig, "clip": ClipRunConfig, "prompts": PromptConfig,
               "instruct": InstructRunConfig, "eval": EvalPrompts, "suite": SuiteConfig,
               "preference": PreferenceRunConfig}
    kind = Path(path).parent.name
    if kind in ("demo", "tiny"):  # make demo's stage configs, one of each kind: by file name
        kind = {"clip": "clip", "stage1": "instruct", "stage2": "instruct", "suite": "suite", "preference": "preference",
                "suite_preference": "suite"}.get(Path(path).stem, kind)
    if kind not in schemas:
        raise ConfigError(f"{path}: no schema for configs/{kind}/ (known: {sorted(schemas)})")
    return schemas[kind]

YAMLS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(YAMLS) >= 3


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(REPO)) for p in YAMLS])
def test_every_yaml_loads(path):
    cfg = load_config(schema_for(path), path)
    assert cfg is not None


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(DataConfig, REPO / "configs/data/demo.yaml",
                      ["batch_size=7", "image.size=96", "sources.0.path=/x", "image.mean=[0.5,0.5,0.5]"])
    assert cfg.batch_size == 7 and cfg.image.size == 96 and cfg.sources[0].path == "/x"
    assert cfg.image.mean == [0.5, 0.5, 0.5]


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 4\nshufle_buffer: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, bad)
    assert "shufle_buffer" in str(e.value) and str(bad) in str(e.value)


def test_nested_unknown_key_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="image.nope"):
        load_config(DataConfig, None, ["image.nope=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(DataConfig, None, ["batch_size=many"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(DataConfig, None, ["--batch_size=3"])


def test_post_init_validation_is_a_config_error(tmp_path):
    bad = tmp_path / "v.yaml"
    bad.write_text("batch_size: 0\n")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        load_config(DataConfig, bad)


def test_entry_point_exits_2_and_writes_nothing(tmp_path, capsys):
    from data_prep.stream import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{path: nowhere}]\nbatch_sise: 3\n")
    before = set(tmp_path.iterdir())
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "batch_sise" in err and str(bad) in err
    assert set(tmp_path.iterdir()) == before


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(DataConfig, tmp_path / "nope.yaml")


def test_schema_for_unknown_folder(tmp_path):
    with pytest.raises(ConfigError, match="no schema"):
        schema_for(Path("configs/whatever/x.yaml"))


def test_base_files_merge_underneath(tmp_path):
    (tmp_path / "a.yaml").write_text("batch_size: 4\nimage:\n  size: 96\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("_base_: ../a.yaml\nimage:\n  mean: [0.1, 0.2, 0.3]\n")
    cfg = load_config(DataConfig, tmp_path / "sub" / "b.yaml", ["batch_size=5"])
    assert (cfg.batch_size, cfg.image.size, cfg.image.mean) == (5, 96, [0.1, 0.2, 0.3])
    (tmp_path / "a.yaml").write_text("_base_: sub/b.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(DataConfig, tmp_path / "sub" / "b.yaml")
    (tmp_path / "c.yaml").write_text("_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(DataConfig, tmp_path / "c.yaml")
