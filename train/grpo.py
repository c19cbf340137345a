"""GRPO with verifiable rewards: ``python -m train.preference --config FILE`` with ``objective: grpo``.

    torchrun --nproc_per_node 8 -m train.preference --config configs/preference/vqa_grpo_qwen2_5_vl_7b.yaml

Data: instruct shards (LLaVA conversations in the samples' metadata: data_prep.synth's ``instruct``,
``data_prep.shards --format slake / vqa_rad / llava``). Every (question, answer) turn pair of a sample's
conversation becomes a prompt, in conversation order, filtered by ``grpo.questions`` (closed: the reference
answer is yes or no; open: any other) and cut at ``grpo.max_questions`` per sample; the question (its image
token removed) goes into the ``grpo.prompt`` template and is rendered with the sample's image exactly as
``eval.vqa generate`` renders a question (vlm/generate.py ``prompt_ids`` / ``stock_prompt``), so the policy is
trained on the prompts it is evaluated on. A question is asked on its own (a follow-up that needs the earlier
turns is asked without them). A sample with more than one image, or whose prompts plus ``grpo.max_new_tokens``
exceed ``chat.max_length``, is skipped and counted (multi_image, too_long).

Each optimizer step, per micro-batch of P prompts: G = ``grpo.group_size`` answers per prompt sampled by the
policy (the batched engine, vlm/generate.py; temperature, top-p; under DDP the unwrapped module, under FSDP2
the sharded one with ``synced_gpus``, one generate call per micro-batch on every rank), the rewards (the
weighted sum of ``grpo.rewards``, vlm/rewards.py) on the decoded answers, the group-normalised advantages, then
the answers' token log-probabilities under the policy (with gradient) and under the reference (no gradient;
LoRA: the policy with its adapters off; full tuning: a frozen copy; no reference forward at all when
``grpo.beta`` is 0), and ``vlm.grpo.grpo_loss`` with one update per generation (old log-probs = the policy's,
detached). The step's loss is ``grpo_loss`` over every answer of the step at once (all micro-batches, all
ranks): each micro-batch's loss is rescaled by its share of the step's answers (grpo, dr_grpo) or tokens
(bnpo), counted over all ranks before any backward, so neither the loss nor the gradient depends on how the
prompts are split. ``scale_rewards: batch`` divides by the std of every reward of the step (all ranks).

The sampling seed of a micro-batch is a function of (train.seed, rank, the loader's position: epoch and
batches read, a count of the steps that a checkpoint restores exactly, and the micro-batch's index), and the
sampling runs on a forked RNG (the run's own stream is left as it was), so a killed and resumed run samples
the same answers and ends with the same weights as one that ran straight.

Logged (means over every answer of the step, all ranks): loss, reward (the weighted sum), reward/<name> (each
reward, unweighted), reward_std (the std within a group, mean over groups), frac_reward_zero_std (groups whose
answers all got the same reward: no signal), completion_length (tokens), clip_ratio, kl (when beta > 0).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.distributed as dist

from train.distributed import unwrap
from train.preference import build_policy, build_reference, describe_reference, reference_logps
from train.trainer import StepContext
from vlm.data.chat import IGNORE, SkipExample, normalize_conversation
from vlm.data.shards import ShardLoader
from vlm.generate import decode_answer, generate, generate_stock, prompt_ids, stock_prompt
from vlm.grpo import GRPOConfig, group_advantages, grpo_loss
from vlm.preference import token_logps
from vlm.rewards import get_reward, is_closed

log = logging.getLogger("train.grpo")


def question_pairs(messages: list[dict], image_token: str) -> list[tuple[str, str]]:
    """Chat messages -> (question, answer) for every user turn answered by the next turn, in order; the
    question without its image token."""
    out = []
    for q, a in zip(messages, messages[1:]):
        if q["role"] == "user" and a["role"] == "assistant":
            question = q["content"].replace(image_token, "").strip()
            if question:
                out.append((question, a["content"].strip()))
    return out


class QuestionSample:
    """sample_fn (loader workers): an instruct sample -> its prompts, each {"question", "answer", and what
    generation and the training forward need: the assembly's "input_ids" (image tokens expanded) and
    "pixel_values", or a stock VLM's rendered "prompt", PIL "image" and its processor outputs}."""

    def __init__(self, cfg: GRPOConfig, chat, tokenizer=None, image_seq_len: int = 0, processor=None):
        self.cfg, self.chat, self.tokenizer, self.n, self.processor = cfg, chat, tokenizer, image_seq_len, processor

    def _prompt(self, text: str, image) -> dict:
        if self.processor is None:
            return {"input_ids": prompt_ids(self.tokenizer, text, self.chat.image_token, self.n),
                    "pixel_values": image}
        from vlm.data.stock_chat import TOKEN_FIELDS

        prompt = stock_prompt(self.processor, text)
        try:
            enc = self.processor(text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt")
        except (ValueError, RuntimeError, TypeError) as e:  # e.g. Qwen2-VL refuses aspect ratios beyond 200
            raise SkipExample("image_rejected", f"the processor rejected the image: {e}") from None
        return {"prompt": prompt, "image": image, "input_ids": enc["input_ids"][0].tolist(),
                "tokens": {k: enc[k][0].tolist() for k in TOKEN_FIELDS if k in enc},
                "images": {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", *TOKEN_FIELDS)}}

    def __call__(self, sample: dict):
        conv = sample["meta"].get("conversations")
        if not conv:
            return "no_conversation"
        if sample["views"]:
            return "multi_image"  # one image per question, as eval.vqa asks it
        cfg, prompts, too_long = self.cfg, [], False
        try:
            msgs = normalize_conversation(conv, 1, self.chat.image_token)
            for question, answer in question_pairs(msgs, self.chat.image_token):
                if cfg.questions != "all" and is_closed(answer) != (cfg.questions == "closed"):
                    continue
                p = self._prompt(cfg.prompt.replace("{question}", question), sample["image"])
                if len(p["input_ids"]) + cfg.max_new_tokens > self.chat.max_length:
                    too_long = True
                    continue
                prompts.append({"question": question, "answer": answer, **p})
                if len(prompts) == cfg.max_questions:
                    break
        except SkipExample as e:
            return e.reason
        if not prompts:
            if too_long:
                return "too_long"
            return "no_question" if cfg.questions == "all" else f"no_{cfg.questions}_question"
        return {"key": sample["key"], "prompts": prompts}


def collate_questions(samples: list[dict]) -> dict:
    """Samples -> {"keys": one per sample, "prompts": every prompt of them, in order}."""
    return {"keys": [s["key"] for s in samples], "prompts": [p for s in samples for p in s["prompts"]]}


@contextmanager
def root_unsharded(module):
    """Under FSDP2, the root unit's parameters (those outside the per-layer units: the vision tower's stem, the
    projector, embeddings, LM head) all-gathered for the span of a generate call: transformers' generate runs
    the image encoder before its first forward, outside the root's hooks. The decoder layers stay sharded,
    gathered per forward by their own hooks (``synced_gpus`` keeps every rank stepping). A no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    # generate may run the vision blocks (units of their own) before any forward through the root, and FSDP2
    # decides which unit is the root at the first root forward: settle that first (idempotent)
    module._get_fsdp_state()._lazy_init()
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _repeat(xs: list, g: int) -> list:
    return [x for x in xs for _ in range(g)]


class AssemblyRollout:
    """Sampling and training rows for the LLaVA assembly."""

    def __init__(self, tokenizer, cfg: GRPOConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def sample(self, model, prompts: list[dict], seed: int, synced: bool) -> list[list[int]]:
        """-> P x G completions (token ids, each up to and including its stop token), grouped by prompt."""
        c = self.cfg
        requests = _repeat([{"input_ids": p["input_ids"], "pixel_values": p["pixel_values"]} for p in prompts],
                           c.group_size)
        return generate(model, self.tokenizer, requests, batch_size=len(requests), max_new_tokens=c.max_new_tokens,
                        do_sample=True, temperature=c.temperature, top_p=c.top_p, seed=seed, synced_gpus=synced,
                        return_ids=True)

    def decode(self, ids: list[int]) -> str:
        return decode_answer(self.tokenizer, ids)

    def rows(self, prompts: list[dict], completions: list[list[int]]) -> tuple[dict, torch.Tensor]:
        """Prompt + completion rows, right-padded (B = P x G, W): the forward's inputs and labels (the
        completion's tokens; IGNORE on the prompt and the padding)."""
        from train.instruct import InstructCollate

        examples = [{"key": "", "input_ids": p["input_ids"] + c, "labels": [IGNORE] * len(p["input_ids"]) + c,
                     "pixel_values": [p["pixel_values"]]}
                    for p, c in zip(_repeat(prompts, self.cfg.group_size), completions)]
        batch = InstructCollate(False, 0, self.pad)(examples)  # right-padded rows with their padding mask
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}, batch["labels"]


class StockRollout(AssemblyRollout):
    """Sampling and training rows for a stock VLM (its processor renders, expands and preprocesses)."""

    def __init__(self, processor, cfg: GRPOConfig):
        super().__init__(processor.tokenizer, cfg)
        self.processor = processor

    def sample(self, model, prompts: list[dict], seed: int, synced: bool) -> list[list[int]]:
        c = self.cfg
        texts = _repeat([p["prompt"] for p in prompts], c.group_size)
        images = _repeat([[p["image"]] for p in prompts], c.group_size)
        return generate_stock(model, self.processor, texts, images, batch_size=len(texts),
                              max_new_tokens=c.max_new_tokens, do_sample=True, temperature=c.temperature,
                              top_p=c.top_p, seed=seed, synced_gpus=synced, return_ids=True)

    def rows(self, prompts: list[dict], completions: list[list[int]]) -> tuple[dict, torch.Tensor]:
        from vlm.data.stock_chat import StockCollate

        examples = [{"input_ids": p["input_ids"] + c, "labels": [IGNORE] * len(p["input_ids"]) + c,
                     "tokens": {k: v + [0] * len(c) for k, v in p["tokens"].items()},  # answer tokens are text
                     "images": p["images"]}
                    for p, c in zip(_repeat(prompts, self.cfg.group_size), completions)]
        batch = StockCollate(False, 0, self.pad)(examples)
        return {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}, batch["labels"]


class GRPOTask:
    """Sample, reward, and the GRPO loss of every answer of the step (see the module docstring)."""

    def __init__(self, cfg: GRPOConfig, rollout, reference=None, fsdp: bool = False, loader=None, seed: int = 0,
                 rank: int = 0):
        self.cfg, self.rollout, self.reference, self.fsdp = cfg, rollout, reference, fsdp
        self.loader, self.seed, self.rank, self.calls = loader, seed, rank, 0
        weights = cfg.reward_weights
        self.names = list(weights)
        self.fns = [get_reward(n) for n in self.names]
        self.weights = torch.tensor([weights[n] for n in self.names], dtype=torch.float64)
        self.last: list[dict] = []  # the last step's rollouts (prompts, completions, texts, rewards, advantages)

    def _seed(self, micro: int) -> int:
        """The sampling seed of micro-batch ``micro`` of this step: a function of (train.seed, rank, the data
        position: epoch and batches read, which count the steps and are restored exactly on resume; without a
        loader, the task's own step count)."""
        import numpy as np

        where = (self.loader.epoch, self.loader.batches) if self.loader is not None else (0, self.calls)
        return int(np.random.SeedSequence([self.seed, self.rank, *where, micro]).generate_state(1)[0] % 2 ** 31)

    def _rollout(self, model, prompts: list[dict], ctx: StepContext, seed: int) -> dict:
        policy = unwrap(model)  # DDP: its module; FSDP2: the sharded module itself (synced_gpus)
        device = ctx.d.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ctx.autocast(), \
                root_unsharded(policy):
            completions = self.rollout.sample(policy, prompts, seed, self.fsdp)
        texts = [self.rollout.decode(c) for c in completions]
        asked = _repeat(prompts, self.cfg.group_size)
        rewards = torch.tensor([[fn(t, p["answer"], p["question"]) for fn in self.fns] for p, t in zip(asked, texts)],
                               dtype=torch.float64).reshape(len(texts), len(self.fns))  # (P x G, R)
        return {"prompts": prompts, "completions": completions, "texts": texts, "rewards": rewards,
                "total": rewards @ self.weights}

    def train_step(self, model, batches: list[dict], ctx: StepContext) -> dict:
        cfg, d, device, g = self.cfg, ctx.d, ctx.d.device, self.cfg.group_size
        self.calls += 1
        rolls = [self._rollout(model, b["prompts"], ctx, self._seed(j)) for j, b in enumerate(batches)]
        # step-wide counts before any backward: answers, answer tokens, and the sums for a batch-wide std
        totals = torch.cat([r["total"] for r in rolls])
        counts = torch.tensor([len(totals), sum(len(c) for r in rolls for c in r["completions"]),
                               float(totals.sum()), float((totals ** 2).sum())], dtype=torch.float64, device=device)
        if d.enabled:
            dist.all_reduce(counts)
        n_all, tok_all, s1, s2 = counts.tolist()
        batch_std = max(s2 - s1 * s1 / n_all, 0.0) / max(n_all - 1, 1) if cfg.scale_rewards == "batch" else 1.0
        batch_std = batch_std ** 0.5  # Bessel-corrected, as group_advantages
        loss = torch.zeros((), device=device)
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("clip_ratio", "kl")}
        for j, r in enumerate(rolls):
            if cfg.scale_rewards == "batch":  # the group's mean removed, divided by the std of the whole step
                adv = group_advantages(r["total"], g, "none") / (batch_std + 1e-4)
            else:
                adv = group_advantages(r["total"], g, cfg.scale_rewards)
            r["advantages"] = adv
            inputs, labels = self.rollout.rows(r["prompts"], r["completions"])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            labels = labels.to(device)
            mask = labels[:, 1:] != IGNORE  # (B, W - 1): the predictions of the completion tokens
            n_tok = int(mask.sum())
            with ctx.no_sync(last=j == len(rolls) - 1), ctx.autocast():
                # the log-probabilities of the distribution the answers were sampled from: logits / temperature,
                # for the policy and the reference alike (as TRL computes them)
                logps = token_logps(model(**inputs, use_cache=False).logits / cfg.temperature, labels)  # (B, W - 1)
                ref = reference_logps(model, self.reference, inputs, labels, cfg.temperature) if cfg.beta > 0 \
                    else None
                part, metrics = grpo_loss(logps, None, adv.to(device), mask, ref, beta=cfg.beta, eps_low=cfg.eps_low,
                                          eps_high=cfg.eps_high, loss_type=cfg.loss_type,
                                          max_completion_length=cfg.max_new_tokens,
                                          kl_ratio_correction=cfg.kl_ratio_correction)
                # this micro-batch's share of grpo_loss over the whole step: answers (grpo: a mean of per-answer
                # means; dr_grpo: divided by answers x max tokens) or tokens (bnpo: a token mean)
                share = n_tok / tok_all if cfg.loss_type == "bnpo" else len(r["completions"]) / n_all
                part = part * share
                (part * d.world_size).backward()  # DDP / FSDP2 average the gradient over ranks
            loss = loss + part.detach()
            for k, v in metrics.items():
                sums[k] = sums[k] + v.double() * n_tok  # token means -> token sums
        self.last = rolls
        return self._metrics(rolls, loss, sums, n_all, tok_all, d)

    def _metrics(self, rolls, loss, sums, n_all, tok_all, d) -> dict:
        g, device = self.cfg.group_size, d.device
        rewards = torch.cat([r["rewards"] for r in rolls])
        totals = torch.cat([r["total"] for r in rolls]).view(-1, g)  # (groups, G)
        std = totals.std(1)
        local = torch.cat([rewards.sum(0), torch.stack([
            totals.sum(), std.sum(), torch.isclose(std, torch.zeros_like(std)).double().sum(),
            torch.tensor(float(len(std)), dtype=torch.float64)])]).to(device)
        if d.enabled:
            dist.all_reduce(local)
            for k in sums:
                dist.all_reduce(sums[k])
        groups = local[-1].clamp(min=1)
        out = {"loss": loss * d.world_size,  # the trainer averages over ranks: the sum of every rank's share
               "reward": local[-4] / n_all, "reward_std": local[-3] / groups,
               "frac_reward_zero_std": local[-2] / groups,
               "completion_length": torch.tensor(tok_all / n_all), "clip_ratio": sums["clip_ratio"] / tok_all}
        out.update({f"reward/{n}": local[i] / n_all for i, n in enumerate(self.names)})
        if self.cfg.beta > 0:
            out["kl"] = sums["kl"] / tok_all
        return out

    def after_step(self, model) -> None:
        pass


def build_grpo_run(cfg, d) -> tuple[torch.nn.Module, dict]:
    """train.preference's build_run for ``objective: grpo``: the policy, its reference, the loader of prompts
    and the task, for ``Trainer(model, **kwargs)``."""
    if cfg.chat.system_prompt:
        raise ValueError("chat.system_prompt does not apply to objective: grpo (prompts are rendered as eval.vqa "
                         "generate renders them, with no system message); put instructions in grpo.prompt")
    built = build_policy(cfg, d)
    model, shard, processor, tokenizer = built["model"], built["shard"], built["processor"], built["tokenizer"]
    if processor is not None:
        sample_fn = QuestionSample(cfg.grpo, cfg.chat, processor=processor)
        rollout = StockRollout(processor, cfg.grpo)
    else:
        sample_fn = QuestionSample(cfg.grpo, cfg.chat, tokenizer, int(model.config.image_seq_length))
        rollout = AssemblyRollout(tokenizer, cfg.grpo)
    reference = build_reference(cfg, model, d, shard)
    g = cfg.grpo
    log.info("GRPO: G=%d, temperature %g, top_p %g, beta %g, loss %s, rewards %s; reference: %s", g.group_size,
             g.temperature, g.top_p, g.beta, g.loss_type, g.reward_weights, describe_reference(cfg))
    loader = ShardLoader(cfg.data, rank=d.rank, world_size=d.world_size, sample_fn=sample_fn,
                         collate_fn=collate_questions)
    task = GRPOTask(g, rollout, reference, fsdp=cfg.train.parallel in ("fsdp", "hsdp") and d.enabled, loader=loader,
                    seed=cfg.train.seed, rank=d.rank)
    return model, dict(task=task, loader=loader, cfg=cfg.train, optim_cfg=cfg.optim, d=d, run_config=cfg,
                       shard_modules=shard, tokenizer=processor if processor is not None else tokenizer)
