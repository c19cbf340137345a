"""Small shared helpers for entry points: logging set-up and error-to-exit-code mapping."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (every device's)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


def cli(main):
    """Wrap an entry point's ``main``: expected user errors print one clear line and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except USAGE_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to ``path.tmp`` then rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Dist:
    """Where this process sits in a torchrun launch (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 0  # processes on this node (torchrun's LOCAL_WORLD_SIZE); 0: world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __post_init__(self):
        self.local_world_size = self.local_world_size or self.world_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def torchrun_env() -> Dist:
    """Rank, world size and device from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); the
    local GPU when there is one. Creates no process group (the entry points do)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", 1))
    return Dist(int(os.environ.get("RANK", 0)), world, local, device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


@contextmanager
def atomic_folder(out):
    """Write a folder in ``OUT.tmp`` (cleared first; yielded) and put it in place of OUT once the block ends
    without an error. The old OUT is moved aside before and removed only after the rename, so a crash leaves
    the old folder or the new one in place, never a half-written OUT (at worst a .tmp or .old beside it)."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
