"""Verify and describe a shard folder.

    python -m data_prep.inspect data/synth/pretrain [--samples 3] [--no-verify] [--json]

Checks every shard against manifest.json (size, sha256, sample count, unique keys, readable
members) and reports statistics: sources, modalities, splits, caption lengths, images per
sample, concepts, conversations. Exit code 1 on any mismatch, 2 if the folder is not a shard
folder at all.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from vlm.data.schema import IMAGE_EXTS, ManifestError, read_manifest, sha256_file, split_member_name
from vlm.utils import cli


def scan_shard(path: Path):
    """Yield (key, {ext: bytes}) of a tar, raising on a corrupt one."""
    import tarfile

    key, parts = None, {}
    with tarfile.open(path, "r|") as tar:
        for m in tar:
            if not m.isreg():
                continue
            split = split_member_name(m.name)
            if split is None:
                raise ValueError(f"unsafe member name {m.name!r}")
            k, ext = split
            if k != key and parts:
                yield key, parts
                parts = {}
            key = k
            parts[ext] = tar.extractfile(m).read()
    if parts:
        yield key, parts


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a shard folder with manifest.json")
    p.add_argument("--samples", type=int, default=2, help="samples to print (default 2)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 (still counts samples)")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    try:
        m = read_manifest(folder)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems: list[str] = []
    listed = {s.name for s in m.shards}
    for extra in sorted(folder.glob("shard-*")):
        if extra.name not in listed:
            problems.append(f"{extra.name}: on disk but not in the manifest"
                            + (" (an interrupted write)" if extra.name.endswith(".tmp") else ""))
    stats = {k: Counter() for k in ("source", "modality", "split", "concepts", "images", "labels")}
    cap_lens, conv_turns, keys, shown = [], [], set(), []
    total = 0
    for s in m.shards:
        path = folder / s.name
        if not path.is_file():
            problems.append(f"{s.name}: missing")
            continue
        if path.stat().st_size != s.bytes:
            problems.append(f"{s.name}: {path.stat().st_size} bytes, manifest says {s.bytes}")
        if not args.no_verify and sha256_file(path) != s.sha256:
            problems.append(f"{s.name}: sha256 differs from the manifest")
        n = 0
        try:
            for key, parts in scan_shard(path):
                n += 1
                if key in keys:
                    problems.append(f"{s.name}: duplicate key {key}")
                keys.add(key)
                if not any(e in parts for e in IMAGE_EXTS):
                    problems.append(f"{s.name}: sample {key} has no image")
                meta = json.loads(parts["json"]) if "json" in parts else {}
                for k in ("source", "modality", "split"):
                    stats[k][str(meta.get(k))] += 1
                for c in meta.get("concepts") or []:
                    stats["concepts"][c["name"] if isinstance(c, dict) else str(c)] += 1
                for lab in meta.get("labels") or []:
                    stats["labels"][str(lab)] += 1
                stats["images"][sum(1 for e in parts if e.rsplit(".", 1)[-1] in IMAGE_EXTS)] += 1
                text = parts.get("txt", b"").decode("utf-8", "replace")
                if text:
                    cap_lens.append(len(text.split()))
                if meta.get("conversations"):
                    conv_turns.append(len(meta["conversations"]))
                if len(shown) < args.samples:
                    shown.append({"key": key, "members": sorted(parts), "text": text[:200],
                                  "meta": {k: v for k, v in meta.items() if k != "conversations"}
                                  | ({"conversations": meta["conversations"][:2]} if "conversations" in meta else {})})
        except Exception as e:  # corrupt tar, bad JSON
            problems.append(f"{s.name}: unreadable after {n} samples ({type(e).__name__}: {e})")
        if n != s.num_samples:
            problems.append(f"{s.name}: {n} samples, manifest says {s.num_samples}")
        total += n
    report = {
        "folder": str(folder), "num_samples": total, "manifest_num_samples": m.num_samples, "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards), **{k: dict(v.most_common(20)) for k, v in stats.items()},
        "caption_words": {"mean": round(statistics.mean(cap_lens), 1) if cap_lens else 0,
                          "p50": _pct(cap_lens, 0.5), "p95": _pct(cap_lens, 0.95), "max": max(cap_lens, default=0),
                          "with_text": len(cap_lens)},
        "conversations": {"samples": len(conv_turns), "mean_turns": round(statistics.mean(conv_turns), 1)
                          if conv_turns else 0},
        "build_summary": m.extra.get("summary") if m.extra else None,
        "problems": problems,
    }
    if args.json:
        print(json.dumps(report | {"examples": shown}, indent=1))
    else:
        print(f"{folder}: {total} samples in {len(m.shards)} shards, {report['bytes'] / 1e6:.1f} MB")
        for k in ("source", "modality", "split", "images", "labels", "concepts"):
            if report[k]:
                print(f"  {k:10s} " + ", ".join(f"{a}: {b}" for a, b in report[k].items()))
        cw = report["caption_words"]
        print(f"  captions   {cw['with_text']} with text; words mean {cw['mean']}, p50 {cw['p50']}, "
              f"p95 {cw['p95']}, max {cw['max']}")
        if conv_turns:
            print(f"  convs      {len(conv_turns)} samples, {report['conversations']['mean_turns']} turns on average")
        for ex in shown:
            print("  example    " + json.dumps(ex, ensure_ascii=False)[:600])
        for prob in problems:
            print(f"  PROBLEM    {prob}")
        print("OK: counts" + ("" if args.no_verify else " and sha256") + " match the manifest" if not problems
              else f"FAILED: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
