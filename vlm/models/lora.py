"""Parameter-efficient adapters (peft) injected into plain modules, and merged back for export.

``inject_lora`` wraps the nn.Linear layers whose qualified names match a regex under a prefix with
one of peft's adapters (``inject_adapter_in_model``; the model stays our class, not a PeftModel) and
marks only the new adapter parameters trainable within that tower. Methods (``method``):

    lora     LoRA (Hu et al.)                      dora   weight-decomposed LoRA (peft use_dora)
    rslora   LoRA with rank-stabilised scaling      loha   low-rank Hadamard product (LyCORIS)
    lokr     low-rank Kronecker product (LyCORIS)

QLoRA is LoRA on an LLM loaded in 4 bit (``model.llm_quantize`` in train.instruct). ``merge_lora``
folds every adapter into its base weight and puts the plain nn.Linear back, so the state dict is the
original architecture's again.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch.nn as nn

METHODS = ("lora", "dora", "rslora", "loha", "lokr")
ADAPTER_PARAM = re.compile(r"\.(lora_|hada_|lokr_)")  # the parameters peft adds (lora_A/B, DoRA's lora_magnitude_vector)


def peft_config(method: str, targets: list[str], r: int, alpha: int, dropout: float):
    import peft

    if method in ("lora", "dora", "rslora"):
        return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                               use_dora=method == "dora", use_rslora=method == "rslora")
    if method == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=targets)
    if method == "lokr":
        return peft.LoKrConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=targets)
    raise ValueError(f"unknown adapter method {method!r}; choose from {', '.join(METHODS)}")


def inject_lora(model: nn.Module, prefix: str, pattern: str, r: int, alpha: int, dropout: float = 0.0,
                adapter_name: str = "default", method: str = "lora") -> int:
    from peft import inject_adapter_in_model

    rx = re.compile(pattern)
    targets = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear) and rx.match(n)]
    if not targets:
        raise ValueError(f"adapter target {pattern!r} matched no nn.Linear under {prefix!r}")
    # peft marks every non-adapter parameter of the *whole* model frozen; what trains outside the
    # tower (a projector, the other tower, logit scales) must keep the flag it had before
    before = {id(p): p.requires_grad for p in model.parameters()}
    inject_adapter_in_model(peft_config(method, targets, r, alpha, dropout), model, adapter_name=adapter_name)
    for n, p in model.named_parameters():
        if id(p) not in before:  # a new adapter parameter
            p.requires_grad = True
        elif n.startswith(prefix):  # the tower's own weights: frozen under the adapters
            p.requires_grad = False
        else:
            p.requires_grad = before[id(p)]
    return len(targets)


def merge_lora(model: nn.Module) -> int:
    """Merge every adapter layer into its base layer and restore the plain modules; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged


@contextmanager
def adapters_disabled(model: nn.Module):
    """The model without its adapters, in place: every adapter layer computes its base layer only, so a LoRA
    policy is its own frozen reference (preference tuning) with no second copy in memory. Restored on exit.
    Yields how many adapter layers were switched off (0: the model has none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    flags = [{n: p.requires_grad for n, p in m.named_parameters()} for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield len(layers)
    finally:
        for m, f in zip(layers, flags):
            m.enable_adapters(True)
            for n, p in m.named_parameters():  # enable_adapters also sets requires_grad: keep what was trained
                p.requires_grad = f[n]
