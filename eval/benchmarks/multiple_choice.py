"""Multiple-choice medical VQA benchmarks, read from their official releases as downloaded.

- ``omnimedvqa`` (Hu et al., CVPR 2024): the release folder with ``QA_information/Open-access/<dataset>.json``
  (split ``open_access``, the default; ``restricted_access`` reads ``Restricted-access/``) and ``Images/``. Records:
  question_id, question, option_A..option_D (2 to 4 of them), gt_answer (the right option's text), question_type,
  modality_type, dataset, image_path (relative to the release folder).
- ``pmc_vqa`` (Zhang et al. 2023): ``test_clean.csv`` (split ``test_clean``, the default: the 2,000 questions the
  paper reports) or ``test.csv`` (split ``test``), columns Figure_path, Question, Answer, Choice A..Choice D (each
  written "A:text"), Answer_label; images in ``images/`` (or ``figures/``). The question id is the data row's
  position in the CSV (0-based): the release has none. Version 2's ``test_2.csv`` (split ``test_2``: index,
  Figure_path, Caption, Question, A..D, Answer as a letter) is read too, its ``index`` the question id.
- ``mmmu_med`` (Yue et al., CVPR 2024): the Hugging Face parquet release of MMMU, the validation split (the test
  split's answers are hidden) of the five Health & Medicine subjects (``<Subject>/validation-*.parquet``: 150
  questions); columns id, question (with ``<image k>`` references), options (a Python list written as a string),
  answer (a letter; for the few open questions the answer text), question_type (multiple-choice | open),
  image_1..image_7 (bytes), img_type, subfield, topic_difficulty. The images shown are those the question and
  its options refer to, in order. Scored strictly and with MMMU's own parsing (the ``compat`` block).
- ``medxpertqa_mm`` (Zuo et al., ICML 2025): ``MM/test.jsonl`` (split ``test``; ``dev`` reads ``MM/dev.jsonl``),
  records id, question (ending with "Answer Choices: (A) ..."; that part is dropped, as the prompt lists the
  options), options ({letter: text}, 5 of them), label (a letter), images (file names in ``images/``),
  medical_task, body_system, question_type.
"""
from __future__ import annotations

import ast
import re
from typing import Iterator

from eval.benchmarks.base import BenchmarkError, image_inside, require
from eval.benchmarks.choice import (ChoiceBenchmark, ChoiceItem, csv_rows, letter_of, letter_options,
                                    options_from_dict, read_jsonl)
from vlm.data.formats import load_json_file, parquet_image, read_parquet_file


class OmniMedVQA(ChoiceBenchmark):
    name = "omnimedvqa"
    default_split = "open_access"
    splits = ("open_access", "restricted_access")

    def read(self) -> Iterator[ChoiceItem]:
        folder = "Open-access" if self.split == "open_access" else "Restricted-access"
        if self.root.is_file():  # one data set's JSON: <release>/QA_information/<access>/<dataset>.json
            path = self.root.resolve()
            if len(path.parents) < 3 or path.parents[1].name != "QA_information":
                raise BenchmarkError(f"omnimedvqa: {self.root} is not inside the release's QA_information/<access>/ "
                                     "folder, so its image paths have no root; give the release folder")
            files, release = [self.root], path.parents[2]
        else:
            files, release = sorted((self.root / "QA_information" / folder).glob("*.json")), self.root
            if not files:
                raise BenchmarkError(f"omnimedvqa: no QA_information/{folder}/*.json in {self.root} (the release "
                                     "folder as downloaded)")
        for path in files:
            data = load_json_file(path)
            if not isinstance(data, list):
                raise BenchmarkError(f"{path}: expected a list of question records")
            for i, r in enumerate(data):
                where = f"{path}: record {i}"
                require(r, ("question_id", "question", "gt_answer", "image_path", "option_A", "option_B"), where)
                options = letter_options([r[f"option_{k}"] for k in "ABCDEFGH" if r.get(f"option_{k}") is not None],
                                         where)
                yield ChoiceItem(r["question_id"], str(r["question"]), options,
                                 letter_of(options, str(r["gt_answer"]), where),
                                 images=[image_inside(release, str(r["image_path"]), where)],
                                 categories={"question_type": r.get("question_type"),
                                             # one release file writes 'modality' instead of 'modality_type'
                                             "modality": r.get("modality_type") or r.get("modality"),
                                             "dataset": r.get("dataset")})


_PMC_PREFIX = re.compile(r"^\s*([A-D])\s*:\s*")


class PMCVQA(ChoiceBenchmark):
    name = "pmc_vqa"
    default_split = "test_clean"
    splits = ("test_clean", "test", "test_2")

    def read(self) -> Iterator[ChoiceItem]:
        path = self.find(f"{self.split}.csv")
        images = next((self.root / d for d in ("images", "figures") if (self.root / d).is_dir()),
                      path.parent / "images")
        rows = csv_rows(path)
        cols = next(rows)[1]
        # version 1 (test_clean.csv, test.csv): "Choice A".."Choice D" written "A:text", Answer_label the letter;
        # version 2 (test_2.csv): index, Caption, A..D plain, Answer the letter
        v2 = "Choice A" not in cols and "index" in cols
        need = (["index", "Figure_path", "Question", "A", "B", "C", "D", "Answer"] if v2 else
                ["Figure_path", "Question", "Answer_label", *(f"Choice {k}" for k in "ABCD")])
        missing = [c for c in need if c not in cols]
        if missing:
            raise BenchmarkError(f"{path}: no column {missing} (PMC-VQA's {self.split}.csv has {need})")
        for i, (line, r) in enumerate(rows):
            where = f"{path}: line {line}"
            values = []
            for k in "ABCD":
                text = (r[k] if v2 else r[f"Choice {k}"]) or ""
                m = _PMC_PREFIX.match(text)
                if m and m.group(1) != k:
                    raise BenchmarkError(f"{where}: the text of option {k} is written as option {m.group(1)}")
                values.append(text[m.end():] if m else text)
            options = letter_options(values, where)
            label = ((r["Answer"] if v2 else r["Answer_label"]) or "").strip()
            if label not in options:
                raise BenchmarkError(f"{where}: the answer letter {label!r} is not one of A-D")
            yield ChoiceItem(r["index"] if v2 else i, (r["Question"] or "").strip(), options, label,
                             images=[image_inside(images, (r["Figure_path"] or "").strip(), where)])


MMMU_MED_SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
                     "Public_Health")
_IMAGE_REF = re.compile(r"<image (\d+)>")


def literal_list(text, where: str) -> list:
    """A list written as a Python literal (MMMU's options, some open answers): parsed, never evaluated."""
    if isinstance(text, list):
        return text
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError):
        raise BenchmarkError(f"{where}: {str(text)[:80]!r} is not a list literal") from None
    if not isinstance(value, list):
        raise BenchmarkError(f"{where}: {str(text)[:80]!r} is not a list")
    return value


class MMMUMed(ChoiceBenchmark):
    name = "mmmu_med"
    default_split = "validation"
    splits = ("validation", "dev")
    compat = "mmmu"

    def read(self) -> Iterator[ChoiceItem]:
        found = 0
        for subject in MMMU_MED_SUBJECTS:
            for path in sorted((self.root / subject).glob(f"{self.split}-*.parquet")):
                found += 1
                for i, r in enumerate(read_parquet_file(path)):
                    yield self._item(r, f"{path}: row {i}", subject)
        if not found:
            raise BenchmarkError(f"mmmu_med: no <Subject>/{self.split}-*.parquet of {list(MMMU_MED_SUBJECTS)} in "
                                 f"{self.root} (MMMU's Hugging Face release as downloaded)")

    @staticmethod
    def _item(r: dict, where: str, subject: str) -> ChoiceItem:
        require(r, ("id", "question", "options", "answer", "question_type"), where)
        text = str(r["question"])
        raw_options = literal_list(r["options"], where + ": options")
        # the images the question and its options refer to (<image k>), in the order of first reference; an image
        # only the explanation names is not shown. A question naming none gets image_1 (as MMMU's LLaVA script
        # passes image_1 alone, always)
        refs = []
        for k in map(int, _IMAGE_REF.findall(text + " " + " ".join(map(str, raw_options)))):
            if k not in refs:
                refs.append(k)
        if not refs and parquet_image(r, "image_1") is not None:
            refs = [1]
        images = []
        for k in refs:
            b = parquet_image(r, f"image_{k}")
            if b is None:
                raise BenchmarkError(f"{where}: refers to <image {k}> but image_{k} is empty")
            images.append(b)
        cats = {"subject": subject, "subfield": r.get("subfield"), "img_type": _img_type(r.get("img_type")),
                "difficulty": r.get("topic_difficulty")}
        if r["question_type"] != "multiple-choice":  # "open" (MMMU's short-answer questions), scored as theirs
            answer = str(r["answer"])
            answers = [str(a) for a in literal_list(answer, where + ": answer")] if answer.startswith("[") else [answer]
            return ChoiceItem(r["id"], text, {}, answers[0], images, kind="open", answers=answers, categories=cats)
        options = letter_options(raw_options, where)
        return ChoiceItem(r["id"], text, options, letter_of(options, str(r["answer"]), where), images,
                          categories=cats)


def _img_type(value) -> str:
    """MMMU's img_type is a list written as a string ("['Body Scans: MRI, CT scans']"): the first entry."""
    if not value:
        return ""
    try:
        v = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return str(value)
    return str(v[0]) if isinstance(v, list) and v else str(v)


class MedXpertQAMM(ChoiceBenchmark):
    name = "medxpertqa_mm"
    splits = ("test", "dev")

    def read(self) -> Iterator[ChoiceItem]:
        path = self.find(f"MM/{self.split}.jsonl", f"{self.split}.jsonl")
        images = next((d for d in (self.root / "images", path.parent / "images", path.parent.parent / "images")
                       if d.is_dir()), self.root / "images")
        for n, r in read_jsonl(path):
            where = f"{path}: line {n}"
            require(r, ("id", "question", "options", "label", "images"), where)
            if not isinstance(r["images"], list):
                raise BenchmarkError(f"{where}: 'images' must be a list of file names")
            options = options_from_dict(r["options"], where)
            # the release writes the options into the question too ("...\nAnswer Choices: (A) ... (B) ..."); the
            # prompt lists them once, in the documented format (configs/eval/prompts.yaml)
            question = str(r["question"]).split("\nAnswer Choices:")[0].rstrip()
            yield ChoiceItem(r["id"], question, options, letter_of(options, str(r["label"]), where),
                             images=[image_inside(images, str(p), where) for p in r["images"]],
                             categories={"medical_task": r.get("medical_task"), "body_system": r.get("body_system"),
                                         "question_type": r.get("question_type")})
