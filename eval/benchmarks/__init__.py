"""One class per benchmark, owning its loader (official formats) and its protocol."""
from __future__ import annotations

from eval.benchmarks.base import ReportBenchmark, ReportItem, VQABenchmark, VQAItem
from eval.benchmarks.pathvqa import PathVQA
from eval.benchmarks.reports import IUXray, MimicCXR
from eval.benchmarks.slake import Slake
from eval.benchmarks.vqa_rad import VQARad

VQA_BENCHMARKS: dict[str, type[VQABenchmark]] = {"vqa_rad": VQARad, "slake": Slake, "pathvqa": PathVQA}
REPORT_BENCHMARKS: dict[str, type[ReportBenchmark]] = {"iu_xray": IUXray, "mimic_cxr": MimicCXR}

__all__ = ["VQA_BENCHMARKS", "REPORT_BENCHMARKS", "VQABenchmark", "VQAItem", "ReportBenchmark", "ReportItem",
           "VQARad", "Slake", "PathVQA", "IUXray", "MimicCXR"]
