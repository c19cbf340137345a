"""Rehearse a training config before a long run: the config as shipped, the model shrunk to a tiny one of
the same family, a few steps with a checkpoint save and a resume, and a one-screen report.

    python -m train.rehearse --config configs/instruct/llava_med_7b_lora.yaml
    python -m train.rehearse --config configs/preference/llava_med_7b_report_dpo.yaml --synthetic-data /tmp/synth
    torchrun --nproc_per_node 2 -m train.rehearse --config configs/instruct/llava_med_7b_full.yaml
    python -m data_prep.synth --out /tmp/synth && \\
        python -m train.rehearse --config configs/clip/conceptclip.yaml --synthetic-data /tmp/synth

Launch it the way the real run is launched (torchrun for a DDP/FSDP2 config): parallelism, precision,
master weights, adapters, EMA, packing, gradient checkpointing, the chat template's kind, the LLM's stored
dtype and the evaluation hooks are kept; the towers and the LLM are replaced by 2-layer twins of the same
family (train/rehearsal.py says how each is chosen). Your data is read as configured (corrupt shards and
unmaskable conversations show up in the skip counts); folders that do not exist are replaced by a
data_prep.synth corpus only when --synthetic-data names one. The report lists every difference from the
shipped config, the trainable parameter groups against what the config states, which groups changed in
two steps, the loss, the checkpoint reload, the resumed step, the evaluation and the skipped samples.
Exit code 0 only if every check holds (1 otherwise, 2 for a config error).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from vlm.utils import cli, setup_logging

log = logging.getLogger("train.rehearse")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m train.rehearse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a train.clip, train.instruct or train.preference config YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for the real run")
    p.add_argument("--synthetic-data", help="a data_prep.synth corpus to read where a configured folder is missing")
    p.add_argument("--llm-family", help="the LLM's family when its files are not local or cached "
                   "(qwen2, llama2, llama3, mistral, gemma, phi3); default: its config, else the hub-id table")
    p.add_argument("--max-batch-size", type=int, default=0, help="cap data.batch_size (0: as shipped)")
    p.add_argument("--max-workers", type=int, default=-1, help="cap data.num_workers (-1: as shipped)")
    p.add_argument("--steps", type=int, default=2, help="steps before the checkpoint (one more after the resume)")
    p.add_argument("--max-skipped-fraction", type=float, default=0.5,
                   help="fail if more than this fraction of the samples read is skipped (default 0.5)")
    p.add_argument("--workdir", help="where the tiny models, the run and the report go (default: a temporary "
                   "folder, removed afterwards)")
    p.add_argument("--report", help="also write the report as JSON here")
    return p.parse_args(argv)


def prepare(args, d):
    """Rank 0 shrinks the config and writes the tiny models; every rank gets the same result."""
    import torch.distributed as dist

    from train.config import ClipRunConfig, InstructRunConfig
    from train.preference import PreferenceRunConfig
    from train.rehearsal import config_kind, shrink_clip, shrink_instruct
    from vlm.config import load_config

    kind = config_kind(args.config)
    cls = {"clip": ClipRunConfig, "instruct": InstructRunConfig, "preference": PreferenceRunConfig}[kind]
    cfg = load_config(cls, args.config, args.overrides)
    box = [None]
    if d.is_main:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="rehearse-")).resolve()
        work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / "run", ignore_errors=True)  # a reused --workdir: never resume an older rehearsal
        try:
            r = shrink_clip(cfg, work, args.synthetic_data) if kind == "clip" else \
                shrink_instruct(cfg, work, args.synthetic_data, args.llm_family)
            r.cfg.train.output_dir = str(work / "run")
            if args.max_batch_size and r.cfg.data.batch_size > args.max_batch_size:
                r.notes.append(f"data.batch_size: {r.cfg.data.batch_size} -> {args.max_batch_size} (--max-batch-size)")
                r.cfg.data.batch_size = args.max_batch_size
            if 0 <= args.max_workers < r.cfg.data.num_workers:
                r.notes.append(f"data.num_workers: {r.cfg.data.num_workers} -> {args.max_workers} (--max-workers)")
                r.cfg.data.num_workers = args.max_workers
            r.notes.append(f"train.steps: {cfg.train.steps} -> {args.steps} + 1 after the resume; output in {work}")
            if r.cfg.optim.warmup_steps:  # a few steps of a long warmup would move nothing measurable
                r.notes.append(f"optim.warmup_steps: {r.cfg.optim.warmup_steps} -> 0 (the steps run at the "
                               f"configured peak lr {r.cfg.optim.lr:g})")
                r.cfg.optim.warmup_steps = 0
            box = [(r, str(work), None)]
        except ValueError as e:  # every rank must learn of it, not hang in the broadcast
            box = [(None, str(work), str(e))]
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    if d.enabled:
        dist.broadcast_object_list(box, src=0)
    r, work, error = box[0]
    if error:
        raise ValueError(error)
    return r, Path(work)


@cli
def main(argv=None) -> int:
    args = parse(argv)
    from train.distributed import cleanup, init_distributed
    from train.rehearsal import report, run

    d = init_distributed()
    setup_logging(quiet=not d.is_main)
    work = None
    try:
        r, work = prepare(args, d)
        checks = run(r, d, args.steps, args.max_skipped_fraction)
        if d.is_main:
            text = report(args.config, r, d, checks)
            print(text, flush=True)
            data = {"config": args.config, "kind": r.kind, "world_size": d.world_size, "notes": r.notes,
                    "checks": [c.__dict__ for c in checks], "passed": all(c.ok for c in checks)}
            (work / "rehearsal.json").write_text(json.dumps(data, indent=1))
            if args.report:
                Path(args.report).write_text(json.dumps(data, indent=1))
        ok = all(c.ok for c in checks)
    finally:
        cleanup()
        if d.is_main and work is not None and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if (ok or not d.is_main) else 1


if __name__ == "__main__":
    sys.exit(main())
