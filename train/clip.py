"""Contrastive pretraining of a medical CLIP (CLIP or SigLIP loss, optional concept alignment).

    python -m train.clip --config configs/clip/demo.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m train.clip --config configs/clip/biomedclip.yaml train.resume=latest

Same command on one CPU or many GPU nodes: DDP by default (train.parallel=fsdp for FSDP2), bf16
autocast by train.precision, checkpoints every train.save_every steps in
<train.output_dir>/checkpoints (resume with train.resume=latest), zero-shot evaluation on the
`zeroshot` sets every train.eval_every steps and at the end. Exit code 2 for a config error.
"""
from __future__ import annotations

import json
import logging
import math
import sys

import torch
import torch.nn as nn

from train.config import ClipRunConfig, LoraConfig, parse_run_config
from train.distributed import cleanup, init_distributed, repeated_blocks
from train.trainer import StepContext, Trainer
from vlm.checkpoint import load_weights_into
from vlm.data.shards import ShardLoader
from vlm.losses import concept_align_loss, contrastive_loss
from vlm.models.attention import set_attention
from vlm.models.clip import MedCLIP, build_tokenizer
from vlm.models.lora import inject_lora
from vlm.utils import cli, seed_everything, setup_logging

log = logging.getLogger("train.clip")


def sample_concepts(meta: dict, limit: int) -> list[str]:
    """The caption's present (non-negated) concept names, at most ``limit``, in text order."""
    names = []
    for c in meta.get("concepts") or []:
        name = c.get("name") if isinstance(c, dict) else str(c)
        if name and not (isinstance(c, dict) and c.get("negated")) and name not in names:
            names.append(name)
    return names[:limit]


class ClipTask:
    """One optimizer step of contrastive (+ concept) training, with exact gradient accumulation.

    With several micro-batches the loss is the loss of the whole accumulated batch: features of
    every micro-batch are computed once without gradients, then each micro-batch is recomputed
    with gradients and put back into the full feature matrices (open_clip's approach). Shared
    parameters that the loss uses directly (logit scales and biases, concept embeddings) get their
    gradient from one micro-batch only, the last (the one whose backward DDP synchronises: every trainable
    parameter must take part in it), so the summed gradient equals the large batch's exactly.
    """

    def __init__(self, cfg: ClipRunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.contrastive = contrastive_loss(cfg.loss)
        self.concepts = cfg.loss.concept_weight > 0

    def _features(self, model, batch, device, concept_tokens=None):
        return model(batch["images"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True),
                     patches=self.concepts, concept_tokens=concept_tokens)

    def _concept_inputs(self, batches):
        """-> (the concept names this rank encodes, all concept names in the loss's rank-major order, the
        concept set of every image of the global batch, rank-major).

        The concepts of a step are those of the *global* batch, each counted once however many ranks
        saw it (so W processes equal one process with the W-fold batch); rank r encodes every W-th of
        them in sorted order (a rank may encode none)."""
        import torch.distributed as dist

        per_image = [set(sample_concepts(m, self.cfg.loss.concepts_per_sample)) for b in batches for m in b["meta"]]
        names = sorted(set().union(*per_image)) if per_image else []
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return names, names, per_image
        rank, world = dist.get_rank(), dist.get_world_size()
        gathered = [None] * world
        dist.all_gather_object(gathered, (names, per_image))
        union = sorted({n for part in gathered for n in part[0]})
        per_image = [s for part in gathered for s in part[1]]
        return union[rank::world], [n for r in range(world) for n in union[r::world]], per_image

    def train_step(self, model: nn.Module, batches: list[dict], ctx: StepContext) -> dict:
        device = ctx.d.device
        raw = model.module if hasattr(model, "module") else model
        names, all_names, per_image = self._concept_inputs(batches) if self.concepts else ([], [], [])
        positives = torch.tensor([[float(n in s) for s in per_image] for n in all_names], device=device) \
            if all_names else None
        # concept names go through the model's forward (inside DDP), not around it
        ctoks = self.tokenizer(names).to(device) if names else None
        if len(batches) == 1:
            with ctx.autocast():
                out = self._features(model, batches[0], device, ctoks)
                concept_emb = out.get("concept_features")
                loss, parts = self._loss(raw, out, out["image_features"], out["text_features"],
                                         out.get("image_patches"), concept_emb, positives, live=True)
            loss.backward()
            return parts | {"logit_scale": out["logit_scale"].detach()}  # tensors: read at logging steps only
        with torch.no_grad(), ctx.autocast():  # pass 1: every micro-batch's features, no graph
            cached = [self._features(model, b, device) for b in batches]
        img = [c["image_features"] for c in cached]
        txt = [c["text_features"] for c in cached]
        pat = [c.get("image_patches") for c in cached]
        total: dict = {}
        for j, b in enumerate(batches):  # pass 2: one micro-batch with gradients at a time
            last = j == len(batches) - 1
            with ctx.no_sync(last=last), ctx.autocast():
                out = self._features(model, b, device, ctoks)
                img_j, txt_j, pat_j = list(img), list(txt), list(pat)
                img_j[j], txt_j[j], pat_j[j] = out["image_features"], out["text_features"], out.get("image_patches")
                concept_emb = out.get("concept_features")
                if concept_emb is not None and not last:
                    concept_emb = concept_emb.detach()
                loss, parts = self._loss(raw, out, torch.cat(img_j), torch.cat(txt_j),
                                         torch.cat(pat_j) if self.concepts else None, concept_emb, positives,
                                         live=last)
                loss.backward()
            if j == 0:
                total = parts
        return total | {"logit_scale": cached[0]["logit_scale"].detach()}

    def _loss(self, raw, out, img, txt, patches, concept_emb, positives, live: bool):
        """``live``: this micro-batch carries the gradient of the shared scales and biases."""
        scale = out["logit_scale"] if live else out["logit_scale"].detach()
        if self.cfg.loss.kind == "clip":
            contrastive = self.contrastive(img, txt, scale)
        else:
            bias = out["logit_bias"] if live else out["logit_bias"].detach()
            contrastive = self.contrastive(img, txt, scale, bias)
        parts = {"loss_contrastive": contrastive.detach()}
        loss = contrastive
        if self.concepts and positives is None:  # no concept anywhere in the global batch this step:
            # the concept head's parameters still take part (zero gradient), so DDP's buckets complete
            loss = loss + 0.0 * (raw.concept_logit_scale + raw.concept_logit_bias)
            parts["loss_concept"] = torch.zeros(())
        if positives is not None:
            cscale = raw.concept_logit_scale if live else raw.concept_logit_scale.detach()
            cbias = raw.concept_logit_bias if live else raw.concept_logit_bias.detach()
            if concept_emb is None:  # this rank has no concept, others do: still take part
                concept_emb = patches.new_zeros((0, patches.shape[-1]))
            concept = concept_align_loss(patches, concept_emb, positives, cscale, cbias)
            loss = loss + self.cfg.loss.concept_weight * concept
            parts["loss_concept"] = concept.detach()
        parts["loss"] = loss.detach()
        return loss, parts

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(self.cfg.loss.logit_scale_max))


def apply_lora(model: MedCLIP, tower: str, cfg: LoraConfig) -> int:
    """LoRA (peft) on the linears of one tower, the rest of the tower (its embeddings, norms and projection
    too) frozen under the adapters; returns how many modules got an adapter."""
    n = inject_lora(model, model.tower_prefix(tower), cfg.target, cfg.r, cfg.alpha, cfg.dropout,
                    adapter_name=f"lora_{tower}", method=cfg.method)
    model.freeze_tower(tower, keep=lambda name: f".lora_{tower}" in name or f"lora_{tower}." in name)
    return n


def build_model(cfg: ClipRunConfig) -> MedCLIP:
    m = cfg.model
    model = MedCLIP(m.name)
    if m.pretrained:
        from pathlib import Path

        from safetensors.torch import load_file

        from vlm.checkpoint import model_weights

        # a weights file (ours or an open_clip export's), or one of our checkpoint folders
        weights = model_weights(m.pretrained) if Path(m.pretrained).is_dir() else load_file(m.pretrained)
        ours = any(k.startswith("clip.") for k in weights)  # our checkpoint, or an open_clip export
        load_weights_into(model if ours else model.clip, weights, f"model.pretrained={m.pretrained}")
    if m.lock_image:
        model.lock_image(m.lock_image_unlocked_groups)
    if m.lock_text:
        model.lock_text(m.lock_text_unlocked_layers)
    for tower, lora in (("image", m.lora_image), ("text", m.lora_text)):
        if lora.r > 0:
            n = apply_lora(model, tower, lora)
            log.info("LoRA r=%d on %d %s-tower linears", lora.r, n, tower)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.loss.concept_weight == 0:  # unused parameters must not be trainable (DDP would skip their buckets)
        model.concept_logit_scale.requires_grad_(False)
        model.concept_logit_bias.requires_grad_(False)
    if cfg.loss.kind == "clip" and model.logit_bias is not None:
        model.logit_bias.requires_grad_(False)
    if cfg.loss.kind == "siglip" and model.logit_bias is None:
        raise ValueError(f"loss.kind=siglip needs a learnable logit bias, and architecture {m.name} has none: set "
                         "\"init_logit_bias\": -10 in its JSON (as configs/model/vit-b16-siglip-pubmedbert.json)")
    set_attention(model, m.attn_impl)
    return model


def make_eval_fn(cfg: ClipRunConfig, tokenizer, device):
    if not cfg.zeroshot:
        return None
    from vlm.zeroshot import zeroshot_eval

    def run(model, step):
        out = {}
        for z in cfg.zeroshot:
            metrics, _, _ = zeroshot_eval(model, tokenizer, z.folder, z.prompts, cfg.data.image, z.max_images, device)
            out[z.name] = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "mean_auroc")}
        return out

    return run


def build_run(cfg: ClipRunConfig, d) -> tuple[nn.Module, dict]:
    """The model and everything else ``Trainer(model, **kwargs)`` needs for this config (also used by
    train.rehearse, which must run exactly what train.clip runs)."""
    model = build_model(cfg)
    if cfg.data.image.size != model.image_size:
        raise ValueError(f"data.image.size={cfg.data.image.size} but model {cfg.model.name} expects "
                         f"{model.image_size} px")
    tokenizer = build_tokenizer(cfg.model.name)
    if d.world_size > 1 and not cfg.data.drop_last:
        # the contrastive losses all-gather equal-sized feature batches from every rank: an epoch's last,
        # partial batch on one rank (ranks skip different numbers of corrupt samples) would break the gather
        log.info("data.drop_last=true under %d ranks: every rank's batches are full (contrastive all-gather)",
                 d.world_size)
        cfg.data.drop_last = True
    loader = ShardLoader(cfg.data, rank=d.rank, world_size=d.world_size, tokenize=tokenizer)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model %s: %.2fM parameters (%.2fM trainable); %d samples in the shards; %d step(s) of %d x %d x %d",
             cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, n_train / 1e6,
             loader.dataset.num_samples, cfg.train.steps, d.world_size, cfg.optim.grad_accum,
             cfg.data.batch_size)
    # FSDP2: one unit per transformer block of either tower (found by structure: open_clip, timm or HF layers)
    shard = tuple({type(b) for b in repeated_blocks(model)})
    return model, dict(task=ClipTask(cfg, tokenizer), loader=loader, cfg=cfg.train, optim_cfg=cfg.optim, d=d,
                       shard_modules=shard,
                       run_config=cfg, eval_fn=make_eval_fn(cfg, tokenizer, d.device),
                       eval_model_fn=lambda: build_model(cfg))


@cli
def main(argv=None) -> int:
    cfg = parse_run_config("python -m train.clip", __doc__, ClipRunConfig, argv, "train.steps=100 optim.lr=1e-4")
    d = init_distributed()
    setup_logging(quiet=not d.is_main)
    try:
        seed_everything(cfg.train.seed)  # the same initial weights on every rank (FSDP2 shards them as built)
        model, kwargs = build_run(cfg, d)
        seed_everything(cfg.train.seed + d.rank)
        trainer = Trainer(model, **kwargs)
        result = trainer.fit()
        if d.is_main and result["preempted"]:
            log.info("stopped at step %d by SIGTERM; continue with train.resume=latest", result["step"])
        elif d.is_main:
            from vlm.utils import atomic_write_text

            summary = {"step": result["step"], "final_metrics": result["metrics"], "zeroshot": result["eval"],
                       "checkpoint_dir": str(trainer.ckpt_dir)}
            atomic_write_text(trainer.out / "result.json", json.dumps(summary, indent=1) + "\n")
            log.info("done: %s", json.dumps(summary["zeroshot"]))
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
