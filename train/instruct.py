"""Instruction tuning of the assistant (LLaVA's recipe): stage 1 aligns the projector on captions,
stage 2 trains projector + LLM (full or LoRA) on conversations.

    python -m train.instruct --config configs/instruct/demo_stage1.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m train.instruct --config configs/instruct/llava_med_7b_lora.yaml

Conversations (LLaVA / LLaVA-Med format, in shard metadata) are rendered with the tokenizer's chat
template (stage 1: the plain template), only assistant tokens are labels, image placeholders are
expanded to the vision tower's patch count, and rows are packed (several conversations per row,
attention kept inside each) unless packing=false. Bad conversations are skipped and counted by
reason. The loss is the mean over all label tokens of the global step (exact across
micro-batches and ranks). Same checkpoint/resume/logging machinery as train.clip.
"""
from __future__ import annotations

import json
import logging
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.config import InstructRunConfig, parse_run_config
from train.distributed import cleanup, init_distributed
from train.trainer import StepContext, Trainer
from vlm.data.chat import IGNORE, SkipExample, check_template, encode, fit_length, normalize_conversation, pack
from vlm.data.shards import ShardLoader
from vlm.utils import cli, seed_everything, setup_logging

log = logging.getLogger("train.instruct")


class ConversationSample:
    """sample_fn for the stream (runs in loader workers): decoded sample -> token ids and labels, or a skip reason."""

    def __init__(self, tokenizer, chat, image_seq_len: int):
        self.tokenizer, self.chat, self.n = tokenizer, chat, image_seq_len
        self.image_id = tokenizer.convert_tokens_to_ids(chat.image_token)

    def __call__(self, sample: dict):
        conv = sample["meta"].get("conversations")
        if self.chat.template == "plain" and sample.get("text"):  # stage 1: the caption is the answer
            conv = [{"from": "human", "value": self.chat.image_token + "\n"}, {"from": "gpt", "value": sample["text"]}]
        if not conv:
            return "no_conversation"
        try:
            msgs = normalize_conversation(conv, 1 + len(sample["views"]), self.chat.image_token)
            ids, labels = encode(msgs, self.tokenizer, self.chat, self.n)
            ids, labels = fit_length(ids, labels, self.chat, self.image_id)
        except SkipExample as e:
            return e.reason
        return {"key": sample["key"], "input_ids": ids, "labels": labels,
                "pixel_values": [sample["image"], *sample["views"]]}


class InstructCollate:
    """Examples -> a batch.

    packing: the examples packed into as few rows of ``max_len`` tokens as fit, position ids restarting at
    each example and no attention mask (the attention function keeps each example to itself).
    Otherwise right-padded rows with a padding mask; with ``group_size`` the examples are sorted by
    length and padded in groups of that many (length-grouped batching: each group is its own forward,
    the loss is still the token mean of the whole step)."""

    def __init__(self, packing: bool, max_len: int, pad_id: int, group_size: int = 0):
        self.packing, self.max_len, self.pad_id, self.group_size = packing, max_len, pad_id, group_size

    def __call__(self, examples: list[dict]) -> dict:
        if not self.packing and 0 < self.group_size < len(examples):
            order = sorted(examples, key=lambda ex: len(ex["input_ids"]))
            groups = [self._padded(order[i:i + self.group_size]) for i in range(0, len(order), self.group_size)]
            return {"keys": [ex["key"] for ex in examples], "groups": groups}
        return self._packed(examples) if self.packing else self._padded(examples)

    def _packed(self, examples: list[dict]) -> dict:
        rows = pack([(ex["input_ids"], ex["labels"]) for ex in examples], self.max_len)
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), IGNORE)
        pos = torch.arange(width).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], pos[i, :n] = r["input_ids"], r["labels"], r["position_ids"]
            pos[i, n:] -= n  # the padding tail is one more segment of its own
        # images in the order of their placeholders in the rows
        order = [i for r in rows for i in r["index"]]
        return {"keys": [examples[i]["key"] for i in order], "input_ids": ids, "labels": labels, "position_ids": pos,
                "pixel_values": torch.stack([p for i in order for p in examples[i]["pixel_values"]])}

    def _padded(self, examples: list[dict]) -> dict:
        width = max(len(ex["input_ids"]) for ex in examples)
        ids = torch.full((len(examples), width), self.pad_id)
        labels = torch.full((len(examples), width), IGNORE)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, ex in enumerate(examples):
            a, b = ex["input_ids"], ex["labels"]
            ids[i, :len(a)], labels[i, :len(b)], mask[i, :len(a)] = torch.as_tensor(a), torch.as_tensor(b), 1
        return {"keys": [ex["key"] for ex in examples], "input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([p for ex in examples for p in ex["pixel_values"]])}


class InstructTask:
    """Next-token loss averaged over every label token of the step (all micro-batches, all ranks)."""

    def train_step(self, model, batches: list[dict], ctx: StepContext) -> dict:
        device = ctx.d.device
        batches = [g for b in batches for g in b.get("groups", [b])]  # length-grouped padded batches
        n = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)), device=device)
        if ctx.d.enabled:
            dist.all_reduce(n)
        n = n.clamp(min=1.0)
        total = torch.zeros((), device=device)
        for j, b in enumerate(batches):
            inputs = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "position_ids", "pixel_values") if k in b}
            with ctx.no_sync(last=j == len(batches) - 1), ctx.autocast():
                logits = model(**inputs, use_cache=False).logits
                labels = b["labels"].to(device)
                loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
                (loss_sum * ctx.d.world_size / n).backward()
            total = total + loss_sum.detach()
        return {"loss": total * ctx.d.world_size / n, "tokens": n}  # tensors: read at logging steps only

    def after_step(self, model) -> None:
        pass


def enable_grad_checkpointing(model) -> None:
    """Activation checkpointing of the LLM's decoder layers (transformers' own, non-reentrant: frozen
    inputs and LoRA need no input gradients)."""
    model.model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def build_assistant(cfg: InstructRunConfig):
    from dataclasses import asdict

    from vlm.checkpoint import load_weights_into
    from vlm.models.vlm import assistant_from_config, freeze_for_stage

    m = cfg.model
    if not m.llm and not m.llm_config:
        raise ValueError("model.llm (a hub id or folder) or model.llm_config is required")
    model, tokenizer = assistant_from_config({**asdict(m), "lora": {}}, cfg.chat.image_token)
    check_template(tokenizer, cfg.chat)
    if m.init_from:
        from pathlib import Path

        from vlm.checkpoint import list_checkpoints, model_weights

        p = Path(m.init_from)
        if (p / "checkpoints").is_dir():
            p = list_checkpoints(p / "checkpoints")[-1]
        load_weights_into(model, model_weights(p), f"model.init_from={m.init_from}")
    freeze_for_stage(model, m.stage, m.train_vision, train_llm=m.lora.r <= 0)  # LoRA: adapters on a frozen LLM
    if m.grad_checkpointing:
        enable_grad_checkpointing(model)
    if m.stage == 2 and m.lora.r > 0:
        from vlm.models.lora import inject_lora

        n = inject_lora(model, "model.language_model.", m.lora.target, m.lora.r, m.lora.alpha, m.lora.dropout,
                        method=m.lora.method)
        log.info("%s r=%d on %d LLM linears%s", m.lora.method, m.lora.r, n,
                 f" (LLM in {m.llm_quantize}: QLoRA)" if m.llm_quantize != "none" else "")
    return model, tokenizer


def build_run(cfg: InstructRunConfig, d) -> tuple[torch.nn.Module, dict]:
    """The assistant and everything else ``Trainer(model, **kwargs)`` needs for this config (also used by
    train.rehearse, which must run exactly what train.instruct runs)."""
    model, tokenizer = build_assistant(cfg)
    cfg.data.require_text = cfg.chat.template == "plain"
    sample_fn = ConversationSample(tokenizer, cfg.chat, int(model.config.image_seq_length))
    collate = InstructCollate(cfg.packing, cfg.pack_length or cfg.chat.max_length, tokenizer.pad_token_id or 0,
                              cfg.group_size)
    loader = ShardLoader(cfg.data, rank=d.rank, world_size=d.world_size, sample_fn=sample_fn, collate_fn=collate)
    scales = {"model.vision_tower.": cfg.model.vision_lr_scale} if cfg.model.train_vision else None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("assistant: %.1fM parameters, %.2fM trainable (stage %d), %d image tokens per image",
             sum(p.numel() for p in model.parameters()) / 1e6, n_train / 1e6, cfg.model.stage,
             model.config.image_seq_length)
    # FSDP2: one unit per LLM decoder layer
    lm_layers = getattr(model.model.language_model, "layers", None)
    shard = (type(lm_layers[0]),) if lm_layers is not None and len(lm_layers) else ()
    return model, dict(task=InstructTask(), loader=loader, cfg=cfg.train, optim_cfg=cfg.optim, d=d, run_config=cfg,
                       lr_scales=scales, shard_modules=shard, tokenizer=tokenizer)


@cli
def main(argv=None) -> int:
    cfg = parse_run_config("python -m train.instruct", __doc__, InstructRunConfig, argv,
                           "train.steps=100 model.stage=2")
    d = init_distributed()
    setup_logging(quiet=not d.is_main)
    try:
        seed_everything(cfg.train.seed)  # the same initial weights on every rank (FSDP2 shards them as built)
        model, kwargs = build_run(cfg, d)
        seed_everything(cfg.train.seed + d.rank)
        tokenizer = kwargs.pop("tokenizer")
        trainer = Trainer(model, **kwargs)
        result = trainer.fit()
        if d.is_main and result["preempted"]:
            log.info("stopped at step %d by SIGTERM; continue with train.resume=latest", result["step"])
        elif d.is_main:
            from vlm.utils import atomic_write_text

            tokenizer.save_pretrained(trainer.out / "tokenizer")
            atomic_write_text(trainer.out / "result.json", json.dumps(
                {"step": result["step"], "final_metrics": result["metrics"], "skipped": kwargs["loader"].skipped},
                indent=1))
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
