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


class StockSample:
    """sample_fn for a stock VLM (loader workers): PIL images + conversation -> the processor's tokens,
    image tensors and labels (vlm/data/stock_chat.py), or a skip reason."""

    def __init__(self, processor, chat):
        self.processor, self.chat = processor, chat

    def __call__(self, sample: dict):
        from vlm.data.stock_chat import encode_stock

        conv = sample["meta"].get("conversations")
        if not conv:
            return "no_conversation"
        images = [sample["image"], *sample["views"]]
        try:
            msgs = normalize_conversation(conv, len(images), self.chat.image_token)
            ex = encode_stock(msgs, images, self.processor, self.chat)
        except SkipExample as e:
            return e.reason
        return {"key": sample["key"], **ex}


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
            inputs = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor) and k != "labels"}
            if "seq_lens" in b:  # a stock VLM's packed rows: each conversation's own positions (3-D mRoPE too)
                from train.distributed import unwrap
                from vlm.data.stock_chat import packed_block_masks, packed_positions

                inputs["position_ids"] = packed_positions(unwrap(model), b).to(device)
                masks = packed_block_masks(unwrap(model), b)
                if masks is not None:
                    inputs["attention_mask"] = {k: m.to(device) for k, m in masks.items()}
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


def build_stock(cfg: InstructRunConfig):
    """A stock VLM and its processor, parts frozen as configured, LoRA on the LLM if asked."""
    from dataclasses import asdict

    from vlm.models.stock import llm_module, stock_from_config, trainable_by_part

    if cfg.chat.template == "plain":
        raise ValueError("chat.template=plain is LLaVA's stage-1 format; a stock VLM (model.vlm) is tuned with its "
                         "processor's chat template (chat.template=auto)")
    if cfg.model.init_from:
        raise ValueError("model.init_from applies to the LLaVA assembly; to continue a stock VLM run use "
                         "train.resume, or export it and name the export as model.vlm")
    model, processor = stock_from_config(asdict(cfg.model))
    if cfg.model.grad_checkpointing:
        llm_module(model).gradient_checkpointing_enable({"use_reentrant": False})
    log.info("stock VLM %s (%s): trainable parameters by part %s", cfg.model.vlm, type(model).__name__,
             trainable_by_part(model))
    return model, processor


def init_adapters(model, ckpt, weights: dict) -> bool:
    """A checkpoint of a LoRA run holds its adapters: put the same adapters (its config's model.lora) on the
    LLM so that the weights load, to be merged right after. -> whether adapters were put on."""
    from vlm.models.lora import ADAPTER_PARAM, inject_lora

    if not any(ADAPTER_PARAM.search(k) for k in weights):
        return False
    state = json.loads((ckpt / "state.json").read_text())
    lora = ((state.get("config") or {}).get("model") or {}).get("lora") or {}
    if not lora.get("r"):
        raise ValueError(f"{ckpt}: the weights hold adapters but its state.json names no model.lora")
    inject_lora(model, "model.language_model.", lora["target"], lora["r"], lora["alpha"], lora.get("dropout", 0.0),
                method=lora.get("method", "lora"))
    return True


def build_assistant(cfg: InstructRunConfig):
    from dataclasses import asdict

    from vlm.checkpoint import load_weights_into
    from vlm.models.vlm import assistant_from_config, freeze_for_stage

    m = cfg.model
    if not m.vision:
        raise ValueError("model.vision (the LLaVA assembly's vision tower) or model.vlm (a stock VLM) is required")
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
        weights = model_weights(p)
        merge = init_adapters(model, p, weights)  # a LoRA SFT run: its adapters, merged once loaded
        load_weights_into(model, weights, f"model.init_from={m.init_from}")
        if merge:
            from vlm.models.lora import merge_lora

            log.info("model.init_from: %d adapter layers of the LoRA run merged into the weights", merge_lora(model))
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


def assembly_shard_modules(model) -> tuple:
    """FSDP2 units of the LLaVA assembly: one per LLM decoder layer."""
    layers = getattr(model.model.language_model, "layers", None)
    return (type(layers[0]),) if layers is not None and len(layers) else ()


def build_run(cfg: InstructRunConfig, d) -> tuple[torch.nn.Module, dict]:
    """The assistant and everything else ``Trainer(model, **kwargs)`` needs for this config (also used by
    train.rehearse, which must run exactly what train.instruct runs)."""
    cfg.data.require_text = cfg.chat.template == "plain"
    max_len = cfg.pack_length or cfg.chat.max_length
    if cfg.model.vlm:
        from vlm.data.stock_chat import StockCollate
        from vlm.models.stock import decoder_layers, vlm_parts

        model, processor = build_stock(cfg)
        cfg.data.image.output = "pil"  # the processor resizes and normalises
        pad = processor.tokenizer.pad_token_id
        loader = ShardLoader(cfg.data, rank=d.rank, world_size=d.world_size, sample_fn=StockSample(processor, cfg.chat),
                             collate_fn=StockCollate(cfg.packing, max_len, pad if pad is not None else 0,
                                                     cfg.group_size))
        parts = vlm_parts(model)  # the vision tower at its own rate; a projector inside it (Qwen2-VL's merger) not
        scales = ({**{p: 1.0 for p in parts["projector"]}, parts["vision"][0]: cfg.model.vision_lr_scale}
                  if "vision" not in cfg.model.freeze else None)
        shard = decoder_layers(model)  # FSDP2: one unit per decoder layer / vision block (_no_split_modules)
        saved = processor
    else:
        model, tokenizer = build_assistant(cfg)
        sample_fn = ConversationSample(tokenizer, cfg.chat, int(model.config.image_seq_length))
        collate = InstructCollate(cfg.packing, max_len, tokenizer.pad_token_id or 0, cfg.group_size)
        loader = ShardLoader(cfg.data, rank=d.rank, world_size=d.world_size, sample_fn=sample_fn, collate_fn=collate)
        scales = {"model.vision_tower.": cfg.model.vision_lr_scale} if cfg.model.train_vision else None
        log.info("assistant: %d image tokens per image (stage %d)", model.config.image_seq_length, cfg.model.stage)
        shard = assembly_shard_modules(model)
        saved = tokenizer
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("assistant: %.1fM parameters, %.2fM trainable", sum(p.numel() for p in model.parameters()) / 1e6,
             n_train / 1e6)
    return model, dict(task=InstructTask(), loader=loader, cfg=cfg.train, optim_cfg=cfg.optim, d=d, run_config=cfg,
                       lr_scales=scales, shard_modules=shard, tokenizer=saved)


def run(cfg, build, d) -> int:
    """What train.instruct and train.preference run once their config is parsed: build (the same initial
    weights on every rank, FSDP2 shards them as built), train, and on rank 0 save the tokenizer / processor
    and result.json (not after a SIGTERM: a finished run only)."""
    setup_logging(quiet=not d.is_main)
    try:
        seed_everything(cfg.train.seed)
        model, kwargs = build(cfg, d)
        seed_everything(cfg.train.seed + d.rank)
        tokenizer = kwargs.pop("tokenizer")
        trainer = Trainer(model, **kwargs)
        result = trainer.fit()
        if d.is_main and result["preempted"]:
            log.info("stopped at step %d by SIGTERM; continue with train.resume=latest", result["step"])
        elif d.is_main:
            from vlm.utils import atomic_write_text

            tokenizer.save_pretrained(trainer.out / ("processor" if cfg.model.vlm else "tokenizer"))
            atomic_write_text(trainer.out / "result.json", json.dumps(
                {"step": result["step"], "final_metrics": result["metrics"], "skipped": kwargs["loader"].skipped},
                indent=1))
    finally:
        cleanup()
    return 0


@cli
def main(argv=None) -> int:
    cfg = parse_run_config("python -m train.instruct", __doc__, InstructRunConfig, argv,
                           "train.steps=100 model.stage=2")
    return run(cfg, build_run, init_distributed())


if __name__ == "__main__":
    sys.exit(main())
