"""The training loop shared by every entry point: steps, accumulation, AMP, clipping, non-finite
handling, EMA, logging (console, TensorBoard, Weights & Biases) and Stateful checkpoints.

A task (CLIP pretraining, instruction tuning) owns its forward and backward for one optimizer
step (``task.train_step``): CLIP needs the whole accumulated batch in one loss, language
modelling does not. The trainer owns everything else, so both resume the same way.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from train.distributed import (Dist, all_reduce_mean, clip_grad_norm, parallelize, set_master_dtype,
                               sync_replicated_grads, unwrap)
from train.optim import EMA, build_optimizer, build_scheduler
from vlm import checkpoint as ckpt

log = logging.getLogger(__name__)


class Task(Protocol):
    def train_step(self, model: nn.Module, batches: list[dict], ctx: "StepContext") -> dict[str, float]:
        """Forward + backward of one optimizer step over ``batches`` (the accumulated micro-batches).
        Returns float metrics; must include "loss" (already averaged over ranks or not: the trainer
        averages)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. clamp the logit scale)."""


class StepContext:
    def __init__(self, model: nn.Module, d: Dist, precision: str):
        self.model, self.d, self.precision = model, d, precision

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, last: bool):
        """DDP gradient sync only on the last backward of a step."""
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()


class NonFiniteError(RuntimeError):
    pass


class Preempted(BaseException):
    """Raised by the SIGTERM handler while the loop waits for data (a loader still looking for a sample).
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way (image decoding in
    the main process) can swallow it."""


class StopWatch:
    """Makes a SIGTERM that reached some ranks reach all of them, even a rank whose loader is still looking for a
    sample (it never gets to the per-step agreement). The rank that saw the signal posts a key in the process
    group's store; every rank polls it each second from a thread and, when it appears, stops too (a rank
    waiting for data is interrupted by a SIGTERM to itself, which raises Preempted there)."""

    fits = 0  # one key per Trainer.fit, numbered alike on every rank (they build trainers in the same order)

    def __init__(self, trainer: "Trainer"):
        self.trainer, self.done = trainer, threading.Event()
        StopWatch.fits += 1
        self.key = f"medvlm/stop/{StopWatch.fits}"
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()
        except Exception as e:  # no store to share the flag through: every rank must then get the signal
            log.warning("no process-group store (%s): SIGTERM must reach every rank to stop the run", e)
            self.store = None
        self.thread = threading.Thread(target=self._watch, name="medvlm-stop-watch", daemon=True)
        if self.store is not None:
            self.thread.start()

    def _watch(self) -> None:
        t, posted = self.trainer, False
        while not self.done.wait(1.0):
            try:
                if t._stop_requested and not posted:
                    self.store.set(self.key, str(t.d.rank))
                    posted = True
                elif not t._stop_requested and self.store.check([self.key]):
                    t._stop_requested = True
                    if t._waiting_for_data:
                        os.kill(os.getpid(), signal.SIGTERM)  # interrupt the wait (the handler raises Preempted)
            except Exception:  # the store is gone (shutdown): nothing left to watch
                return

    def close(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


class Trainer:
    def __init__(self, model: nn.Module, task: Task, loader, cfg, optim_cfg, d: Dist, run_config: Any,
                 eval_fn: Optional[Callable[[nn.Module, int], dict]] = None, lr_scales: dict | None = None,
                 shard_modules: tuple = (), eval_model_fn: Optional[Callable[[], nn.Module]] = None):
        """``eval_fn(model, step)`` runs on rank 0 on an unsharded model: the training model itself
        (one process, DDP), or under FSDP2 a copy built by ``eval_model_fn`` holding the gathered weights
        (the same weights a checkpoint saved at that step holds)."""
        self.cfg, self.optim_cfg, self.d, self.task, self.loader = cfg, optim_cfg, d, task, loader
        self.run_config = run_config
        self.eval_fn, self.eval_model_fn, self._eval_model = eval_fn, eval_model_fn, None
        if eval_fn is not None and cfg.parallel == "fsdp" and d.enabled and eval_model_fn is None:
            raise ValueError("evaluation during FSDP training needs eval_model_fn (an unsharded model to load into)")
        self.raw_model = model
        master = torch.bfloat16 if cfg.master_dtype == "bf16" else torch.float32
        # FSDP2 needs one dtype per unit, fp32 compute needs fp32 weights; with DDP and bf16 autocast, frozen
        # weights may stay as stored (a LoRA run's bf16 base LLM keeps its memory)
        only_trainable = cfg.precision == "bf16" and cfg.master_dtype == "fp32" and not (
            cfg.parallel == "fsdp" and d.enabled)
        cast = set_master_dtype(model, master, only_trainable)
        if cast:
            log.info("master weights: %d tensors cast to %s (train.master_dtype=%s%s)", cast, master, cfg.master_dtype,
                     ", trainable ones" if only_trainable else "")
        if cfg.master_dtype == "bf16":
            log.warning("train.master_dtype=bf16: weights and optimizer states in bf16; updates smaller than "
                        "bf16's resolution (~0.4%% of a weight) are lost")
        self.model = parallelize(model, d, cfg.parallel, shard_modules, cfg.precision)
        self.opt = build_optimizer(self.model, optim_cfg, lr_scales)
        self.sched = build_scheduler(self.opt, optim_cfg, cfg.steps)
        self.ema = EMA(self.raw_model, optim_cfg.ema_decay) if optim_cfg.ema_decay > 0 else None
        self.step, self.nonfinite_total, self.nonfinite_run = 0, 0, 0
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.writer = self.wandb = None
        self._batches: Optional[Iterator] = None
        self._last_saved = -1
        self._last_eval: tuple[int, dict] = (-1, {})
        self._first_step = 0
        self._stop_requested = False  # SIGTERM seen by this rank
        self._waiting_for_data = False
        self._data_pos: Optional[dict] = None  # the data position to save when a fetched step did not run

    # -- state -------------------------------------------------------------------------------
    def _model_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _optim_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self) -> None:
        model_state, optim_state = self._model_state(), self._optim_state()  # collective under FSDP
        ema_state = self.ema.state_dict(model_state, self.d.is_main) if self.ema else None  # collective under FSDP
        plain_rng, tensor_rng = ckpt.rng_state()
        # every rank's own data position: ranks read different shards, skip different samples
        data = self._data_pos if self._data_pos is not None else self.loader.state_dict()
        ranks = [None] * self.d.world_size
        if self.d.enabled:
            dist.all_gather_object(ranks, (plain_rng, tensor_rng, data))
        else:
            ranks = [(plain_rng, tensor_rng, data)]
        if self.d.is_main:
            train_state = {"optimizer": optim_state, "scheduler": self.sched.state_dict(),
                           "rng": [t for _, t, _ in ranks]}
            state = {"step": self.step, "data": [x for _, _, x in ranks], "rng": [p for p, _, _ in ranks],
                     "nonfinite_total": self.nonfinite_total, "world_size": self.d.world_size,
                     "config": _jsonable(self.run_config)}
            path = ckpt.save(self.ckpt_dir, self.step, model_state, train_state, state, ema_state, self.cfg.keep_last)
            log.info("checkpoint -> %s", path)
        if self.d.enabled:
            dist.barrier()
        self._last_saved = self.step

    def resume(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        model_state, train_state, state, ema = ckpt.load(path)
        if state["world_size"] != self.d.world_size:
            raise ckpt.CheckpointError(f"{path} was written with world size {state['world_size']}; this run has "
                                       f"{self.d.world_size} (exact resume needs the same)")
        if self.cfg.parallel != "fsdp" or not self.d.enabled:
            ckpt.check_weights(unwrap(self.model), model_state, str(path))
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=opts)
        if all(p.ndim == 0 for g in self.opt.param_groups for p in g["params"]):
            self._load_scalar_optim_state(train_state["optimizer"])  # torch cannot place 0-dim-only states
        else:
            set_optimizer_state_dict(self.model, self.opt, train_state["optimizer"], options=opts)
        self.sched.load_state_dict(train_state["scheduler"])
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        data = state["data"]  # one position per rank (a single dict in checkpoints of older versions)
        self.loader.load_state_dict(data[self.d.rank] if isinstance(data, list) else data)
        ckpt.set_rng_state(state["rng"][self.d.rank], train_state["rng"][self.d.rank])
        self.step, self.nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        self._first_step = self.step
        self._last_saved = self.step
        log.info("resumed from %s at step %d (epoch %d, %d batches into it)", path, self.step,
                 self.loader.epoch, self.loader.batches)

    def _load_scalar_optim_state(self, saved: dict) -> None:
        """Load an optimizer state saved by name (get_optimizer_state_dict) when every trained parameter is a
        0-dim scalar (both towers locked: only the logit scale trains), which set_optimizer_state_dict
        refuses ("Expected device to be set"). Scalars are never sharded, so plain ids suffice."""
        names = {id(p): n for n, p in unwrap(self.model).named_parameters()}
        state, groups, i = {}, [], 0
        for g_saved, g in zip(saved["param_groups"], self.opt.param_groups):
            ids = []
            for p in g["params"]:
                if names[id(p)] in saved["state"]:
                    state[i] = saved["state"][names[id(p)]]
                ids.append(i)
                i += 1
            groups.append({**{k: v for k, v in g_saved.items() if k != "params"}, "params": ids})
        self.opt.load_state_dict({"state": state, "param_groups": groups})

    # -- data ----------------------------------------------------------------------------------
    def _fetch(self) -> Optional[list[dict]]:
        """The step's micro-batches, or None when SIGTERM interrupted the wait for them. The position
        before the fetch is kept: if the step does not run, that is the position a checkpoint saves."""
        self._data_pos = self.loader.state_dict()
        self._waiting_for_data = True
        try:
            if self._stop_requested:
                return None
            return [self._next_batch() for _ in range(self.optim_cfg.grad_accum)]
        except Preempted:
            self._batches = None  # a half-consumed iterator: shut its workers down
            return None
        finally:
            self._waiting_for_data = False

    def _on_sigterm(self, *_) -> None:
        self._stop_requested = True
        if self._waiting_for_data:  # a loader still looking for a sample must not make us deaf
            raise Preempted()

    def _agree_stop(self, local: bool) -> bool:
        """True on every rank if any rank wants to stop (SIGTERM may reach only some ranks, or reach them
        at different points of a step): the ranks then save one checkpoint together."""
        if not self.d.enabled:
            return local
        flag = torch.tensor([int(local)], device=self.d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _next_batch(self) -> dict:
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                if self.loader.batches == 0:
                    skipped = self.loader.skipped
                    why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
                    raise RuntimeError(f"the data stream yielded no batch for a whole epoch on rank {self.d.rank} "
                                       f"(skipped: {why or 'nothing'}): check data.sources") from None
                self.loader.set_epoch(self.loader.epoch + 1)
                self._batches = None

    # -- logging -------------------------------------------------------------------------------
    def _open_loggers(self) -> None:
        if not self.d.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(_jsonable(self.run_config), indent=1))
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if self.cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("train.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=self.cfg.wandb_project, config=_jsonable(self.run_config),
                                    dir=str(self.out), resume="allow")

    def _log(self, metrics: dict) -> None:
        if not self.d.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self.writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, self.step)
        if self.wandb:
            self.wandb.log(metrics, step=self.step)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``train.steps``. SIGTERM on any rank (Slurm preemption, torchrun shutting down) makes
        every rank stop after the current step (StopWatch carries it to ranks that did not get it), write one
        complete checkpoint together and return ``preempted: True``; a requeued job continues with
        ``train.resume=latest``."""
        path = ckpt.resolve(self.cfg.resume, self.ckpt_dir)
        if path is not None:
            self.resume(path)
        elif self.cfg.resume and self.cfg.resume != "latest":
            raise ckpt.CheckpointError(f"train.resume={self.cfg.resume}: not found")
        self._open_loggers()
        ctx = StepContext(self.model, self.d, self.cfg.precision)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not (self.cfg.progress and self.d.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        self._last_metrics: dict = {}
        self._t_log, self._samples_since = time.time(), 0
        prev = signal.signal(signal.SIGTERM, self._on_sigterm)
        watch = StopWatch(self) if self.d.enabled else None
        preempted = False
        try:
            while self.step < self.cfg.steps:
                t0 = time.time()
                batches = self._fetch()
                if self._agree_stop(batches is None or self._stop_requested):
                    preempted = True
                    break
                self._data_pos = None  # the fetched batches are this step's: the loader's position is saved
                self._train_step(batches, ctx, time.time() - t0, bar)
            if preempted:
                log.warning("SIGTERM: every rank stops at step %d and saves a checkpoint", self.step)
            if self._last_saved != self.step:
                self.save()
            results = {}
            if self.eval_fn and not preempted:
                results = self._last_eval[1] if self._last_eval[0] == self.step else self._eval()
        finally:
            if watch is not None:
                watch.close()
            bar.close()
            signal.signal(signal.SIGTERM, prev)
            self._batches = None
            if self.writer:
                self.writer.close()
            if self.wandb:
                self.wandb.finish()
        return {"step": self.step, "metrics": self._last_metrics, "eval": results, "preempted": preempted}

    def _train_step(self, batches: list[dict], ctx: StepContext, data_time: float, bar) -> None:
        self.model.train()
        metrics = self.task.train_step(self.model, batches, ctx)
        sync_replicated_grads(self.model)
        if self.step == self._first_step:
            self._check_all_params_used()
        loss = all_reduce_mean(torch.tensor([metrics["loss"]], device=self.d.device)).item()
        if self.optim_cfg.grad_clip > 0 and math.isfinite(loss):
            metrics["grad_norm"] = clip_grad_norm(list(self.model.parameters()), self.optim_cfg.grad_clip)
            if not math.isfinite(metrics["grad_norm"]):
                loss = metrics["grad_norm"]  # a finite loss with non-finite gradients: skip the step too
        if not math.isfinite(loss):
            self._on_nonfinite(loss)
            return
        self.nonfinite_run = 0
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.task.after_step(unwrap(self.model))
        if self.ema:
            self.ema.update(self.raw_model)
        self.step += 1
        self._samples_since += sum(len(b.get("keys", [])) for b in batches) * self.d.world_size
        metrics.update(loss=loss, lr=self.sched.get_last_lr()[0], data_time=data_time,
                       skipped_samples=sum(self.loader.skipped.values()), nonfinite_steps=self.nonfinite_total)
        self._last_metrics = metrics
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}")
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
            dt = time.time() - self._t_log
            metrics["samples_per_s"] = self._samples_since / max(dt, 1e-9)
            self._t_log, self._samples_since = time.time(), 0
            self._log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                      | {f"skipped/{k}": v for k, v in self.loader.skipped.items()})
        if self.cfg.save_every and self.step % self.cfg.save_every == 0:
            self.save()
        if self.eval_fn and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            self._eval()

    def _eval_model_now(self) -> Optional[nn.Module]:
        """The model rank 0 evaluates: the training model itself, or under FSDP2 an unsharded copy loaded
        with the gathered weights (FSDP's parameters are shards outside its own forward; methods such as
        encode_image bypass its hooks). Every rank must call this (the gather is a collective)."""
        if not (self.cfg.parallel == "fsdp" and self.d.enabled):
            return unwrap(self.model)
        state = self._model_state()
        if not self.d.is_main:
            return None
        if self._eval_model is None:
            self._eval_model = self.eval_model_fn()
        self._eval_model.load_state_dict(state, strict=True)
        return self._eval_model.to(self.d.device)

    def _eval(self) -> dict:
        model = self._eval_model_now()
        if model is not None:
            model.eval()
        with torch.no_grad():
            results = self.eval_fn(model, self.step) if self.d.is_main else {}
        if self.d.is_main and results:
            self._log({f"eval/{k}": v for k, v in _flatten(results).items()})
            log.info("eval at step %d: %s", self.step, json.dumps(_flatten(results)))
        if self.d.enabled:
            dist.barrier()
        self._last_eval = (self.step, results)
        return results

    def _check_all_params_used(self) -> None:
        """A trainable parameter without a gradient would silently break DDP's gradient averaging."""
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise RuntimeError(f"trainable parameters got no gradient in the first step: {unused[:8]}; freeze them "
                               "(requires_grad=False) or make the loss use them")

    def _on_nonfinite(self, loss: float) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("non-finite loss (%s) at step %d: step skipped (%d in a row, %d in all)", loss, self.step,
                    self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            raise NonFiniteError(
                f"{self.nonfinite_run} non-finite losses in a row at step {self.step}: stopping. The last good "
                f"checkpoint is intact in {self.ckpt_dir}; lower optim.lr, use fp32, or check the data.")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out


def _jsonable(cfg) -> Any:
    try:
        return asdict(cfg)
    except TypeError:
        return cfg
