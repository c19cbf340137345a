"""Multiple-choice benchmarks' common ground: an item (the options in order, the right letter, the images) and
the base class whose loaders read each release as downloaded (multiple_choice.py: with images; text_qa.py: text
only). Every malformed record is an error naming the file and the row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Optional, Union

from eval.benchmarks.base import BenchmarkError
from vlm.choice_metrics import LETTERS


@dataclass
class ChoiceItem:
    qid: object  # the benchmark's own id (or the row's position where the release has none; documented per loader)
    question: str
    options: dict  # letter -> option text, in the release's order
    answer: str  # the right letter ("open" questions: the first accepted answer)
    images: list = field(default_factory=list)  # paths or bytes, in the order the question refers to them
    context: str = ""  # PubMedQA's abstract
    kind: str = "choice"  # choice | open (MMMU has a few open questions)
    answers: list = field(default_factory=list)  # open questions: every accepted answer
    categories: dict = field(default_factory=dict)  # question_type, modality, subject, ...


class ChoiceBenchmark:
    name: ClassVar[str] = ""
    default_split: ClassVar[str] = "test"
    splits: ClassVar[tuple] = ("test",)
    has_images: ClassVar[bool] = True
    compat: ClassVar[Optional[str]] = None  # the benchmark's published parsing rule: "mmmu"

    def __init__(self, data_root: Union[str, Path], split: Optional[str] = None):
        self.root = Path(data_root)
        self.split = split or self.default_split
        if self.split not in self.splits:
            raise BenchmarkError(f"{self.name}: split {self.split!r} is not one of {list(self.splits)}")
        if not self.root.exists():
            raise BenchmarkError(f"{self.name}: --data-root not found: {self.root}")

    def load(self) -> list[ChoiceItem]:
        items = list(self.read())
        seen: set = set()
        for it in items:
            key = str(it.qid)
            if key in seen:
                raise BenchmarkError(f"{self.name}: question id {it.qid!r} appears twice in {self.root}")
            seen.add(key)
        return items

    def read(self) -> Iterator[ChoiceItem]:
        raise NotImplementedError

    def find(self, *candidates: str) -> Path:
        """The first of ``candidates`` (paths relative to the data root) that exists; the data root itself when
        it is a file."""
        if self.root.is_file():
            return self.root
        for c in candidates:
            if (self.root / c).is_file():
                return self.root / c
        raise BenchmarkError(f"{self.name}: none of {list(candidates)} in {self.root} (the official layout)")


def letter_options(values: list, where: str) -> dict:
    """Option texts in order -> {A: ..., B: ...}; every option must be a non-empty string."""
    if not values or len(values) > len(LETTERS):
        raise BenchmarkError(f"{where}: {len(values)} options (expected 2 to {len(LETTERS)})")
    out = {}
    for letter, v in zip(LETTERS, values):
        if not isinstance(v, (str, int, float)) or isinstance(v, bool) or not str(v).strip():
            raise BenchmarkError(f"{where}: option {letter} is empty or not text ({v!r})")
        out[letter] = str(v).strip()
    return out


def options_from_dict(options, where: str) -> dict:
    """A release's {letter: text} options (MedQA, MedXpertQA) -> letter_options', checked to be A, B, C... in order."""
    if not isinstance(options, dict):
        raise BenchmarkError(f"{where}: 'options' must be an object of letter: text")
    letters = sorted(options)
    out = letter_options([options[k] for k in letters], where)
    if list(out) != letters:
        raise BenchmarkError(f"{where}: option letters {letters} are not A, B, C, ... in order")
    return out


def letter_of(options: dict, answer, where: str) -> str:
    """The right option given as its letter or as its exact text -> the letter."""
    if isinstance(answer, str) and answer.strip().upper() in options and len(answer.strip()) == 1:
        return answer.strip().upper()
    if isinstance(answer, str):
        hits = [k for k, v in options.items() if v == answer.strip()]
        if not hits:
            hits = [k for k, v in options.items() if v.casefold() == answer.strip().casefold()]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BenchmarkError(f"{where}: the answer {answer!r} is the text of several options {hits}")
    raise BenchmarkError(f"{where}: the answer {answer!r} is neither an option letter nor an option's text "
                         f"(options {options})")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSON-lines file (a byte-order mark allowed); a line that is not JSON or not
    UTF-8 names its number."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise BenchmarkError(f"{path}: line {n} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: line {n} is not JSON ({e.msg})") from None


def csv_rows(path: Path, header: bool = True) -> Iterator[tuple[int, object]]:
    """(the line a record starts on, the record) of a CSV file: dicts by the header row, or lists without one.
    A byte-order mark is dropped and blank lines are skipped; text that is not UTF-8 names its line. Line numbers
    count the file's lines, so a quoted field spanning several lines does not shift the ones after it. With a
    header, the first item yielded is (0, the column names); a short row's missing fields are None."""
    import csv
    import io

    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise BenchmarkError(f"{path}: line {line} is not UTF-8 text ({e.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    columns = None
    while True:
        start = reader.line_num + 1  # the line the next record starts on (blank lines are records of no fields)
        row = next(reader, None)
        if row is None:
            break
        if not row:
            continue
        if header and columns is None:
            columns = row
            yield 0, columns  # first: the columns
            continue
        yield start, (dict(zip(columns, row + [None] * (len(columns) - len(row)))) if header else row)
    if header and columns is None:
        yield 0, []
