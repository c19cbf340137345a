"""Stream a data config exactly as training will see it, and report what happened.

    python -m data_prep.stream --config configs/data/demo.yaml [key=value ...] [--batches N]

Prints samples/s, the batch shapes, the raw samples read, and what was skipped by reason (corrupt
images, bad JSON, truncated tars, malformed tar headers, ...): per sample, plus the tar reasons counted
per member or shard (unsafe_member_name, non_file_member, truncated_tar, bad_tar_header). Use it to
check new shards and a mixing config before a long run. Exit code 2 for a config error (an unknown or
mistyped key names the key and the file); 1 when the stream cannot make batches at all (every sample
skipped: the report then carries the error and the counts so far).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from tqdm import tqdm

from vlm.config import load_config
from vlm.data.shards import DataConfig, DataStreamError, ShardLoader
from vlm.utils import cli, setup_logging


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a data config YAML (configs/data/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. batch_size=16 image.size=224")
    p.add_argument("--batches", type=int, default=0, help="stop after N batches (default: one full epoch)")
    p.add_argument("--rank", type=int, default=0, help="simulate this rank ...")
    p.add_argument("--world-size", type=int, default=1, help="... of this many")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    setup_logging(quiet=args.json)
    cfg = load_config(DataConfig, args.config, args.overrides)
    loader = ShardLoader(cfg, rank=args.rank, world_size=args.world_size)
    t0, n, shape, error = time.time(), 0, None, None
    bar = tqdm(total=args.batches or None, unit="batch", disable=args.json)
    try:
        for i, batch in enumerate(loader):
            n += len(batch["keys"])
            shape = list(batch["images"].shape)
            bar.update(1)
            if args.batches and i + 1 >= args.batches:
                break
    except DataStreamError as e:  # nothing usable: report what was counted, with the reason
        error = str(e)
    bar.close()
    secs = time.time() - t0
    report = {"samples": n, "batches": loader.batches, "read": sum(loader.raw), "seconds": round(secs, 2),
              "samples_per_s": round(n / max(secs, 1e-9), 1), "batch_images_shape": shape,
              "skipped": loader.skipped, "manifest_samples": loader.dataset.num_samples}
    if error is not None:
        report["error"] = error
    print(json.dumps(report, indent=None if args.json else 1))
    return 1 if error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
