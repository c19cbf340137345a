"""dicom: a folder of DICOM files (recursive; .dcm or any file with the DICM preamble).

Pixels: modality LUT (rescale slope/intercept), then a window: the file's VOI LUT or window
(default), a window you give (--window CENTER,WIDTH), or min-max. MONOCHROME1 is inverted.
Output: 16-bit PNG (default) or 8-bit (--bit-depth 8); colour images stay 8-bit RGB.
Multi-frame files give one sample per frame, or one chosen frame (--frame N). A file is read and
decoded once, by one worker, for all its frames; --max-pixels bounds rows x columns x the frames
decoded (all of them, or the one --frame picks), checked from the header before any decoding, so a
long cine loop may need a larger --max-pixels.

Failures, one file at a time: a file that pydicom cannot parse, whose header holds a malformed
value (NumberOfFrames '1A', Rows 'x', ...), claims more frames than its pixel data can hold, or
whose pixels do not decode is one skip (``bad_dicom``), named by its position and key; ``no_pixels``
(no image), ``image_too_large`` (over --max-pixels), ``no_such_frame`` (--frame past the last frame)
and ``non_finite`` (a frame whose modality values are not finite, e.g. an infinite rescale slope)
are counted likewise. Skip details give an exception's type or our own words, never its message,
which may quote the header.

Files: --input is one file, or a folder walked recursively (``data_prep.sources.walk_input``): symlinks
that stay inside it are followed (a folder reached twice is read once), one that leaves it is counted
``outside_root`` as ``entry N`` (its position in the sorted walk) and nothing behind it is stat'ed or
opened, unless --allow-outside-root; a sub-folder that cannot be listed is one ``error`` skip.

Privacy: metadata comes only from ``data_prep.phi``'s allow-list. Sample keys are
``<source>-<keyed blake2b of the relative path>`` (``data_prep.keys.hashed_key``: the per-dataset
secret lives in ``OUT/.key_secret`` or ``--key-secret``, never in the shards or the manifest), since
file names often carry patient names or record numbers and an unkeyed hash of such a path is
reversible by trying every MRN-shaped name; frames add ``-fNNNN``. The summary names a failing file
by its position and key only. No header value outside the allow-list reaches a shard, the manifest
or a log line.
"""
from __future__ import annotations

import importlib
import logging
import math
import warnings
from pathlib import Path

import numpy as np

from data_prep.keys import hashed_key
from data_prep.phi import safe_metadata
from data_prep.sources import SourceError, check_key_secret, walked_files
from data_prep.writer import Group, ImageRef, Pixels, Record, Rejected, SkipSample

# transfer syntaxes whose pixel data is stored as is (implicit VR, explicit VR little/big endian) or deflated
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
DEFLATED = "1.2.840.10008.1.2.1.99"
MAX_DEFLATE_RATIO = 1032  # deflate's largest expansion: a deflated file holds at most this many times its size


def add_arguments(p):
    g = p.add_argument_group("dicom (also used for .dcm paths in pairs files)")
    g.add_argument("--window", help="CENTER,WIDTH in modality units (e.g. 40,400 for a CT brain window); "
                                    "default: the file's VOI LUT/window, else min-max")
    g.add_argument("--bit-depth", type=int, choices=[8, 16], default=16, help="PNG depth (default 16)")
    g.add_argument("--frame", type=int, help="multi-frame files: keep only this frame, counted from 0 "
                                             "(default: every frame)")


def check_options(opts) -> None:
    """--window and --frame, before anything is written (``SourceError`` naming the option)."""
    dicom_options(opts)
    frame = getattr(opts, "frame", None)
    if frame is not None and frame < 0:
        raise SourceError(f"--frame must be >= 0 (frames are counted from 0; got {frame})")


def _quiet_pydicom() -> None:
    """pydicom's warnings and log lines can quote header values (names, dates): keep them out of logs."""
    importlib.import_module("pydicom")  # importing pydicom sets its logger's level: quiet it afterwards
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def dicom_options(opts) -> dict:
    window = getattr(opts, "window", None)
    if window:
        try:
            c, w = (float(x) for x in window.split(","))
        except ValueError:
            raise SourceError(f"--window {window!r} must be CENTER,WIDTH") from None
        if not (math.isfinite(c) and math.isfinite(w)):
            raise SourceError(f"--window {window!r}: CENTER and WIDTH must be finite numbers")
        if w <= 0:
            raise SourceError("--window width must be > 0")
        window = (c, w)
    return {"window": window, "bit_depth": getattr(opts, "bit_depth", 16), "max_pixels": opts.max_pixels}


def _scale(arr: np.ndarray, lo: float, hi: float, bit_depth: int) -> np.ndarray:
    top = 65535 if bit_depth == 16 else 255
    out = (np.clip(arr, lo, hi) - lo) / max(hi - lo, 1e-6) * top
    return out.round().astype(np.uint16 if bit_depth == 16 else np.uint8)


def _header_int(ds, keyword: str, default: int | None = None) -> int:
    """An integer header value; a missing one is ``default``; a malformed or negative one ``bad_dicom``
    (the detail names the attribute, never its value)."""
    try:
        value = ds.get(keyword, default)
        if value in (None, "") and default is not None:
            return default
        n = int(value)
        if n < 0 or n != float(value):
            raise ValueError
        return n
    except Exception:
        raise SkipSample("bad_dicom", f"{keyword} is not a whole number") from None


def geometry(ds) -> tuple[int, int, int]:
    """(rows, columns, frames) from a header, checked (``bad_dicom`` if malformed)."""
    rows, cols = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    frames = _header_int(ds, "NumberOfFrames", 1) or 1
    if rows == 0 or cols == 0:
        raise SkipSample("bad_dicom", "Rows or Columns is 0")
    return rows, cols, frames


def _check_size(rows: int, cols: int, decoded: int, max_pixels: int) -> None:
    if rows * cols * decoded > max_pixels:
        what = f"{cols}x{rows}" + (f"x{decoded} frames" if decoded > 1 else "")
        raise SkipSample("image_too_large", f"{what} > --max-pixels {max_pixels}")


def _check_frames_fit(ds, rows: int, cols: int, frames: int, file_size: int) -> None:
    """A header cannot claim more frames than the file can hold (else a 1 KB file could ask for millions of
    samples): native pixel data needs rows x cols x samples x bytes per frame (deflated: that over deflate's
    largest ratio), encapsulated data at least one 8-byte item per frame."""
    if frames == 1:
        return
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
    if syntax in NATIVE_SYNTAXES or syntax in ("", DEFLATED):
        bits = _header_int(ds, "BitsAllocated", 8) or 8
        spp = _header_int(ds, "SamplesPerPixel", 1) or 1
        need = math.ceil(rows * cols * spp * bits * frames / 8)
        if syntax == DEFLATED:
            need //= MAX_DEFLATE_RATIO
    else:
        need = 8 * frames
    if need > file_size:
        raise SkipSample("bad_dicom", f"NumberOfFrames {frames} exceeds what the file holds")


def _render(arr: np.ndarray, ds, photometric: str, options: dict) -> Pixels:
    """One frame's stored values -> display pixels (modality LUT, window, inversion)."""
    if arr.ndim == 3:  # colour
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            arr = convert_color_space(arr, photometric, "RGB")
        if arr.dtype != np.uint8:
            arr = _scale(arr.astype(np.float64), float(arr.min()), float(arr.max()), 8)
        return Pixels(np.ascontiguousarray(arr))
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)
    if not np.isfinite(values).all():
        raise SkipSample("non_finite", "modality values that are not finite")
    if options["window"] is not None:
        c, w = options["window"]
        out = _scale(values, c - w / 2, c + w / 2, options["bit_depth"])
    elif "VOILUTSequence" in ds or "WindowCenter" in ds:
        voi = apply_voi_lut(values, ds, index=0).astype(np.float64)
        out = _scale(voi, float(voi.min()), float(voi.max()), options["bit_depth"])
    else:
        out = _scale(values, float(values.min()), float(values.max()), options["bit_depth"])
    if photometric == "MONOCHROME1":  # low values are bright: invert
        out = (65535 if out.dtype == np.uint16 else 255) - out
    return Pixels(np.ascontiguousarray(out))


def load_dicom_frames(path: str, frames: list[int] | None, options: dict) -> list[Pixels | SkipSample]:
    """Read and decode ``path`` once and render the given frames (None: all of them). A failure to read or
    decode the file raises one ``SkipSample`` for the whole file: ``bad_dicom`` (the exception's type only:
    its message may quote the header), ``image_too_large``, ``no_such_frame``; a frame that cannot be
    rendered (``non_finite``, ``bad_dicom``) is that frame's ``SkipSample`` in the list."""
    import pydicom

    _quiet_pydicom()
    try:
        ds = pydicom.dcmread(path)
        rows, cols, n = geometry(ds)
        wanted = list(range(n)) if frames is None else list(frames)
        bad = [k for k in wanted if not 0 <= k < n]
        if bad:
            raise SkipSample("no_such_frame", f"frame {bad[0]} of {n}")
        single = n > 1 and len(wanted) == 1
        _check_size(rows, cols, 1 if single or n == 1 else n, options["max_pixels"])
        if single:
            ds.pixel_array_options(index=wanted[0])  # decode only that frame
        arr = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("bad_dicom", type(e).__name__) from None  # no message: it may quote the header
    if n > 1 and not single:
        if arr.shape[0] != n:
            raise SkipSample("bad_dicom", f"{arr.shape[0]} frames decoded, NumberOfFrames says {n}")
        frame_arrays = [arr[k] for k in wanted]
    else:
        frame_arrays = [arr]
    out: list[Pixels | SkipSample] = []
    for a in frame_arrays:
        try:
            out.append(_render(a, ds, photometric, options))
        except SkipSample as e:
            out.append(e)
        except Exception as e:
            out.append(SkipSample("bad_dicom", type(e).__name__))
    return out


def load_dicom_frame(path: str, frame: int, options: dict) -> Pixels:
    """One frame of ``path`` (only that frame is decoded); used for .dcm paths of pairs tables (frame 0)."""
    px = load_dicom_frames(path, [frame], options)[0]
    if isinstance(px, SkipSample):
        raise px
    return px


def _is_dicom(name: str, p: Path) -> bool:
    """``name`` (as listed under --input) ends in .dcm/.dicom, or the file ``p`` has the DICM preamble."""
    if Path(name).suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _file_item(f: Path, rel: str, i: int, total: int, source: str, opts, options: dict):
    """One file (``rel`` under --input, read at ``f``) -> a ``Group`` of its frames' records, or a ``Rejected``
    (whatever is wrong with the file)."""
    import pydicom

    base = hashed_key(source, rel, opts)
    label = f"file #{i + 1} of {total} (key {base})"
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if "Rows" not in ds:
            return Rejected("no_pixels", label)
        rows, cols, n = geometry(ds)
        _check_frames_fit(ds, rows, cols, n, f.stat().st_size)
        frames = list(range(n)) if opts.frame is None or n == 1 else [opts.frame]
        if frames[0] >= n:
            return Rejected("no_such_frame", label, f"frame {frames[0]} of {n}")
        _check_size(rows, cols, len(frames), options["max_pixels"])
        meta = safe_metadata(ds)
    except SkipSample as e:
        return Rejected(e.reason, label, e.detail)
    except Exception as e:
        return Rejected("bad_dicom", label, type(e).__name__)  # no message: it may quote the header
    meta.update(source=source, modality=str(meta.get("modality") or opts.modality or "unknown"),
                split=opts.split or "train")
    records = []
    for k in frames:
        key = base + (f"-f{k:04d}" if n > 1 else "")
        records.append(Record(key, [], None, dict(meta, frame=k) if n > 1 else meta,
                              label + (f" frame {k}" if n > 1 else "")))
    return Group(records, ImageRef(load_dicom_frames, (str(f), frames, options)), label)


def read(opts):
    _quiet_pydicom()
    check_options(opts)
    root = Path(opts.input)
    if not root.exists():
        raise SourceError(f"--input not found: {root}")
    files, refused = walked_files(root, opts, _is_dicom)
    if not files and not refused:
        raise SourceError(f"no DICOM files under {root}")
    check_key_secret(opts)
    options = dicom_options(opts)
    source = opts.source_name or "dicom"

    def gen():
        yield from refused
        for i, (rel, f) in enumerate(files):
            yield _file_item(f, rel, i, len(files), source, opts, options)

    return gen(), len(refused) + len(files)
