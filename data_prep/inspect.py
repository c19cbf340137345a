"""Verify and describe a shard folder.

    python -m data_prep.inspect data/synth/pretrain [--samples 3] [--no-verify] [--json]

Checks every shard against manifest.json (size, sha256, sample count, unique keys, readable
members) and reports statistics: sources, modalities, splits, caption lengths, images per
sample, concepts, conversations. Shards are read as the loader reads them (vlm.data.position):
whatever is wrong is counted by reason under ``skipped`` (truncated_tar, bad_tar_header,
unsafe_member_name, non_file_member, bad_json, bad_text) and named under ``problems``; a damaged
shard never stops the scan. Exit code 1 on any mismatch or problem, 2 if the folder is not a
shard folder at all.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from vlm.data.position import raw_samples
from vlm.data.schema import IMAGE_EXTS, ManifestError, read_manifest, sha256_file
from vlm.utils import cli


def scan_shard(path: Path, counts: Optional[Counter] = None):
    """Yield (key, {ext: bytes}) of a shard's samples exactly as the loader groups them.

    What is wrong with the tar itself (truncated_tar, bad_tar_header, unsafe_member_name,
    non_file_member: vlm.data.tario) is counted into ``counts`` by reason and the scan goes on as the
    loader does; without ``counts`` the first such problem raises a ValueError naming it.
    """
    found = Counter() if counts is None else counts
    for key, parts, *_ in raw_samples(str(path), found):
        if counts is None and found:
            break
        yield key, parts
    if counts is None and found:
        raise ValueError(f"{Path(path).name}: " + ", ".join(f"{k} ({v})" for k, v in sorted(found.items())))


def _sample_meta(parts: dict) -> tuple[Optional[dict], Optional[str]]:
    """(metadata, None) or (None, the reason it is unusable), as the loader judges a sample's json and txt."""
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, RecursionError):
            return None, "bad_json"
        if not isinstance(meta, dict):
            return None, "bad_json"
    if "txt" in parts:
        try:
            parts["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_text"
    return meta, None


def _listed(value) -> list:
    return value if isinstance(value, list) else []


def _say(text: str) -> None:
    """Print a line of the text report; characters the terminal cannot take (a lone surrogate from a
    sample's json) are escaped, never an exception."""
    sys.stdout.write(text.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")


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
    total, skipped = 0, Counter()
    for s in m.shards:
        path = folder / s.name
        if not path.is_file():
            problems.append(f"{s.name}: missing")
            continue
        if path.stat().st_size != s.bytes:
            problems.append(f"{s.name}: {path.stat().st_size} bytes, manifest says {s.bytes}")
        if not args.no_verify and sha256_file(path) != s.sha256:
            problems.append(f"{s.name}: sha256 differs from the manifest")
        n, counts = 0, Counter()  # what is wrong in this shard, by reason (an unreadable file: truncated_tar)
        for key, parts in scan_shard(path, counts):
            n += 1
            if key in keys:
                problems.append(f"{s.name}: duplicate key {key}")
            keys.add(key)
            if not any(e in parts for e in IMAGE_EXTS):
                problems.append(f"{s.name}: sample {key} has no image")
            meta, bad = _sample_meta(parts)
            if bad is not None:
                counts[bad] += 1
                problems.append(f"{s.name}: sample {key}: {bad}")
                continue
            for k in ("source", "modality", "split"):
                stats[k][str(meta.get(k))] += 1
            for c in _listed(meta.get("concepts")):
                stats["concepts"][str(c.get("name")) if isinstance(c, dict) else str(c)] += 1
            for lab in _listed(meta.get("labels")):
                stats["labels"][str(lab)] += 1
            stats["images"][sum(1 for e in parts if e.rsplit(".", 1)[-1] in IMAGE_EXTS)] += 1
            text = parts.get("txt", b"").decode("utf-8")
            if text:
                cap_lens.append(len(text.split()))
            convs = _listed(meta.get("conversations"))
            if convs:
                conv_turns.append(len(convs))
            if len(shown) < args.samples:
                shown.append({"key": key, "members": sorted(parts), "text": text[:200],
                              "meta": {k: v for k, v in meta.items() if k != "conversations"}
                              | ({"conversations": convs[:2]} if "conversations" in meta else {})})
        for reason in sorted(set(counts) - {"bad_json", "bad_text"}):
            problems.append(f"{s.name}: {reason} ({counts[reason]}) after {n} samples")
        skipped.update(counts)
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
        "skipped": dict(sorted(skipped.items())), "problems": problems,
    }
    if args.json:
        print(json.dumps(report | {"examples": shown}, indent=1))
    else:
        _say(f"{folder}: {total} samples in {len(m.shards)} shards, {report['bytes'] / 1e6:.1f} MB")
        for k in ("source", "modality", "split", "images", "labels", "concepts"):
            if report[k]:
                _say(f"  {k:10s} " + ", ".join(f"{a}: {b}" for a, b in report[k].items()))
        cw = report["caption_words"]
        _say(f"  captions   {cw['with_text']} with text; words mean {cw['mean']}, p50 {cw['p50']}, "
             f"p95 {cw['p95']}, max {cw['max']}")
        if conv_turns:
            _say(f"  convs      {len(conv_turns)} samples, {report['conversations']['mean_turns']} turns on average")
        for ex in shown:
            _say("  example    " + json.dumps(ex, ensure_ascii=False)[:600])
        for prob in problems:
            _say(f"  PROBLEM    {prob}")
        _say("OK: counts" + ("" if args.no_verify else " and sha256") + " match the manifest" if not problems
             else f"FAILED: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
