"""Preference tuning of the assistant (DPO family) on preference shards, after SFT.

    python -m data_prep.shards --format preference --input pairs.jsonl --image-root images/ --out shards/pairs
    python -m train.preference --config FILE [key=value ...]
    torchrun --nproc_per_node 8 -m train.preference --config FILE

The model section is train.instruct's: the LLaVA assembly started from an SFT run (``model.init_from``,
stage 2, full or LoRA) or a stock VLM (``model.vlm``). ``preference.loss``: dpo | ipo | cdpo | simpo | orpo
(vlm/preference.py; parity with TRL tested). The reference is the frozen starting policy: with LoRA the
same model with its adapters switched off (no second copy in memory), with full tuning a frozen copy
(sharded like the policy under FSDP2); SimPO and ORPO need none. A pair's chosen and rejected responses
go through the same forward, only the final response's tokens (and its end-of-turn token) count: for the
LLaVA assembly packed (``packing``, default: one row per pair, attention kept inside each response's
conversation, the pair's images encoded once: train/pair_packing.py), for stock VLMs as padded rows
[chosen..., rejected...]. Logged: loss, rewards of chosen and rejected, margins, accuracy of the implicit
reward, log-probabilities (means over every pair of the step, all ranks). With LoRA only the adapters train
(the reference is the policy with them off). Dropout is off (disable_dropout). A pair longer than
chat.max_length is skipped (too_long), never truncated. Same checkpoints, exact resume, DDP/FSDP2, skip
counting as train.instruct; the loss is the mean over every pair of the step (all micro-batches and ranks),
ORPO's NLL the mean over every chosen token of the step.

``objective: grpo`` trains with GRPO and verifiable rewards instead, on instruct shards (conversations of
question/answer turns): the ``grpo:`` section (vlm.grpo.GRPOConfig), run by train/grpo.py with the same
model section, reference (LoRA: adapters off; full: a frozen copy; none when grpo.beta is 0) and Trainer.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from train.config import AssistantModelConfig, OptimConfig, TrainConfig, parse_run_config
from train.distributed import init_distributed
from train.instruct import assembly_shard_modules, build_assistant, build_stock, run
from train.trainer import StepContext
from vlm.data.chat import IGNORE, ChatConfig, SkipExample, encode, fit_length, normalize_conversation
from vlm.data.shards import DataConfig, ShardLoader
from vlm.grpo import GRPOConfig
from vlm.preference import PreferenceLossConfig, preference_loss, token_logps
from vlm.utils import cli

log = logging.getLogger("train.preference")


OBJECTIVES = ("preference", "grpo")


@dataclass
class PreferenceRunConfig:
    objective: str = "preference"  # preference: pairs and a DPO-family loss | grpo: sampled answers, rewards
    model: AssistantModelConfig = field(default_factory=AssistantModelConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preference: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)  # objective: preference
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # objective: grpo
    packing: bool = True  # the LLaVA assembly: a pair's chosen and rejected in one row (attention kept per part),
    #                       its images encoded once (train/pair_packing.py); stock VLMs: padded rows
    disable_dropout: bool = True  # dropout off in policy and reference (as TRL does): a stochastic reference or
    #                               policy would make the first step's loss differ from log 2 for no reason
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def needs_reference(self) -> bool:
        return self.grpo.beta > 0 if self.objective == "grpo" else self.preference.needs_reference


def last_turn_only(labels: list[int]) -> list[int]:
    """Keep the labels of the final response only (its tokens and end of turn: the last contiguous run);
    a multi-turn prompt's earlier answers are context, not what the pair compares."""
    end = max((i for i, t in enumerate(labels) if t != IGNORE), default=-1)
    if end < 0:
        raise SkipExample("masking_failed", "the response has no token of its own")
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [t if start <= i <= end else IGNORE for i, t in enumerate(labels)]


class PairSample:
    """sample_fn (loader workers): a preference sample -> the chosen and the rejected conversation encoded
    as train.instruct encodes them (the assembly's tokenizer or a stock VLM's processor)."""

    def __init__(self, chat: ChatConfig, tokenizer=None, image_seq_len: int = 0, processor=None):
        from dataclasses import replace

        # a pair that does not fit is skipped (too_long), never truncated: a cut could remove the response (the
        # pair would then compare an earlier answer of the prompt) or the part of it that makes it rejected
        self.chat = replace(chat, overlong="drop")
        self.tokenizer, self.n, self.processor = tokenizer, image_seq_len, processor

    def _encode(self, msgs, images):
        if self.processor is not None:
            from vlm.data.stock_chat import encode_stock

            ex = encode_stock(msgs, images, self.processor, self.chat)
            return {**ex, "labels": last_turn_only(ex["labels"])}
        image_id = self.tokenizer.convert_tokens_to_ids(self.chat.image_token)
        ids, labels = encode(msgs, self.tokenizer, self.chat, self.n)
        ids, labels = fit_length(ids, labels, self.chat, image_id)
        return {"input_ids": ids, "labels": last_turn_only(labels), "pixel_values": images}

    def __call__(self, sample: dict):
        meta = sample["meta"]
        prompt, chosen, rejected = meta.get("conversations"), meta.get("chosen"), meta.get("rejected")
        if not prompt or not isinstance(chosen, str) or not isinstance(rejected, str):
            return "not_a_preference_pair"
        images = [sample["image"], *sample["views"]]
        out = {"key": sample["key"]}
        try:
            for name, response in (("chosen", chosen), ("rejected", rejected)):
                conv = [*prompt, {"from": "gpt", "value": response}]
                msgs = normalize_conversation(conv, len(images), self.chat.image_token)
                out[name] = {"key": sample["key"], **self._encode(msgs, images)}
        except SkipExample as e:
            return e.reason
        return out


class PairCollate:
    """Pairs -> one padded batch of rows [chosen_1..chosen_P, rejected_1..rejected_P]."""

    def __init__(self, row_collate):
        self.rows = row_collate

    def __call__(self, pairs: list[dict]) -> dict:
        batch = self.rows([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        batch["pairs"] = len(pairs)
        batch["keys"] = [p["key"] for p in pairs]
        return batch


class PreferenceTask:
    """Per-pair preference loss averaged over every pair of the step (all micro-batches, all ranks)."""

    def __init__(self, cfg: PreferenceLossConfig, reference=None, lora: bool = False):
        self.cfg, self.reference, self.lora = cfg, reference, lora

    def _logps(self, model, b: dict, device):
        """-> (summed log-probabilities, label counts), each (2P,) as [chosen..., rejected...]."""
        if b.get("packed_pairs"):
            from train.pair_packing import packed_pair_logps

            return packed_pair_logps(model, b, device)
        inputs = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor) and k != "labels"}
        labels = b["labels"].to(device)
        lp = token_logps(model(**inputs, use_cache=False).logits, labels)
        return lp.sum(1), (labels[:, 1:] != IGNORE).sum(1)

    def _reference(self, model, b: dict, device):
        with as_reference(model, self.reference) as ref:
            return self._logps(ref, b, device)[0]

    def train_step(self, model, batches: list[dict], ctx: StepContext) -> dict:
        device = ctx.d.device
        pairs = torch.tensor(float(sum(b["pairs"] for b in batches)), device=device)
        if ctx.d.enabled:
            dist.all_reduce(pairs)
        pairs = pairs.clamp(min=1.0)
        orpo = self.cfg.loss == "orpo"
        if orpo:  # ORPO's NLL is a mean over every chosen token of the step, whatever the split
            chosen = torch.tensor(float(sum(int((chosen_labels(b)[:, 1:] != IGNORE).sum()) for b in batches)),
                                  device=device)
            if ctx.d.enabled:
                dist.all_reduce(chosen)
            chosen = chosen.clamp(min=1.0)
        total = torch.zeros((), device=device)
        sums: dict[str, torch.Tensor] = {}
        for j, b in enumerate(batches):
            with ctx.no_sync(last=j == len(batches) - 1), ctx.autocast():
                pi, n = self._logps(model, b, device)
                ref = self._reference(model, b, device) if self.cfg.needs_reference else None
                pi_w, pi_l = pi.chunk(2)
                n_w, n_l = n.chunk(2)
                ref_w, ref_l = ref.chunk(2) if ref is not None else (None, None)
                losses, metrics = preference_loss(self.cfg, pi_w, pi_l, n_w, n_l, ref_w, ref_l,
                                                  nll_w=torch.zeros_like(pi_w) if orpo else None)
                step_loss = losses.sum() / pairs
                if orpo:
                    step_loss = step_loss - pi_w.sum() / chosen  # + the chosen tokens' NLL, step-wide mean
                (step_loss * ctx.d.world_size).backward()
            total = total + step_loss.detach() * pairs
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.sum()
        out = {"loss": total * ctx.d.world_size / pairs}
        names = sorted(sums)
        stacked = torch.stack([sums[k].float() for k in names])
        if ctx.d.enabled:  # means over every pair of the step, on all ranks
            dist.all_reduce(stacked)
        out.update({k: v / pairs for k, v in zip(names, stacked)})
        return out

    def after_step(self, model) -> None:
        pass


def chosen_labels(b: dict) -> torch.Tensor:
    """The chosen responses' labels of a batch, padded rows (the first P) or packed pairs."""
    return b["chosen_labels"] if b.get("packed_pairs") else b["labels"][:b["pairs"]]


@contextlib.contextmanager
def as_reference(model, reference):
    """The module that computes the reference's log-probabilities, without gradient: the frozen copy
    ``reference`` (full tuning), or with ``reference`` None the policy ``model`` itself with its adapters
    switched off (LoRA: no second copy in memory)."""
    from train.distributed import unwrap
    from vlm.models.lora import adapters_disabled

    with torch.no_grad():
        if reference is not None:
            yield reference
            return
        with adapters_disabled(unwrap(model)) as n:
            if n == 0:
                raise RuntimeError("a LoRA reference needs adapters on the policy, found none")
            yield model


def reference_logps(model, reference, inputs: dict, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities (B, T - 1) of ``labels`` under the reference (``as_reference``), its logits
    divided by ``temperature``."""
    with as_reference(model, reference) as ref:
        return token_logps(ref(**inputs, use_cache=False).logits / temperature, labels)


def disable_dropout(model) -> int:
    """Every dropout of the model (attention, MLP, adapters) set to p=0. Returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p, n = 0.0, n + 1
        for key in ("attention_dropout", "attn_dropout", "dropout", "dropout_p"):  # attention kernels' dropout rates
            if isinstance(getattr(m, key, None), float) and getattr(m, key) > 0:
                setattr(m, key, 0.0)
                n += 1
    for c in {id(c): c for c in (model.config, *[getattr(model.config, k, None) for k in ("text_config",
                                                                                             "vision_config")])
              if c is not None}.values():
        for key in ("attention_dropout", "dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if isinstance(getattr(c, key, None), float) and getattr(c, key) > 0:
                setattr(c, key, 0.0)
                n += 1
    return n


def cast_like_the_policy(reference, policy, train_cfg, d) -> None:
    """Give the frozen reference the dtypes the trainer is about to give the policy (train.trainer's rule:
    master_dtype for every weight, or for the trainable ones only under bf16 autocast with DDP), so that the
    first step compares the policy with an identical reference (loss log 2)."""
    master = torch.bfloat16 if train_cfg.master_dtype == "bf16" else torch.float32
    only_trainable = train_cfg.precision == "bf16" and train_cfg.master_dtype == "fp32" and not (
        train_cfg.parallel in ("fsdp", "hsdp") and d.enabled)
    for r, p in zip(reference.parameters(), policy.parameters()):
        if r.is_floating_point() and (p.requires_grad or not only_trainable):
            r.data = r.data.to(master)
    if not only_trainable:
        for b in reference.buffers():
            if b.is_floating_point():
                b.data = b.data.to(master)


def build_policy(cfg: PreferenceRunConfig, d) -> dict:
    """The policy (train.instruct's model section: the LLaVA assembly or a stock VLM) as preference tuning
    and GRPO train it: with LoRA and a reference, only the adapters train; dropout off if configured.
    -> {"model", "tokenizer" (the assembly's) or "processor" (a stock VLM's), "shard" (FSDP2 units), "lora"}."""
    cfg.data.require_text = False
    m = cfg.model
    if cfg.chat.template == "plain":
        raise ValueError("chat.template=plain is LLaVA's stage-1 format; preference tuning renders conversations "
                         "with the chat template (chat.template=auto)")
    if not m.vlm and m.stage != 2:
        raise ValueError("preference tuning trains the LLM: model.stage=2 (full) or model.stage=2 with model.lora.r")
    lora = m.lora.r > 0
    out = {"lora": lora, "tokenizer": None, "processor": None}
    if m.vlm:
        from vlm.models.stock import decoder_layers

        model, out["processor"] = build_stock(cfg)  # (a train.instruct config section: same fields)
        cfg.data.image.output = "pil"
        shard = decoder_layers(model)
    else:
        model, out["tokenizer"] = build_assistant(cfg)
        shard = assembly_shard_modules(model)
    if lora and cfg.needs_reference:
        # the reference is this model with its adapters off: anything else that trained (a projector, the
        # vision tower) would move the reference too, so only the adapters train
        from vlm.models.lora import ADAPTER_PARAM

        frozen = 0
        for n, p in model.named_parameters():
            if p.requires_grad and not ADAPTER_PARAM.search(n):
                p.requires_grad = False
                frozen += 1
        if frozen:
            log.info("LoRA reference = the policy with its adapters off: %d other trainable tensors (projector, "
                     "vision) are frozen so that the reference stays the starting policy", frozen)
    if cfg.disable_dropout:
        disable_dropout(model)
    return {**out, "model": model, "shard": shard}


def build_reference(cfg: PreferenceRunConfig, policy, d, shard: tuple):
    """Full tuning with a reference: a frozen copy of the starting policy with the dtypes the trainer gives the
    policy, sharded like it under FSDP2 (no full copy per rank). None otherwise (LoRA: adapters off; or none
    needed)."""
    if not cfg.needs_reference or cfg.model.lora.r > 0:
        return None
    reference = copy.deepcopy(policy).eval()
    cast_like_the_policy(reference, policy, cfg.train, d)
    for p in reference.parameters():
        p.requires_grad = False
    reference.to(d.device)
    if cfg.train.parallel in ("fsdp", "hsdp"):
        from train.distributed import parallelize

        reference = parallelize(reference, d, cfg.train.parallel, shard, cfg.train.precision,
                                cfg.train.shard_group_size)
    return reference


def describe_reference(cfg: PreferenceRunConfig) -> str:
    return ("none needed" if not cfg.needs_reference else
            "the policy with its adapters switched off" if cfg.model.lora.r > 0 else
            "a frozen copy of the starting policy")


def build_run(cfg: PreferenceRunConfig, d) -> tuple[torch.nn.Module, dict]:
    """The policy, its reference and everything else ``Trainer(model, **kwargs)`` needs (either objective)."""
    from train.instruct import InstructCollate

    if cfg.objective == "grpo":
        from train.grpo import build_grpo_run

        return build_grpo_run(cfg, d)
    built = build_policy(cfg, d)
    model, shard, processor, tokenizer = built["model"], built["shard"], built["processor"], built["tokenizer"]
    if processor is not None:
        from vlm.data.stock_chat import StockCollate

        pad = processor.tokenizer.pad_token_id
        sample_fn = PairSample(cfg.chat, processor=processor)
        rows = StockCollate(False, 0, pad if pad is not None else 0)
    else:
        sample_fn = PairSample(cfg.chat, tokenizer, int(model.config.image_seq_length))
        rows = InstructCollate(False, 0, tokenizer.pad_token_id or 0)
    reference = build_reference(cfg, model, d, shard)
    if cfg.packing and processor is None:  # the assembly: a pair per row, its images encoded once
        from train.pair_packing import PackedPairCollate, install_encode_once

        for m in (model, reference):
            if m is not None and not install_encode_once(m):
                raise ValueError("packing pairs needs a LLaVA model (get_image_features); set packing=false")
        collate = PackedPairCollate(tokenizer.pad_token_id or 0)
    else:
        collate = PairCollate(rows)
    log.info("preference tuning: loss %s, beta %g; reference: %s", cfg.preference.loss, cfg.preference.beta,
             describe_reference(cfg))
    loader = ShardLoader(cfg.data, rank=d.rank, world_size=d.world_size, sample_fn=sample_fn, collate_fn=collate)
    task = PreferenceTask(cfg.preference, reference, built["lora"])
    return model, dict(task=task, loader=loader, cfg=cfg.train, optim_cfg=cfg.optim, d=d, run_config=cfg,
                       shard_modules=shard, tokenizer=processor if processor is not None else tokenizer)


@cli
def main(argv=None) -> int:
    cfg = parse_run_config("python -m train.preference", __doc__, PreferenceRunConfig, argv,
                           "train.steps=100 preference.loss=dpo preference.beta=0.1")
    return run(cfg, build_run, init_distributed())


if __name__ == "__main__":
    sys.exit(main())
