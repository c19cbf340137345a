"""nifti: .nii / .nii.gz volumes (a file or a folder, recursive), sliced into 2-D images.

Volumes are reoriented to the closest canonical (RAS+) orientation first, so --axis 2 is axial,
1 coronal, 0 sagittal whatever the scanner wrote. 4-D series use --volume (default 0).
Intensities: --window CENTER,WIDTH, else the 0.5-99.5 percentile range of the volume.
--slices all (default), middle, or every:N; --bit-depth 16 (default) or 8.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from data_prep.sources import SourceError
from data_prep.writer import ImageRef, Pixels, Record, Rejected, SkipSample
from vlm.data.schema import sanitize_key

AXES = {0: "sagittal", 1: "coronal", 2: "axial"}


def add_arguments(p):
    g = p.add_argument_group("nifti")
    g.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="slicing axis after RAS reorientation "
                                                                          "(2 axial, 1 coronal, 0 sagittal)")
    g.add_argument("--slices", default="all", help="all | middle | every:N (default all)")
    g.add_argument("--volume", type=int, default=0, help="4-D series: which volume (default 0)")


def _canonical(path: str):
    import nibabel as nib

    img = nib.load(path)
    return nib.as_closest_canonical(img)


@functools.lru_cache(maxsize=2)
def _volume(path: str, volume: int) -> tuple[np.ndarray, float, float]:
    """The volume as float32 and its 0.5/99.5 percentiles; cached, since a worker gets consecutive slices."""
    img = _canonical(path)
    data = np.asanyarray(img.dataobj, dtype=np.float32) if img.ndim <= 3 else \
        np.asanyarray(img.dataobj[..., volume], dtype=np.float32)
    finite = data[np.isfinite(data)]
    lo, hi = (float(np.percentile(finite, 0.5)), float(np.percentile(finite, 99.5))) if finite.size else (0.0, 1.0)
    return data, lo, hi


def load_nifti_slice(path: str, axis: int, index: int, volume: int, window, bit_depth: int) -> Pixels:
    try:
        data, lo, hi = _volume(path, volume)
    except Exception as e:
        raise SkipSample("bad_nifti", f"{type(e).__name__}: {e}") from None
    if window is not None:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    sl = np.take(data, index, axis=axis)
    sl = np.rot90(np.nan_to_num(sl, nan=lo))  # RAS voxel order -> radiological display (anterior up)
    top = 65535 if bit_depth == 16 else 255
    out = (np.clip(sl, lo, hi) - lo) / max(hi - lo, 1e-6) * top
    return Pixels(np.ascontiguousarray(out.round().astype(np.uint16 if bit_depth == 16 else np.uint8)))


def _indices(n: int, spec: str) -> list[int]:
    if spec == "all":
        return list(range(n))
    if spec == "middle":
        return [n // 2]
    if spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
            if step < 1:
                raise ValueError
            return list(range(0, n, step))
        except ValueError:
            pass
    raise SourceError(f"--slices {spec!r}: use all, middle or every:N")


def read(opts):
    from data_prep.sources.dicom import dicom_options

    root = Path(opts.input)
    if not root.exists():
        raise SourceError(f"--input not found: {root}")
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root])
                   if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise SourceError(f"no .nii/.nii.gz files under {root}")
    _indices(1, opts.slices)  # validate before writing
    dopts = dicom_options(opts)
    source = opts.source_name or "nifti"

    def gen():
        for f in files:
            rel = str(f.relative_to(root)) if root.is_dir() else f.name
            try:
                img = _canonical(str(f))
                shape = img.shape
            except Exception as e:
                yield Rejected("bad_nifti", rel, type(e).__name__)
                continue
            if len(shape) < 3:
                yield Rejected("not_a_volume", rel, f"shape {shape}")
                continue
            if len(shape) > 3 and opts.volume >= shape[3]:
                yield Rejected("no_such_volume", rel, f"volume {opts.volume} of {shape[3]}")
                continue
            zooms = [round(float(z), 4) for z in img.header.get_zooms()[:3]]
            stem = sanitize_key(rel.replace(".nii.gz", "").replace(".nii", ""))
            for k in _indices(shape[opts.axis], opts.slices):
                meta = {"source": source, "modality": opts.modality or "unknown", "split": opts.split or "train",
                        "volume": rel, "axis": AXES[opts.axis], "slice": k, "num_slices": shape[opts.axis],
                        "voxel_size": zooms}
                ref = ImageRef(load_nifti_slice, (str(f), opts.axis, k, opts.volume, dopts["window"],
                                                  dopts["bit_depth"]))
                yield Record(f"{source}-{stem}-{AXES[opts.axis][0]}{k:04d}", [ref], None, meta, f"{rel} slice {k}")

    return gen(), None
