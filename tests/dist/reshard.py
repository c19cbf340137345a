"""Resume a train.clip checkpoint on this launch's world size (argv[1]: the checkpoint folder, argv[2]: a JSON
report for rank 0 to write, the rest: train.clip's --config and overrides) and check that what was loaded is
what was saved, whatever the saving world size: the full model, every optimizer state and the EMA, gathered
from this run's shards, equal the checkpoint's tensors read whole. Then train on to train.steps."""
import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from train.clip import build_run
from train.config import ClipRunConfig, parse_run_config
from train.distributed import cleanup, init_distributed
from train.trainer import Trainer
from vlm import checkpoint as ckpt
from vlm.utils import seed_everything


def main(path: str, report: str, argv: list[str]) -> None:
    d = init_distributed()
    cfg = parse_run_config("reshard", "", ClipRunConfig, argv)
    seed_everything(cfg.train.seed)
    model, kwargs = build_run(cfg, d)
    trainer = Trainer(model, **kwargs)
    trainer.resume(Path(path))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    loaded = {f"model.{k}": v for k, v in get_model_state_dict(trainer.model, options=full).items()}
    optim = get_optimizer_state_dict(trainer.model, trainer.opt, options=full)
    loaded.update({f"optim.{k}": v for k, v in optim.items() if k.startswith("state.")})
    if trainer.ema is not None:
        from torch.distributed.tensor import DTensor

        loaded.update({f"ema.{k}": v.full_tensor() if isinstance(v, DTensor) else v
                       for k, v in trainer.ema.shadow.items()})
    if d.is_main:
        saved = {f"{p}{k}": v for p in ("model.", "optim.", "ema.") for k, v in ckpt._read_full(Path(path), p).items()}
        differ = sorted(k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k].to(saved[k].dtype)))
        lr = [g["lr"] for g in trainer.opt.param_groups]
        Path(report).write_text(json.dumps({"tensors": len(saved), "differ": differ, "missing": sorted(set(loaded) - set(saved)),
                                            "step": trainer.step, "lr": lr}))
    trainer.fit()
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
