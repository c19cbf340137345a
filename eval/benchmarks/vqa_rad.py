"""VQA-RAD (Lau et al. 2018): the official ``VQA_RAD Dataset Public.json`` (test = phrase_type
test_freeform + test_para, 451 questions; train the other 1,797) with ``VQA_RAD Image Folder/``,
or the Hugging Face parquet release (question id = row index within the split).
"""
from __future__ import annotations

from eval.benchmarks.base import VQABenchmark, VQAItem, image_inside, require
from vlm.data.formats import VQA_RAD_FILE, answer_type, load_json_file, vqa_rad_split


class VQARad(VQABenchmark):
    name = "vqa_rad"

    def load(self) -> list[VQAItem]:
        official = self.root / VQA_RAD_FILE if self.root.is_dir() else self.root
        if official.is_file() and official.suffix == ".json":
            data = load_json_file(official)
            items = []
            for i, r in enumerate(data):
                require(r, ("qid", "question", "answer", "phrase_type"), f"{official}: record {i}")
                if vqa_rad_split(r) != self.split:
                    continue
                ans = str(r["answer"])
                items.append(VQAItem(
                    r["qid"], r["question"], ans, answer_type(r, ans),
                    image=image_inside(official.parent / "VQA_RAD Image Folder", str(r["image_name"]),
                                       f"{official}: record {i}"),
                    categories={"answer_type": answer_type(r, ans), "question_type": r.get("question_type"),
                                "organ": r.get("image_organ"), "phrase_type": r.get("phrase_type")}))
            return items
        return self.load_parquet(f"{VQA_RAD_FILE}")
