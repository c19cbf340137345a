"""LoRA (and other peft adapters) injected into plain modules, and merged back for export.

``inject_lora`` wraps the nn.Linear layers whose qualified names match a regex under a prefix
(peft's ``inject_adapter_in_model``; the model stays our class, not a PeftModel), and marks only
the adapters trainable within that tower. ``merge_lora`` folds every adapter into its base weight
and puts the plain nn.Linear back, so the state dict is the original architecture's again.
"""
from __future__ import annotations

import re

import torch.nn as nn


def inject_lora(model: nn.Module, prefix: str, pattern: str, r: int, alpha: int, dropout: float = 0.0,
                adapter_name: str = "default") -> int:
    from peft import LoraConfig, inject_adapter_in_model

    rx = re.compile(pattern)
    targets = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear) and rx.match(n)]
    if not targets:
        raise ValueError(f"LoRA target {pattern!r} matched no nn.Linear under {prefix!r}")
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets),
                            model, adapter_name=adapter_name)
    for n, p in model.named_parameters():  # within the tower only the adapters train
        if n.startswith(prefix):
            p.requires_grad = "lora_" in n
    return len(targets)


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its base layer and restore the plain modules; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
