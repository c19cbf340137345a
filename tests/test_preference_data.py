"""data_prep.shards --format preference: good pairs in every prompt and image form become samples with the exact
metadata the preference trainer reads; one bad record per skip reason is counted under that reason, exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import stand_in_images
from data_prep.shards import main as shards_main
from vlm.data.schema import read_manifest
from vlm.data.shards import DataConfig, ShardLoader, SourceConfig
from vlm.data.transforms import ImageConfig

SYSTEM = {"from": "system", "value": "You are a radiology assistant."}

GOOD = [  # (record, its key, the conversations its sample must carry, number of images)
    ({"id": "single", "image": "a.png", "prompt": "Describe the finding.", "chosen": "A 2 cm nodule in the left lung.",
      "rejected": "A mass in the right lung, larger than on the prior exam.", "modality": "xray", "grader": "rad1"},
     "preference-single", [{"from": "human", "value": "<image>\nDescribe the finding."}], 1),
    ({"id": 7, "images": ["a.png", "b.png"], "prompt": "Compare the two views.", "chosen": "No change.",
      "rejected": "New effusion."},
     "preference-7", [{"from": "human", "value": "<image>\n<image>\nCompare the two views."}], 2),
    ({"id": "multi turn", "image": ["c.png"], "conversations": [
        SYSTEM, {"from": "human", "value": "What modality is this?"}, {"from": "gpt", "value": "A chest X-ray."},
        {"from": "human", "value": "Which side is the nodule on?"}], "chosen": "Left.", "rejected": "Right."},
     "preference-multi_turn", [SYSTEM, {"from": "human", "value": "<image>\nWhat modality is this?"},
                               {"from": "gpt", "value": "A chest X-ray."},
                               {"from": "human", "value": "Which side is the nodule on?"}], 1),
    ({"id": "placed", "images": "b.png", "prompt": "Look at <image> and say: is there an effusion?",
      "chosen": "No.", "rejected": "Yes, a large one."},
     "preference-placed", [{"from": "human", "value": "Look at <image> and say: is there an effusion?"}], 1),
    ({"image": "c.png", "prompt": "Any fracture?", "chosen": "No fracture.", "rejected": "A rib fracture."},
     "preference-4", [{"from": "human", "value": "<image>\nAny fracture?"}], 1),  # no id: its position (4)
]


def pair(**kw) -> dict:
    base = {"image": "a.png", "prompt": "Is the heart enlarged?", "chosen": "No.", "rejected": "Yes."}
    return {k: v for k, v in (base | kw).items() if v is not ...}


BAD = [  # (the line as written, skip reason, the offender the summary names it by)
    ("[1, 2]", "bad_row", "line {n} (a list, not an object)"),
    (pair(id=["x"]), "bad_row", "line {n} (id is a list, not a string)"),
    (pair(id="num", chosen=3), "bad_row", "line {n} (id num) (chosen is a number, not a string)"),
    (pair(id="both", images=["b.png"]), "bad_row", "line {n} (id both) (image and images are both given; use one)"),
    (pair(id="ends", prompt=..., conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]),
     "bad_conversation", "line {n} (id ends) (the last turn is not a human turn with text)"),
    (pair(id="robot", prompt=..., conversations=[{"from": "robot", "value": "q"}]),
     "bad_conversation", "line {n} (id robot) (turn 0 is not an object with a known from and a string value)"),
    (pair(id="noprompt", prompt=...), "bad_conversation", "line {n} (id noprompt) (no prompt or conversations)"),
    (pair(id="norej", rejected=...), "missing_response", "line {n} (id norej) (no rejected)"),
    (pair(id="blank", chosen="  \n"), "empty_response", "line {n} (id blank) (chosen is blank)"),
    (pair(id="same", chosen="No. ", rejected=" No."), "identical_pair", "line {n} (id same)"),
    (pair(id="noimg", image=...), "text_only", "line {n} (id noimg)"),
    (pair(id="escape", image="../outside.png"), "outside_root", "line {n} (id escape)"),
    (pair(id="count", image=..., images=["a.png", "b.png"], prompt="<image>\nCompare."), "image_token_mismatch",
     "line {n} (id count) (1 placeholder(s) for 2 image(s))"),
    (pair(id="inanswer", rejected="Yes, see <image>."), "image_token_mismatch",
     "line {n} (id inanswer) (an image placeholder in rejected)"),
    (pair(id="gone", image="gone.png"), "missing_image", "line {n} (id gone)"),
    (pair(id="notes", image="notes.png"), "bad_image", "line {n} (id notes) (cannot identify image file)"),
]
SKIPPED = {"bad_row": 4, "bad_conversation": 3, "missing_response": 1, "empty_response": 1, "identical_pair": 1,
           "text_only": 1, "outside_root": 1, "image_token_mismatch": 2, "missing_image": 1, "bad_image": 1}


@pytest.fixture
def data(tmp_path) -> Path:
    """tmp/data: the stand-in images, a text file named .png; tmp/outside.png beside (not in) the root."""
    root = tmp_path / "data"
    stand_in_images(root, ["a.png", "b.png", "c.png"])
    stand_in_images(tmp_path, ["outside.png"])
    (root / "notes.png").write_text("not an image")
    return root


def run(path: Path, out: Path, *extra) -> tuple[int, dict]:
    rc = shards_main(["--format", "preference", "--input", str(path), "--image-root", str(path.parent), "--out",
                      str(out), "--workers", "0", "--quiet", *extra])
    return rc, read_manifest(out).extra["summary"]


def read_back(out: Path) -> dict[str, dict]:
    """Every sample through the training data pipeline: key -> {meta, text, images (primary first)}."""
    cfg = DataConfig(sources=[SourceConfig(path=str(out))], batch_size=4, num_workers=0, require_text=False,
                     shuffle_buffer=0, image=ImageConfig(size=16))
    got = {}
    for batch in ShardLoader(cfg):
        views = batch.get("views", [[]] * len(batch["keys"]))
        for k, key in enumerate(batch["keys"]):
            got[key] = {"meta": batch["meta"][k], "text": batch["texts"][k], "images": [batch["images"][k], *views[k]]}
    return got


def test_good_pairs_and_every_skip_reason(tmp_path, data):
    """Good records first (the record without an id is at position 4: its key), then one bad line per case."""
    lines = [json.dumps(r) for r, *_ in GOOD] + [b if isinstance(b, str) else json.dumps(b) for b, *_ in BAD]
    (data / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    rc, s = run(data / "pairs.jsonl", tmp_path / "out")
    assert rc == 0
    assert (s["read"], s["written"], s["skipped"]) == (len(lines), len(GOOD), SKIPPED)
    offenders: dict[str, list[str]] = {}
    for n, (_, reason, label) in enumerate(BAD, len(GOOD) + 1):
        offenders.setdefault(reason, []).append(label.format(n=n))
    assert s["offenders"] == offenders

    got = read_back(tmp_path / "out")
    assert sorted(got) == sorted(key for _, key, _, _ in GOOD)
    for rec, key, conv, n_images in GOOD:
        sample = got[key]
        names = rec.get("images", rec.get("image"))
        expect = {"source": "preference", "modality": rec.get("modality", "unknown"), "split": "train",
                  "image_names": names if isinstance(names, list) else [names], "conversations": conv,
                  "chosen": rec["chosen"], "rejected": rec["rejected"]}
        if "grader" in rec:
            expect["grader"] = rec["grader"]  # the record's other keys are kept
        if n_images > 1:
            expect["num_images"] = n_images
        assert sample["meta"] == expect, key
        assert sample["text"] == rec["chosen"]
        assert len(sample["images"]) == n_images and all(im.shape == (3, 16, 16) for im in sample["images"])
    # a.png and b.png are different stand-ins: the two views of record 7 decode to different tensors, in order
    assert not torch.equal(*got["preference-7"]["images"])
    assert torch.equal(got["preference-7"]["images"][0], got["preference-single"]["images"][0])


def test_json_list_input_and_source_name(tmp_path, data):
    """A JSON list works too (offenders named ``record N``, 0-based); --source-name prefixes keys and meta."""
    records = [r for r, *_ in GOOD[:2]] + [pair(id="same", chosen="A", rejected="A"), "text"]
    (data / "pairs.json").write_text(json.dumps(records))
    rc, s = run(data / "pairs.json", tmp_path / "out", "--source-name", "rad_dpo", "--split", "val")
    assert rc == 0
    assert (s["written"], s["skipped"]) == (2, {"identical_pair": 1, "bad_row": 1})
    assert s["offenders"] == {"identical_pair": ["record 2 (id same)"],
                              "bad_row": ["record 3 (a string, not an object)"]}
    got = read_back(tmp_path / "out")
    assert sorted(got) == ["rad_dpo-7", "rad_dpo-single"]
    meta = got["rad_dpo-7"]["meta"]
    assert (meta["source"], meta["split"], meta["conversations"], meta["rejected"]) == (
        "rad_dpo", "val", GOOD[1][2], "New effusion.")


def test_not_a_preference_file_is_one_line_error(tmp_path, data, capsys):
    """A LLaVA file given as preference: refused before anything is written (exit 2, one line naming the file)."""
    llava = [{"id": "q", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                             {"from": "gpt", "value": "a"}]}]
    (data / "llava.json").write_text(json.dumps(llava))
    rc = shards_main(["--format", "preference", "--input", str(data / "llava.json"), "--out", str(tmp_path / "out"),
                      "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines() == [
        f"error: {data / 'llava.json'}: no 'chosen' or 'rejected' key in the first records; is this a preference file?"]
    assert not (tmp_path / "out").exists()
