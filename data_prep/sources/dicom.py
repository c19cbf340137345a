"""dicom: a folder of DICOM files (recursive; .dcm or any file with the DICM preamble).

Pixels: modality LUT (rescale slope/intercept), then a window: the file's VOI LUT or window
(default), a window you give (--window CENTER,WIDTH), or min-max. MONOCHROME1 is inverted.
Output: 16-bit PNG (default) or 8-bit (--bit-depth 8); colour images stay 8-bit RGB.
Multi-frame files give one sample per frame, or one chosen frame (--frame N).

Privacy: metadata comes only from ``data_prep.phi``'s allow-list; sample keys are hashes of the
relative path (file names often carry patient names or ids), and so are offender names in the
summary. No header value outside the allow-list reaches a shard, the manifest or a log line.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np

from data_prep.phi import safe_metadata
from data_prep.sources import SourceError
from data_prep.writer import ImageRef, Pixels, Record, Rejected, SkipSample


def add_arguments(p):
    g = p.add_argument_group("dicom (also used for .dcm paths in pairs files)")
    g.add_argument("--window", help="CENTER,WIDTH in modality units (e.g. 40,400 for a CT brain window); "
                                    "default: the file's VOI LUT/window, else min-max")
    g.add_argument("--bit-depth", type=int, choices=[8, 16], default=16, help="PNG depth (default 16)")
    g.add_argument("--frame", type=int, help="multi-frame files: keep only this frame (default: every frame)")


def _quiet_pydicom() -> None:
    """pydicom's warnings and log lines can quote header values (names, dates): keep them out of logs."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def dicom_options(opts) -> dict:
    window = getattr(opts, "window", None)
    if window:
        try:
            c, w = (float(x) for x in window.split(","))
        except ValueError:
            raise SourceError(f"--window {window!r} must be CENTER,WIDTH") from None
        if w <= 0:
            raise SourceError("--window width must be > 0")
        window = (c, w)
    return {"window": window, "bit_depth": getattr(opts, "bit_depth", 16), "max_pixels": opts.max_pixels}


def _scale(arr: np.ndarray, lo: float, hi: float, bit_depth: int) -> np.ndarray:
    top = 65535 if bit_depth == 16 else 255
    out = (np.clip(arr, lo, hi) - lo) / max(hi - lo, 1e-6) * top
    return out.round().astype(np.uint16 if bit_depth == 16 else np.uint8)


def load_dicom_frame(path: str, frame: int, options: dict) -> Pixels:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    _quiet_pydicom()
    try:
        ds = pydicom.dcmread(path)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > options["max_pixels"]:
            raise SkipSample("image_too_large", f"{cols}x{rows}")
        arr = ds.pixel_array
    except SkipSample:
        raise
    except Exception as e:
        raise SkipSample("bad_dicom", type(e).__name__) from None  # no message: it may quote the header
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        arr = arr[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:  # colour
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            arr = convert_color_space(arr, photometric, "RGB")
        if arr.dtype != np.uint8:
            arr = _scale(arr.astype(np.float64), float(arr.min()), float(arr.max()), 8)
        return Pixels(np.ascontiguousarray(arr))
    values = apply_modality_lut(arr, ds).astype(np.float64)
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


def _is_dicom(p: Path) -> bool:
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read(opts):
    import pydicom

    _quiet_pydicom()
    root = Path(opts.input)
    if not root.exists():
        raise SourceError(f"--input not found: {root}")
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file() and _is_dicom(p))
    if not files:
        raise SourceError(f"no DICOM files under {root}")
    options = dicom_options(opts)
    source = opts.source_name or "dicom"

    def gen():
        for i, f in enumerate(files):
            rel = str(f.relative_to(root)) if root.is_dir() else f.name
            digest = hashlib.blake2b(rel.encode(), digest_size=8).hexdigest()
            label = f"file #{i + 1} of {len(files)} (key {source}-{digest})"
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception as e:
                yield Rejected("bad_dicom", label, type(e).__name__)
                continue
            if "Rows" not in ds:
                yield Rejected("no_pixels", label)
                continue
            meta = safe_metadata(ds)
            meta.update(source=source, modality=str(meta.get("modality") or opts.modality or "unknown"),
                        split=opts.split or "train")
            n = int(ds.get("NumberOfFrames", 1) or 1)
            frames = range(n) if opts.frame is None or n == 1 else [opts.frame]
            for k in frames:
                if k >= n or k < 0:
                    yield Rejected("no_such_frame", label, f"frame {k} of {n}")
                    continue
                key = f"{source}-{digest}" + (f"-f{k:04d}" if n > 1 else "")
                m = dict(meta, frame=k) if n > 1 else meta
                yield Record(key, [ImageRef(load_dicom_frame, (str(f), k, options))], None, m, label)

    return gen(), None
