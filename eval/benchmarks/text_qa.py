"""Text-only medical QA benchmarks (no images), through the same harness and strict scorer: what a tuned
assistant's language model still knows, beside its base LLM (``eval.vqa generate --llm-only``).

- ``medqa`` (Jin et al. 2021, USMLE): the release's ``data_clean/questions/US/4_options/
  phrases_no_exclude_test.jsonl`` (split ``test``: 1,273 questions with 4 options; ``test5`` reads the 5-option
  ``US/test.jsonl``); records question, options ({letter: text}), answer_idx (a letter), answer (its text),
  meta_info. The question id is the line's position (0-based): the release has none.
- ``medmcqa`` (Pal et al. 2022): ``dev.json`` (JSON lines; split ``dev``: 4,183 questions; the test split's
  answers are hidden), records id, question, opa..opd, cop (the right option, 1-based: 1 = opa), choice_type,
  subject_name, topic_name; or the Hugging Face parquet (``validation`` split, cop 0-based), read as such.
- ``pubmedqa`` (Jin et al. 2019, PQA-L): ``ori_pqal.json`` ({PMID: {QUESTION, CONTEXTS, final_decision, ...}}) and
  the official test split's ``test_ground_truth.json`` ({PMID: yes|no|maybe}, 500 entries): split ``test`` is
  those PMIDs (``all``: the 1,000). Options yes / no / maybe; the abstract (CONTEXTS without the conclusion) is the
  context.
- ``mmlu_med`` (Hendrycks et al. 2021): the medical subjects anatomy, clinical_knowledge, college_biology,
  college_medicine, medical_genetics, professional_medicine (1,089 test questions), from the original release
  (``data/test/<subject>_test.csv``: headerless rows question, A, B, C, D, answer letter) or the Hugging Face
  parquet (``<subject>/test-*.parquet``: question, subject, choices, answer 0-3). Question id: subject/row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from eval.benchmarks.base import BenchmarkError, require
from eval.benchmarks.choice import (LETTERS, ChoiceBenchmark, ChoiceItem, csv_rows, letter_of, letter_options,
                                    options_from_dict, read_jsonl)
from vlm.data.formats import load_json_file, read_parquet_file


class MedQA(ChoiceBenchmark):
    name = "medqa"
    splits = ("test", "test5", "dev", "train")
    has_images = False

    def read(self) -> Iterator[ChoiceItem]:
        if self.split == "test5":
            path = self.find("data_clean/questions/US/test.jsonl", "questions/US/test.jsonl", "US/test.jsonl",
                             "test.jsonl")
        else:
            name = f"phrases_no_exclude_{self.split}.jsonl"
            path = self.find(*(f"{p}{name}" for p in ("data_clean/questions/US/4_options/", "questions/US/4_options/",
                                                      "US/4_options/", "4_options/", "")))
        for i, (n, r) in enumerate(read_jsonl(path)):
            where = f"{path}: line {n}"
            require(r, ("question", "options", "answer_idx"), where)
            options = options_from_dict(r["options"], where)
            answer = letter_of(options, str(r["answer_idx"]), where)
            if "answer" in r and str(r["answer"]).strip() != options[answer]:
                raise BenchmarkError(f"{where}: answer_idx {answer} is {options[answer]!r} but answer is {r['answer']!r}")
            yield ChoiceItem(i, str(r["question"]), options, answer, categories={"step": r.get("meta_info")})


class MedMCQA(ChoiceBenchmark):
    name = "medmcqa"
    default_split = "dev"
    splits = ("dev", "train")
    has_images = False

    def read(self) -> Iterator[ChoiceItem]:
        parquet = sorted(self.root.glob("**/validation-*.parquet" if self.split == "dev" else f"**/{self.split}-*.parquet")) \
            if self.root.is_dir() else []
        if parquet and not (self.root / f"{self.split}.json").is_file():
            yield from self._parquet(parquet)
            return
        path = self.find(f"{self.split}.json", f"data/{self.split}.json")
        for n, r in read_jsonl(path):
            yield self._item(r, f"{path}: line {n}", one_based=True)

    def _parquet(self, files: list[Path]) -> Iterator[ChoiceItem]:
        for path in files:
            for i, r in enumerate(read_parquet_file(path)):
                yield self._item(r, f"{path}: row {i}", one_based=False)

    @staticmethod
    def _item(r, where: str, one_based: bool) -> ChoiceItem:
        require(r, ("id", "question", "opa", "opb", "opc", "opd", "cop"), where)
        options = letter_options([r[k] for k in ("opa", "opb", "opc", "opd")], where)
        cop = r["cop"]
        first = 1 if one_based else 0
        if isinstance(cop, bool) or not isinstance(cop, int) or not first <= cop < first + 4:
            raise BenchmarkError(f"{where}: cop {cop!r} is not an option number ({first}-{first + 3})")
        return ChoiceItem(r["id"], str(r["question"]), options, LETTERS[cop - first],
                          categories={"subject": r.get("subject_name"), "choice_type": r.get("choice_type")})


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


class PubMedQA(ChoiceBenchmark):
    name = "pubmedqa"
    splits = ("test", "all")
    has_images = False

    def read(self) -> Iterator[ChoiceItem]:
        path = self.find("ori_pqal.json", "data/ori_pqal.json")
        data = load_json_file(path)
        if not isinstance(data, dict):
            raise BenchmarkError(f"{path}: expected an object of PMID: record")
        pmids = list(data)
        if self.split == "test":
            truth_path = next((p for p in (path.parent / "test_ground_truth.json",
                                           self.root / "test_ground_truth.json") if p.is_file()), None)
            if truth_path is None:
                raise BenchmarkError(f"pubmedqa: split 'test' needs test_ground_truth.json beside {path} (the "
                                     "official 500-question test split; split 'all' reads all of ori_pqal.json)")
            truth = load_json_file(truth_path)
            if not isinstance(truth, dict):
                raise BenchmarkError(f"{truth_path}: expected an object of PMID: yes|no|maybe")
            unknown = [p for p in truth if p not in data]
            if unknown:
                raise BenchmarkError(f"{truth_path}: PMID {unknown[0]} is not in {path.name} "
                                     f"({len(unknown)} such)")
            pmids = list(truth)
        for pmid in pmids:
            where = f"{path}: PMID {pmid}"
            r = require(data[pmid], ("QUESTION", "CONTEXTS", "final_decision"), where)
            if self.split == "test" and str(truth[pmid]) != str(r["final_decision"]):
                raise BenchmarkError(f"{truth_path}: PMID {pmid} is {truth[pmid]!r} there but "
                                     f"{r['final_decision']!r} in {path.name}")
            if not isinstance(r["CONTEXTS"], list):
                raise BenchmarkError(f"{where}: CONTEXTS must be a list of paragraphs")
            yield ChoiceItem(pmid, str(r["QUESTION"]), dict(PUBMEDQA_OPTIONS),
                             letter_of(PUBMEDQA_OPTIONS, str(r["final_decision"]), where),
                             context="\n".join(str(c) for c in r["CONTEXTS"]),
                             categories={"reasoning_required_pred": r.get("reasoning_required_pred")})


MMLU_MED_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                     "professional_medicine")


class MMLUMed(ChoiceBenchmark):
    name = "mmlu_med"
    splits = ("test", "dev", "val", "validation")
    has_images = False

    def read(self) -> Iterator[ChoiceItem]:
        found = 0
        for subject in MMLU_MED_SUBJECTS:
            csv_path = next((p for p in (self.root / "data" / self.split / f"{subject}_{self.split}.csv",
                                         self.root / self.split / f"{subject}_{self.split}.csv") if p.is_file()), None)
            if csv_path is not None:
                found += 1
                yield from self._csv(csv_path, subject)
                continue
            split = "validation" if self.split == "val" else self.split
            for path in sorted((self.root / subject).glob(f"{split}-*.parquet")):
                found += 1
                yield from self._parquet(path, subject)
        if not found:
            raise BenchmarkError(f"mmlu_med: none of the medical subjects {list(MMLU_MED_SUBJECTS)} found in "
                                 f"{self.root} (data/{self.split}/<subject>_{self.split}.csv of the original release, "
                                 f"or <subject>/{self.split}-*.parquet of the Hugging Face one)")

    @staticmethod
    def _csv(path: Path, subject: str) -> Iterator[ChoiceItem]:
        reader = csv_rows(path, header=False)
        n = 0
        for i, (line, row) in enumerate(reader):
            where = f"{path}: line {line}"
            if len(row) != 6:
                raise BenchmarkError(f"{where}: {len(row)} columns (question, A, B, C, D, answer expected)")
            options = letter_options(row[1:5], where)
            n += 1
            yield ChoiceItem(f"{subject}/{i}", row[0], options, letter_of(options, row[5], where),
                             categories={"subject": subject})
        if not n:
            raise BenchmarkError(f"{path}: no questions (an empty subject file would shorten the benchmark)")

    @staticmethod
    def _parquet(path: Path, subject: str) -> Iterator[ChoiceItem]:
        for i, r in enumerate(read_parquet_file(path)):
            where = f"{path}: row {i}"
            require(r, ("question", "choices", "answer"), where)
            options = letter_options(list(r["choices"] or []), where)
            a = r["answer"]
            if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(options):
                raise BenchmarkError(f"{where}: answer {a!r} is not an option index (0-{len(options) - 1})")
            yield ChoiceItem(f"{subject}/{i}", str(r["question"]), options, LETTERS[a],
                             categories={"subject": subject})
