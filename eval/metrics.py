"""VQA metrics: moved to vlm/vqa_metrics.py (GRPO's rewards score with them too), re-exported here."""
from vlm.vqa_metrics import *  # noqa: F401,F403
