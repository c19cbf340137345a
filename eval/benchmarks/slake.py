"""SLAKE (Liu et al. 2021), official release: train.json / validate.json (or validation.json) /
test.json with imgs/<img_name>. English questions by default (q_lang == "en"; the English test
split has 1,061 questions: 645 OPEN, 416 CLOSED), Chinese with lang="zh".
"""
from __future__ import annotations

from eval.benchmarks.base import BenchmarkError, VQABenchmark, VQAItem, image_inside, require
from vlm.data.formats import answer_type, load_json_file

SPLIT_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}


class Slake(VQABenchmark):
    name = "slake"

    def load(self) -> list[VQAItem]:
        names = SPLIT_FILES.get(self.split, (f"{self.split}.json",))
        path = next((self.root / n for n in names if (self.root / n).is_file()), None)
        if path is None:
            raise BenchmarkError(f"slake: none of {list(names)} in {self.root} (SLAKE's official layout)")
        data = load_json_file(path)
        if not isinstance(data, list):
            raise BenchmarkError(f"{path}: expected a list of question records")
        items = []
        for i, r in enumerate(data):
            require(r, ("qid", "question", "answer", "q_lang"), f"{path}: record {i}")
            if self.lang != "all" and r["q_lang"] != self.lang:
                continue
            ans = str(r["answer"])
            items.append(VQAItem(
                r["qid"], r["question"], ans, answer_type(r, ans),
                image=image_inside(self.root / "imgs", str(r["img_name"]), f"{path}: record {i}")
                if r.get("img_name") else None,
                categories={"answer_type": answer_type(r, ans), "content_type": r.get("content_type"),
                            "modality": r.get("modality"), "organ": r.get("location")}))
        return items
