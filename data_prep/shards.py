"""Turn raw medical image-text data into WebDataset shards + manifest.json.

    python -m data_prep.shards --format pairs --input captions.csv --image-root images/ --out shards/pmc
    python -m data_prep.shards --format slake --input Slake1.0/train.json --out shards/slake_train
    python -m data_prep.shards --format r2gen --input iu_xray/annotation.json --split train --out shards/iu
    python -m data_prep.shards --format dicom --input dicoms/ --window 40,400 --out shards/ct
    python -m data_prep.shards --format nifti --input volumes/ --axis 2 --slices every:4 --out shards/mr
    python -m data_prep.shards --format preference --input pairs.jsonl --image-root images/ --out shards/dpo

Formats: pairs (CSV/TSV/JSONL table), llava (conversation JSON), r2gen (annotation.json), slake,
vqa_rad (official JSON or HF parquet), pathvqa (HF parquet or original pkl), imagefolder,
dicom, nifti, preference (JSONL or JSON list of {image(s), prompt or conversations, chosen, rejected}
pairs for preference tuning). Bad rows and images are skipped, counted by reason and named in the closing
summary (also stored in manifest.json). Options are checked before anything is written (a bad
value: one line naming the option, exit 2). The new set is written into a hidden folder inside
--out and swapped in when complete (the manifest last), so an interrupted run, with or without
--overwrite, leaves the folder's previous set intact; the next run repairs what a kill left
(data_prep/writer.py). A run that writes no sample exits 1 and does not replace a previous set.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from data_prep.sources import FORMATS, get_reader
from data_prep.writer import WriteAborted, WriteOptions, check_counts, prepare_output, write_shards
from vlm.utils import cli, setup_logging

log = logging.getLogger("data_prep.shards")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, help=f"input format: {', '.join(FORMATS)}")
    p.add_argument("--input", required=True, help="annotation file, table, or folder (per format)")
    p.add_argument("--image-root", help="folder that image paths are relative to (default: per format)")
    p.add_argument("--out", required=True, help="output shard folder (must be empty unless --overwrite)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard, >= 1 (default 1000)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-encoding processes, >= 0 (0: in this process; default min(4, cores))")
    p.add_argument("--max-size", type=int, help="resize so the longer side is at most this many pixels (>= 1)")
    p.add_argument("--image-format", default="auto", choices=["auto", "png", "jpg"],
                   help="auto keeps untouched PNG/JPEG bytes and writes PNG otherwise (16-bit stays PNG)")
    p.add_argument("--max-pixels", type=int, default=64_000_000,
                   help="reject larger images before decoding, >= 1 (a multi-frame DICOM: rows x columns x the "
                        "frames decoded; default 64000000)")
    p.add_argument("--dedup", action="store_true", help="drop samples whose pixels equal an earlier sample's")
    p.add_argument("--concepts", help="vocabulary YAML: tag captions with concept spans (configs/concepts/)")
    p.add_argument("--split", help="split name to record (default: from the data, else train); r2gen, vqa_rad, "
                                   "pathvqa parquet: which splits to read (comma list or all)")
    p.add_argument("--modality", help="modality to record where the data has none")
    p.add_argument("--source-name", help="source prefix for keys and metadata (default: the format)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shard set of a non-empty --out (the new set is swapped in only when complete; "
                        "other files there are kept)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="follow image paths (../, absolute, symlinks) that leave --image-root, and symlinks that "
                        "leave a dicom/nifti --input folder; refused and counted as outside_root otherwise")
    p.add_argument("--key-secret", help="file with the secret that keys of medical formats are hashed with "
                                        "(default: OUT/.key_secret, created at first use; see data_prep/keys.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    for fmt in FORMATS:
        mod = get_reader(fmt)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return p


def tag_concepts(records, tagger):
    """Concept spans on each record's text; a text the tagger fails on is that record's ``error`` skip."""
    from data_prep.writer import Rejected, exception_detail

    for r in records:
        if getattr(r, "text", None) and "concepts" not in r.meta:
            try:
                r.meta["concepts"] = tagger.tag(r.text)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as e:
                yield Rejected("error", r.label, exception_detail(e))
                continue
        yield r


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    reader = get_reader(args.format)
    check_options(args)
    records, total = reader.read(args)  # validates the input before anything is written
    if args.concepts:
        from data_prep.concepts import ConceptTagger
        records = tag_concepts(records, ConceptTagger.from_file(args.concepts))
    opts = WriteOptions(max_size=args.max_size, image_format=args.image_format, dedup=args.dedup,
                        max_pixels=args.max_pixels)
    out = prepare_output(args.out, args.overwrite)
    try:
        manifest, summary = write_shards(records, out, shard_size=args.shard_size, workers=args.workers, opts=opts,
                                         total=total, created_by=f"data_prep.shards --format {args.format}",
                                         extra={"format": args.format}, progress=not args.quiet,
                                         overwrite=args.overwrite)
    except WriteAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in summary.lines():
        log.info(line) if not args.quiet else print(line, file=sys.stderr)
    if not summary.committed:
        print(f"error: no samples were written; the previous shard set in {out} is kept (see the skip reasons "
              "above)", file=sys.stderr)
        return 1
    log.info("%d samples in %d shards -> %s", manifest.num_samples, len(manifest.shards), out / "manifest.json")
    if manifest.num_samples == 0:
        print(f"error: no samples were written to {out} (see the skip reasons above)", file=sys.stderr)
        return 1
    return 0


def check_options(args) -> None:
    """Every numeric option, before anything is read or written: a ``ValueError`` naming the option (exit 2). The
    readers' own options are checked by their module's ``check_options`` (all of them, whatever the
    format: a bad value is bad)."""
    check_counts(args.shard_size, args.workers)
    WriteOptions(max_size=args.max_size, image_format=args.image_format, max_pixels=args.max_pixels)
    for fmt in FORMATS:
        mod = get_reader(fmt)
        if hasattr(mod, "check_options"):
            mod.check_options(args)


if __name__ == "__main__":
    sys.exit(main())
