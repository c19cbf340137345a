"""Benchmark base classes: a benchmark loads its items from the official release and knows its protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Union

from vlm.data.formats import FormatError


class BenchmarkError(FormatError):
    """A data root that is not the benchmark's official layout."""


def require(record, keys: tuple, where: str) -> dict:
    """``record`` if it is an object holding ``keys``; else a BenchmarkError naming ``where`` and what lacks."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise BenchmarkError(f"{where}: lacks {missing}")
    return record


def image_inside(root: Path, rel: str, where: str) -> str:
    """``root / rel`` with every symlink resolved, or a BenchmarkError naming the record when the path leaves
    ``root`` (``..``, an absolute path, a link pointing out): a release never names files outside itself."""
    from vlm.data.paths import resolve_inside

    path = resolve_inside(root, rel)
    if path is None:
        raise BenchmarkError(f"{where}: its image path leaves {root}")
    return str(path)


@dataclass
class VQAItem:
    qid: object  # the benchmark's own question id (int or str)
    question: str
    answer: str
    answer_type: str  # OPEN | CLOSED
    image: Union[str, bytes, None] = None  # a path, or the bytes (parquet releases)
    categories: dict = field(default_factory=dict)  # answer_type, content_type, modality, organ, ...


@dataclass
class ReportItem:
    id: str
    report: str
    images: list[str] = field(default_factory=list)


class VQABenchmark:
    name: ClassVar[str] = ""
    default_split: ClassVar[str] = "test"

    def __init__(self, data_root: str | Path, split: Optional[str] = None, lang: str = "en"):
        self.root = Path(data_root)
        self.split = split or self.default_split
        self.lang = lang
        if not self.root.exists():
            raise BenchmarkError(f"{self.name}: --data-root not found: {self.root}")

    def load(self) -> list[VQAItem]:
        raise NotImplementedError

    def load_parquet(self, other_layout: str) -> list[VQAItem]:
        """The Hugging Face parquet release: question id = row index within the split."""
        from vlm.data.formats import answer_type, parquet_image, read_parquet_rows

        splits = dict(read_parquet_rows(self.root))
        if self.split not in splits:
            raise BenchmarkError(f"{self.name}: no {other_layout} and no {self.split!r} parquet split in {self.root}")
        return [VQAItem(r["qid"], r["question"], str(r["answer"]), answer_type(r, r["answer"]),
                        image=parquet_image(r), categories={"answer_type": answer_type(r, r["answer"])})
                for r in splits[self.split]]


class ReportBenchmark:
    """R2Gen's annotation.json layout: {"train", "val", "test"} of {"id", "report", "image_path"}."""

    name: ClassVar[str] = ""
    cleaner: ClassVar[str] = ""  # the R2Gen cleaning function of this data set

    def __init__(self, annotation: str | Path, split: str = "test", image_root: Optional[str | Path] = None):
        from vlm.data.formats import load_json_file

        self.annotation = Path(annotation)
        self.split = split
        self.image_root = Path(image_root) if image_root else self.annotation.parent / "images"
        data = load_json_file(self.annotation, "--annotation")
        if not isinstance(data, dict) or split not in data:
            have = list(data) if isinstance(data, dict) else type(data).__name__
            raise BenchmarkError(f"{self.annotation}: no split {split!r} in R2Gen's layout (it has {have})")
        self.records = data[split]

    def load(self) -> list[ReportItem]:
        items = []
        for i, r in enumerate(self.records):
            if not isinstance(r, dict) or "id" not in r or not isinstance(r.get("report"), str):
                raise BenchmarkError(f"{self.annotation}: {self.split}[{i}] lacks 'id' or 'report'")
            paths = r.get("image_path") or []
            where = f"{self.annotation}: {self.split}[{i}]"
            items.append(ReportItem(str(r["id"]), r["report"], [image_inside(self.image_root, str(p), where)
                                                                for p in paths]))
        return items
