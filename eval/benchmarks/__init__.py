"""One class per benchmark, owning its loader (official formats) and its protocol."""
from __future__ import annotations

from eval.benchmarks.base import ReportBenchmark, ReportItem, VQABenchmark, VQAItem
from eval.benchmarks.choice import ChoiceBenchmark, ChoiceItem
from eval.benchmarks.multiple_choice import MMMUMed, MedXpertQAMM, OmniMedVQA, PMCVQA
from eval.benchmarks.pathvqa import PathVQA
from eval.benchmarks.reports import IUXray, MimicCXR
from eval.benchmarks.slake import Slake
from eval.benchmarks.text_qa import MedMCQA, MedQA, MMLUMed, PubMedQA
from eval.benchmarks.vqa_rad import VQARad

VQA_BENCHMARKS: dict[str, type[VQABenchmark]] = {"vqa_rad": VQARad, "slake": Slake, "pathvqa": PathVQA}
REPORT_BENCHMARKS: dict[str, type[ReportBenchmark]] = {"iu_xray": IUXray, "mimic_cxr": MimicCXR}
# multiple choice (with images) and text QA: one strict scorer (vlm/choice_metrics.py), through eval.vqa
CHOICE_BENCHMARKS: dict[str, type[ChoiceBenchmark]] = {
    "omnimedvqa": OmniMedVQA, "pmc_vqa": PMCVQA, "mmmu_med": MMMUMed, "medxpertqa_mm": MedXpertQAMM,
    "medqa": MedQA, "medmcqa": MedMCQA, "pubmedqa": PubMedQA, "mmlu_med": MMLUMed}

__all__ = ["VQA_BENCHMARKS", "REPORT_BENCHMARKS", "CHOICE_BENCHMARKS", "VQABenchmark", "VQAItem", "ReportBenchmark",
           "ReportItem", "ChoiceBenchmark", "ChoiceItem", "VQARad", "Slake", "PathVQA", "IUXray", "MimicCXR",
           "OmniMedVQA", "PMCVQA", "MMMUMed", "MedXpertQAMM", "MedQA", "MedMCQA", "PubMedQA", "MMLUMed"]
