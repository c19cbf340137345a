"""PathVQA (He et al. 2020): the Hugging Face parquet release (question id = row index within the
split), or the original ``qas/<split>/<split>_qa.pkl`` (plain-data pickle, read safely) with
``images/<split>/``. Yes/no answers are closed questions, as in LLaVA-Med's protocol.
"""
from __future__ import annotations

from pathlib import Path

from eval.benchmarks.base import BenchmarkError, VQABenchmark, VQAItem, image_inside
from vlm.data.formats import answer_type, load_plain_pickle


class PathVQA(VQABenchmark):
    name = "pathvqa"

    def load(self) -> list[VQAItem]:
        pkl = self.root / "qas" / self.split / f"{self.split}_qa.pkl"
        if self.root.suffix == ".pkl":
            pkl = self.root
        if pkl.is_file():
            data = load_plain_pickle(pkl)
            if not isinstance(data, list):
                raise BenchmarkError(f"{pkl}: expected a list of question records")
            images = pkl.parent.parent.parent / "images" / self.split
            items = []
            for i, r in enumerate(data):
                if not isinstance(r, dict) or "question" not in r or "answer" not in r:
                    raise BenchmarkError(f"{pkl}: record {i} lacks question/answer")
                name = str(r.get("image", r.get("img_id", "")))
                ans = str(r["answer"])
                items.append(VQAItem(r.get("qid", i), r["question"], ans, answer_type(r, ans),
                                     image=image_inside(images, name if Path(name).suffix else name + ".jpg",
                                                        f"{pkl}: record {i}"),
                                     categories={"answer_type": answer_type(r, ans)}))
            return items
        return self.load_parquet(f"{pkl}")
