"""Remote code: no entry point runs Python shipped in a model, tokenizer or processor folder, even when a
`y` waits on stdin (transformers' prompt would read it), and every from_pretrained passes trust_remote_code."""
from __future__ import annotations

import ast
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm.models.tiny import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = "from pathlib import Path\nPath({mark!r}).write_text('remote code ran')\n"


def test_every_from_pretrained_passes_trust_remote_code_false(drill):
    """A scan of the source: each call of a `from_pretrained` attribute names trust_remote_code=False."""
    offenders, calls = [], 0
    for wing in ("vlm", "train", "eval", "data_prep", "bench"):
        for path in sorted((REPO / wing).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "from_pretrained":
                    calls += 1
                    kw = {k.arg: k.value for k in node.keywords}
                    value = kw.get("trust_remote_code")
                    if not (isinstance(value, ast.Constant) and value.value is False):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    with drill.hole(f"source scan: {calls} from_pretrained calls"):
        assert calls >= 10 and offenders == []


def evil_folder(folder: Path, mark: Path, kind: str) -> Path:
    """A folder whose config asks transformers to import its own evil.py (which leaves ``mark``)."""
    folder.mkdir(parents=True)
    (folder / "evil.py").write_text(PAYLOAD.format(mark=str(mark)))
    if kind == "tokenizer":
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    else:
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "evil", "architectures": ["EvilModel"],
             "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                          "AutoModelForCausalLM": "evil.EvilModel", "AutoModelForImageTextToText": "evil.EvilModel"}}))
    return folder


def good_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def open_clip_folder(folder: Path, text_tower: Path) -> Path:
    """An open_clip export whose Hugging Face text tower (and tokenizer) is ``text_tower``."""
    arch = json.loads((REPO / "configs/model/tiny-vit-hftext.json").read_text())
    arch.pop("_comment", None)
    arch["text_cfg"]["hf_model_name"] = arch["text_cfg"]["hf_tokenizer_name"] = str(text_tower)
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch, "preprocess_cfg": {}}))
    return folder


def evil_export(folder: Path, mark: Path, how: str) -> Path:
    """A complete-looking open_clip export whose own folder carries the code: stock open_clip loads the tokenizer
    from the export folder and passes ``tokenizer_kwargs`` to from_pretrained as they are."""
    arch = json.loads((REPO / "configs/model/tiny-vit-hftext.json").read_text())
    arch.pop("_comment", None)
    arch["text_cfg"]["hf_model_name"] = arch["text_cfg"]["hf_tokenizer_name"] = "innocent/tokenizer"
    if how == "tokenizer_kwargs":
        arch["text_cfg"]["tokenizer_kwargs"] = {"trust_remote_code": True}
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": arch, "preprocess_cfg": {}}))
    (folder / "evil.py").write_text(PAYLOAD.format(mark=str(mark)))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    return folder


def entry_points(tmp: Path, mark: Path):
    """(case, module, argv) for every entry point that loads a Hugging Face folder."""
    vlm = evil_folder(tmp / "evil_vlm", mark, "model")
    tok = evil_folder(tmp / "evil_tok", mark, "tokenizer")
    clip = open_clip_folder(tmp / "clip_export", vlm)
    arch = json.loads((clip / "open_clip_config.json").read_text())["model_cfg"]
    arch_tok = json.loads(json.dumps(arch))
    arch_tok["text_cfg"]["hf_model_name"] = str(good_bert(tmp / "bert"))  # only the tokenizer is evil
    arch_tok["text_cfg"]["hf_tokenizer_name"] = str(tok)
    (tmp / "arch.json").write_text(json.dumps(arch))
    (tmp / "arch_tok.json").write_text(json.dumps(arch_tok))
    img = tmp / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    slake = REPO / "tests/fixtures/slake"
    clip_args = ["--config", str(REPO / "configs/clip/demo.yaml"), f"data.sources.0.path={tmp / 'no_shards'}",
                 f"train.output_dir={tmp / 'run'}", "train.progress=false", "zeroshot=[]"]
    instruct = ["--config", str(REPO / "configs/instruct/demo_stage2.yaml"), f"train.output_dir={tmp / 'run2'}",
                "model.init_from=null", f"data.sources.0.path={tmp / 'no_shards'}", "train.progress=false"]
    good_tok = tmp / "tok"
    train_tokenizer("llama3").save_pretrained(good_tok)
    export_kw = evil_export(tmp / "export_kw", mark, "tokenizer_kwargs")
    export_map = evil_export(tmp / "export_map", mark, "auto_map")
    return [
        ("eval.ask open_clip export, tokenizer_kwargs trust_remote_code", "eval.ask",
         ["--model", str(export_kw), "--image", str(img), "--labels", "a,b"]),
        ("eval.ask open_clip export with auto_map", "eval.ask",
         ["--model", str(export_map), "--image", str(img), "--labels", "a,b"]),
        ("eval.zeroshot open_clip export with auto_map", "eval.zeroshot",
         ["--checkpoint", str(export_map), "--folder", str(tmp), "--out", str(tmp / "zs2"), "--prompts",
          str(REPO / "configs/prompts/synth_modality.yaml")]),
        ("eval.ask transformers folder", "eval.ask", ["--model", str(vlm), "--image", str(img), "--question", "q"]),
        ("eval.ask open_clip HF text tower", "eval.ask", ["--model", str(clip), "--image", str(img), "--labels", "a,b"]),
        ("eval.vqa generate assistant loader", "eval.vqa",
         ["generate", "--checkpoint", str(vlm), "--benchmark", "slake", "--data-root", str(slake),
          "--split", "validate", "--out", str(tmp / "p.jsonl")]),
        ("eval.zeroshot open_clip HF text tower", "eval.zeroshot",
         ["--checkpoint", str(clip), "--folder", str(tmp), "--out", str(tmp / "zs"), "--prompts",
          str(REPO / "configs/prompts/synth_modality.yaml")]),
        ("train.clip HF text tower", "train.clip", [*clip_args, f"model.name={tmp / 'arch.json'}"]),
        ("train.clip HF tokenizer", "train.clip", [*clip_args, f"model.name={tmp / 'arch_tok.json'}"]),
        ("train.instruct model.vision", "train.instruct", [*instruct, f"model.vision={vlm}",
                                                            f"model.tokenizer={good_tok}"]),
        ("train.instruct model.llm", "train.instruct", [*instruct, f"model.llm={vlm}", f"model.tokenizer={vlm}"]),
        ("train.instruct model.tokenizer", "train.instruct", [*instruct, f"model.tokenizer={tok}"]),
        ("train.rehearse model.llm", "train.rehearse",
         ["--config", str(REPO / "configs/instruct/demo_stage2.yaml"), f"model.llm={vlm}",
          f"model.tokenizer={vlm}", f"data.sources.0.path={tmp}", "--workdir", str(tmp / "reh")]),
    ]


CASES = [
    "eval.ask open_clip export, tokenizer_kwargs trust_remote_code", "eval.ask open_clip export with auto_map",
    "eval.zeroshot open_clip export with auto_map",
    "eval.ask transformers folder", "eval.ask open_clip HF text tower", "eval.vqa generate assistant loader",
    "eval.zeroshot open_clip HF text tower", "train.clip HF text tower", "train.clip HF tokenizer",
    "train.instruct model.vision", "train.instruct model.llm", "train.instruct model.tokenizer",
    "train.rehearse model.llm"]


@pytest.mark.parametrize("case", CASES)
def test_auto_map_folder_is_refused_by_every_entry_point(case, tmp_path, monkeypatch, capsys, drill):
    import importlib

    mark = tmp_path / "REMOTE_CODE_RAN"
    found = {c: (m, a) for c, m, a in entry_points(tmp_path, mark)}
    module, argv = found[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 8))  # what `echo y |` gives transformers' prompt
    monkeypatch.syspath_prepend(str(tmp_path))
    with drill.hole(f"auto_map folder + 'y' on stdin: {case}"):
        rc = importlib.import_module(module).main(argv)
        err = capsys.readouterr().err
        assert not mark.exists(), "the folder's Python ran"
        assert rc == 2, err[-2000:]
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and ("declares auto_map" in lines[0] or "declares trust_remote_code" in lines[0]) \
            and "never runs code" in lines[0], err[-2000:]
