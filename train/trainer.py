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
import os
import signal
import threading
import time
from collections import Counter
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
from vlm.utils import seed_everything

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
        if eval_fn is not None and cfg.parallel in ("fsdp", "hsdp") and d.enabled and eval_model_fn is None:
            raise ValueError("evaluation during FSDP training needs eval_model_fn (an unsharded model to load into)")
        self.raw_model = model
        master = torch.bfloat16 if cfg.master_dtype == "bf16" else torch.float32
        # FSDP2 needs one dtype per unit, fp32 compute needs fp32 weights; with DDP and bf16 autocast, frozen
        # weights may stay as stored (a LoRA run's bf16 base LLM keeps its memory)
        only_trainable = cfg.precision == "bf16" and cfg.master_dtype == "fp32" and not (
            cfg.parallel in ("fsdp", "hsdp") and d.enabled)
        cast = set_master_dtype(model, master, only_trainable)
        if cast:
            log.info("master weights: %d tensors cast to %s (train.master_dtype=%s%s)", cast, master, cfg.master_dtype,
                     ", trainable ones" if only_trainable else "")
        if cfg.master_dtype == "bf16":
            log.warning("train.master_dtype=bf16: weights and optimizer states in bf16; updates smaller than "
                        "bf16's resolution (~0.4%% of a weight) are lost")
        self.model = parallelize(model, d, cfg.parallel, shard_modules, cfg.precision, cfg.shard_group_size,
                                 cfg.compile)
        self.opt = build_optimizer(self.model, optim_cfg, lr_scales)
        self.sched = build_scheduler(self.opt, optim_cfg, cfg.steps)
        self.ema = EMA(self.raw_model, optim_cfg.ema_decay) if optim_cfg.ema_decay > 0 else None
        self.step, self.nonfinite_total = 0, 0  # non-finite steps skipped (as read at the last logging step)
        self._skipped_before: Counter = Counter()  # this rank's skipped samples of the epochs before the current
        self._nf_run = torch.zeros((), dtype=torch.int64)  # on the device: read at logging steps only
        self._nf_total = torch.zeros((), dtype=torch.int64)
        self._nf_max = torch.zeros((), dtype=torch.int64)
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
        self._pending: Optional[ckpt.PendingSave] = None  # a checkpoint being written in the background
        self._async_pg = None
        self._ctl_group = None

    # -- state -------------------------------------------------------------------------------
    def _model_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _optim_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _shards(self) -> dict:
        """This rank's part of everything a checkpoint holds as tensors: the model ("model.*"), the optimizer
        states ("optim.state.*"; the hyperparameters come from the config and the scheduler) and the EMA
        ("ema.*"). DTensor shards under FSDP2, full tensors otherwise (DCP writes each replica once)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True)
        out = {f"model.{k}": v for k, v in get_model_state_dict(self.model, options=opts).items()}
        optim = get_optimizer_state_dict(self.model, self.opt, options=opts)
        out.update({f"optim.{k}": v for k, v in optim.items() if k.startswith("state.") and torch.is_tensor(v)})
        if self.ema is not None:
            out.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
        return out

    def save(self, blocking: bool = True) -> None:
        """Every rank writes its shards of step ``self.step`` (torch.distributed.checkpoint), rank 0 the small
        files. ``blocking=False`` with ``train.async_checkpoint``: the shards are written in the background and
        the checkpoint completes (COMPLETE, rename) when they are on disk."""
        self._finish_pending()
        plain_rng, tensor_rng = ckpt.rng_state()
        # every rank's own data position: ranks read different shards, skip different samples
        data = self._data_pos if self._data_pos is not None else self.loader.state_dict()
        ranks = [None] * self.d.world_size
        if self.d.enabled:
            dist.all_gather_object(ranks, (plain_rng, tensor_rng, data, dict(self._skipped_before)))
        else:
            ranks = [(plain_rng, tensor_rng, data, dict(self._skipped_before))]
        small = {"scheduler": self.sched.state_dict(), "rng": [r[1] for r in ranks]}
        state = {"step": self.step, "data": [r[2] for r in ranks], "rng": [r[0] for r in ranks],
                 "skipped_before": [r[3] for r in ranks],
                 "nonfinite_total": int(self._nf_total), "world_size": self.d.world_size,
                 "parallel": self.cfg.parallel if self.d.enabled else "none",
                 "ema_aliases": self.ema.aliases if self.ema else {}, "config": _jsonable(self.run_config)}
        use_async = self.cfg.async_checkpoint and not blocking
        pending = ckpt.save_sharded(self.ckpt_dir, self.step, self._shards(), small, state, self.cfg.keep_last,
                                    main=self.d.is_main, async_save=use_async, process_group=self._ckpt_group())
        if use_async:
            self._pending = pending
            log.info("checkpoint of step %d: writing in the background -> %s", self.step, pending.final)
        elif self.d.is_main:
            log.info("checkpoint -> %s", pending.final)
        self._last_saved = self.step

    def _ckpt_group(self):
        """Async saves run their collectives from a background thread: on a group of their own (gloo), as
        torchtitan does, never interleaved with the training step's collectives on the default group."""
        if not (self.cfg.async_checkpoint and self.d.enabled):
            return None
        if self._async_pg is None:
            self._async_pg = dist.new_group(backend="gloo")
        return self._async_pg

    def _finish_pending(self, wait: bool = True) -> None:
        """Complete a background checkpoint: wait for it (``wait``), or only if its shards are written."""
        if self._pending is not None and (wait or self._pending.done()):
            path = self._pending.finish()
            self._pending = None
            if self.d.is_main:
                log.info("checkpoint -> %s", path)

    def resume(self, path: Path) -> None:
        """Load a checkpoint into this run: the same world size continues exactly; another world size reshards
        the weights, optimizer states and EMA (DCP) and redeals the epoch's unread data (ShardLoader)."""
        if not ckpt.is_sharded(path):
            return self._resume_single_file(path)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = ckpt.load_state_json(path / "state.json")
        small = ckpt.load_train_state(path / "train_state.pt")
        opts = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True)
        msd = get_model_state_dict(self.model, options=opts)
        osd = get_optimizer_state_dict(self.model, self.opt, options=opts)  # states initialised to load into
        tensors = {f"model.{k}": v for k, v in msd.items()}
        tensors.update({f"optim.{k}": v for k, v in osd.items() if k.startswith("state.") and torch.is_tensor(v)})
        saved = ckpt.shard_metadata(path)
        if self.ema is not None:
            if any(k.startswith("ema.") for k in saved):
                tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.items()})
            else:
                log.warning("%s holds no EMA: the EMA starts from the resumed weights", path)
        ckpt.load_sharded(path, tensors)
        set_model_state_dict(self.model, msd, options=opts)
        set_optimizer_state_dict(self.model, self.opt, osd, options=opts)
        self._own_kernel_flags()
        self.sched.load_state_dict(small["scheduler"])
        for g, lr in zip(self.opt.param_groups, self.sched.get_last_lr()):
            g["lr"] = lr  # the scheduler sets it only at its next step
        self._resume_position(path, state, small["rng"])

    def _resume_position(self, path: Path, state: dict, tensor_rngs: list) -> None:
        """Data position, RNGs and counters of a checkpoint. Another world size (or num_workers): the loader
        redeals what the epoch has left (ShardLoader.load_state_dicts); rank r takes saved rank r's RNGs when
        there was one, else a seed of (train.seed, step, rank)."""
        data, old_world = state["data"], state["world_size"]
        if not isinstance(data, list):  # checkpoints of older versions: one position
            data = [data]
        self.loader.load_state_dicts(data)  # the same shape: exactly load_state_dict(data[rank])
        if old_world != self.d.world_size:
            log.warning("%s was written by %d processes, this run has %d: weights, optimizer states and EMA "
                        "resharded; the epoch's unread samples redealt across the new ranks", path, old_world,
                        self.d.world_size)
        if self.d.rank < len(state["rng"]):
            ckpt.set_rng_state(state["rng"][self.d.rank], tensor_rngs[self.d.rank])
        else:
            seed_everything((self.cfg.seed * 1_000_003 + state["step"] * 1009 + self.d.rank) % 2**31)
        self.step, self.nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        before = state.get("skipped_before", [])  # other world size: rank 0 carries the ranks it lost
        self._skipped_before = Counter(before[self.d.rank] if self.d.rank < len(before) else {})
        if self.d.is_main:
            for extra in before[self.d.world_size:]:
                self._skipped_before.update(extra)
        self._nf_total = torch.tensor(self.nonfinite_total, dtype=torch.int64, device=self.d.device)
        self._nf_run = torch.zeros((), dtype=torch.int64, device=self.d.device)
        self._nf_max = torch.zeros((), dtype=torch.int64, device=self.d.device)
        self._first_step = self.step
        self._last_saved = self.step
        log.info("resumed from %s at step %d (epoch %d, %d batches into it)", path, self.step,
                 self.loader.epoch, self.loader.batches)

    def _own_kernel_flags(self) -> None:
        """A loaded optimizer state brings the saving run's kernel choice (fused/foreach) into the param groups
        (a checkpoint of an earlier version: fused=None): this run keeps its own, which _train_step relies on."""
        for g in self.opt.param_groups:
            for k in ("fused", "foreach"):
                if k in self.opt.defaults:
                    g[k] = self.opt.defaults[k]

    def _resume_single_file(self, path: Path) -> None:
        """Checkpoints of earlier versions (model.safetensors + the whole optimizer in train_state.pt): the
        same world size only."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        model_state, train_state, state, ema = ckpt.load(path)
        if state["world_size"] != self.d.world_size:
            raise ckpt.CheckpointError(f"{path} is a single-file checkpoint written with world size "
                                       f"{state['world_size']}; this run has {self.d.world_size}: only sharded "
                                       "(dcp/) checkpoints reshard")
        if self.cfg.parallel not in ("fsdp", "hsdp") or not self.d.enabled:
            ckpt.check_weights(unwrap(self.model), model_state, str(path))
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=opts)
        if all(p.ndim == 0 for g in self.opt.param_groups for p in g["params"]):
            self._load_scalar_optim_state(train_state["optimizer"])  # torch cannot place 0-dim-only states
        else:
            set_optimizer_state_dict(self.model, self.opt, train_state["optimizer"], options=opts)
        self._own_kernel_flags()
        self.sched.load_state_dict(train_state["scheduler"])
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        self._resume_position(path, state, train_state["rng"])

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

    def _resume_path(self) -> Optional[Path]:
        """The checkpoint ``train.resume`` names, verified against its checksums (the ranks share the hashing):
        ``latest`` falls back past damaged checkpoints with a warning naming the file; an explicit damaged
        one is an error naming it."""
        resume = self.cfg.resume
        if not resume:
            return None
        part = (self.d.rank, self.d.world_size)
        if resume == "latest":
            return ckpt.pick_intact(self.ckpt_dir, part, self._agree_stop if self.d.enabled else None)
        p = ckpt.resolve(resume, self.ckpt_dir)
        problem = ckpt.verify(p, part)
        if self._agree_stop(problem is not None):
            raise ckpt.CheckpointError(f"train.resume={resume}: damaged checkpoint: "
                                       f"{problem or 'a damaged file (found by another rank)'}")
        return p

    def _agree_stop(self, local: bool) -> bool:
        """True on every rank if any rank wants to stop (SIGTERM may reach only some ranks, or reach them
        at different points of a step): the ranks then save one checkpoint together."""
        if not self.d.enabled:
            return local
        if self._ctl_group is None:  # a CPU (gloo) group: agreeing never waits for the accelerator's queue
            self._ctl_group = dist.new_group(backend="gloo") if self.d.device.type != "cpu" else dist.group.WORLD
        flag = torch.tensor([int(local)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._ctl_group)
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
                self._skipped_before.update(self.loader.skipped)  # the loader counts per epoch
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
        path = self._resume_path()
        if path is not None:
            self.resume(path)
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
            self._finish_pending()
            if self.cfg.consolidate and not preempted:
                self._consolidate()
            results = {}
            if self.eval_fn and not preempted:
                results = self._last_eval[1] if self._last_eval[0] == self.step else self._eval()
        finally:
            if self._pending is not None and self.d.is_main:  # an exception: let the background write end
                try:
                    self._finish_pending()
                except Exception as e:  # noqa: BLE001 - the original error matters more
                    log.error("the background checkpoint did not complete: %s", e)
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
        """One optimizer step with no host sync outside logging steps: the loss is averaged over ranks, the
        gradient clipped and a non-finite loss or gradient detected on the device; the fused AdamW kernel skips
        such a step itself (``found_inf``, as GradScaler does), the EMA leaves it out, and the counters are read
        at the next logging step (where ``train.max_nonfinite`` in a row stops the run). A skipped step still
        counts as a step (its batch is spent, the schedule moves on)."""
        self.model.train()
        metrics = self.task.train_step(self.model, batches, ctx)
        sync_replicated_grads(self.model)
        if self.step == self._first_step:
            self._check_all_params_used()
        dev = self.d.device
        loss = all_reduce_mean(torch.as_tensor(metrics["loss"], dtype=torch.float32, device=dev).reshape(1))[0]
        bad = ~torch.isfinite(loss)
        if self.optim_cfg.grad_clip > 0:
            norm = clip_grad_norm(list(self.model.parameters()), self.optim_cfg.grad_clip).to(dev)
            metrics["grad_norm"] = norm
            bad = bad | ~torch.isfinite(norm)  # a finite loss with non-finite gradients: skip the step too
        if all(g.get("fused") for g in self.opt.param_groups):
            self.opt.found_inf = bad.to(torch.float32)
            self.opt.step()
        elif not bool(bad):  # optimizers without the fused kernel: one read of the flag per step
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.task.after_step(unwrap(self.model))
        if self.ema:
            self.ema.update(self.raw_model, keep=~bad)
        self._nf_run = torch.where(bad, self._nf_run.to(dev) + 1, torch.zeros_like(self._nf_run, device=dev))
        self._nf_max = torch.maximum(self._nf_max.to(dev), self._nf_run)  # the longest run since the last log
        self._nf_total = self._nf_total.to(dev) + bad.to(torch.int64)
        self.step += 1
        self._samples_since += sum(len(b.get("keys", [])) for b in batches) * self.d.world_size
        metrics.update(loss=loss, lr=self.sched.get_last_lr()[0], data_time=data_time)
        self._last_metrics = metrics
        bar.update(1)
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
            self._log_step(metrics, bar)
        self._finish_pending(wait=False)
        if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
            self.save(blocking=False)
        if self.eval_fn and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            self._eval()

    def _consolidate(self) -> None:
        """The last checkpoint's weights in one model.safetensors (and ema.safetensors), for stock loaders and
        export: rank 0 assembles them from the shards just written, one copy of the model in its memory."""
        path = self.ckpt_dir / f"step_{self.step:08d}"
        if self.d.is_main and (path / "COMPLETE").exists():
            for f in ckpt.consolidate(path):
                log.info("consolidated weights -> %s", f)
        if self.d.enabled:
            dist.barrier()

    def _eval_model_now(self) -> Optional[nn.Module]:
        """The model rank 0 evaluates: the training model itself, or under FSDP2 an unsharded copy loaded
        with the gathered weights (FSDP's parameters are shards outside its own forward; methods such as
        encode_image bypass its hooks). Every rank must call this (the gather is a collective)."""
        if not (self.cfg.parallel in ("fsdp", "hsdp") and self.d.enabled):
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

    def _log_step(self, metrics: dict, bar) -> None:
        """Read the step's tensors (one host sync), check the non-finite counters, log."""
        keys = [k for k, v in metrics.items() if torch.is_tensor(v)]
        values = torch.stack([metrics[k].detach().float().reshape(()).to(self.d.device) for k in keys]
                             + [self._nf_max.float(), self._nf_total.float()]).tolist()
        metrics.update(zip(keys, values))
        nf_run, nf_total = int(values[-2]), int(values[-1])  # the longest run of skips since the last log
        self._nf_max = self._nf_run.clone()  # a run still going on carries over
        if nf_total > self.nonfinite_total:
            log.warning("%d non-finite step(s) skipped since the last log (up to %d in a row, step %d, %d in all)",
                        nf_total - self.nonfinite_total, nf_run, self.step, nf_total)
        self.nonfinite_total = nf_total
        if nf_run >= self.cfg.max_nonfinite:
            raise NonFiniteError(
                f"{nf_run} non-finite losses in a row at step {self.step}: stopping. The last good "
                f"checkpoint is intact in {self.ckpt_dir}; lower optim.lr, use fp32, or check the data.")
        skipped = self._skipped_before + Counter(self.loader.skipped)  # this rank's, since the run began
        metrics.update(skipped_samples=sum(skipped.values()), nonfinite_steps=nf_total)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        dt = time.time() - self._t_log
        metrics["samples_per_s"] = self._samples_since / max(dt, 1e-9)
        self._t_log, self._samples_since = time.time(), 0
        self._log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                  | {f"skipped/{k}": v for k, v in skipped.items()})


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
