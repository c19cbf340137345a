"""Radiology report generation in R2Gen's annotation.json layout: IU X-Ray and MIMIC-CXR."""
from __future__ import annotations

from eval.benchmarks.base import ReportBenchmark


class IUXray(ReportBenchmark):
    name = "iu_xray"
    cleaner = "iu_xray"


class MimicCXR(ReportBenchmark):
    name = "mimic_cxr"
    cleaner = "mimic_cxr"
