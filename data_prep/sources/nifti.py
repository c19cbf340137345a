"""nifti: .nii / .nii.gz volumes (a file or a folder, recursive), sliced into 2-D images.

Volumes are reoriented to the closest canonical (RAS+) orientation first, so --axis 2 is axial,
1 coronal, 0 sagittal whatever the scanner wrote. 4-D series use --volume (default 0).
Intensities: --window CENTER,WIDTH, else the 0.5-99.5 percentile range of the volume's finite voxels.
--slices all (default), middle, or every:N; --bit-depth 16 (default) or 8. A worker loads a volume
once for all the slices it encodes.

Non-finite voxels (NaN, +-inf). A volume without a single finite voxel gives no image: each of its
slices is skipped as ``non_finite``, and so is a slice none of whose voxels is finite. A slice that
is only partly non-finite is kept: NaN and -inf voxels are drawn as the window's low end (black) and
+inf as its high end, and the slice's metadata records ``non_finite_voxels``. Why: NaN is how
processed volumes (skull-stripped, registered, masked statistical maps) mark "outside the mask", so
dropping every slice with a NaN would drop whole real data sets, while a slice with nothing finite
carries no image at all (it used to be written as an all-black image without a word).

Failures, one volume at a time: a file nibabel cannot read is one ``bad_nifti`` skip (the detail is
the exception's type: nibabel's messages quote the path), ``not_a_volume`` and ``no_such_volume``
likewise; a volume that fails to load in a worker skips each of its slices as ``bad_nifti``.

Files: --input is one file, or a folder walked as the dicom reader walks it (``walk_input``): links
that leave it are counted ``outside_root`` (``entry N``) without a look at their target, unless
--allow-outside-root.

Privacy: keys and the ``volume`` metadata field are keyed hashes of the relative path
(``data_prep.keys.hashed_key``, as the dicom reader does): ``<source>-<hash>-<a|c|s><slice>``;
the summary names a volume by its position and that hash.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from data_prep.keys import hashed_key
from data_prep.sources import SourceError, check_key_secret, walked_files
from data_prep.writer import ImageRef, Pixels, Record, Rejected, SkipSample

AXES = {0: "sagittal", 1: "coronal", 2: "axial"}


def add_arguments(p):
    g = p.add_argument_group("nifti")
    g.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="slicing axis after RAS reorientation "
                                                                          "(2 axial, 1 coronal, 0 sagittal)")
    g.add_argument("--slices", default="all", help="all | middle | every:N (default all)")
    g.add_argument("--volume", type=int, default=0, help="4-D series: which volume, counted from 0 (default 0)")


def check_options(opts) -> None:
    """--slices and --volume, before anything is written (``SourceError`` naming the option)."""
    _indices(1, getattr(opts, "slices", "all"))
    volume = getattr(opts, "volume", 0)
    if volume < 0:
        raise SourceError(f"--volume must be >= 0 (volumes are counted from 0; got {volume})")


def _canonical(path: str):
    import nibabel as nib

    img = nib.load(path)
    return nib.as_closest_canonical(img)


@functools.lru_cache(maxsize=2)
def _volume(path: str, volume: int) -> tuple[np.ndarray, float, float, bool]:
    """The volume as float32, the 0.5/99.5 percentiles of its finite voxels, and whether it has any;
    cached, since a worker gets consecutive slices."""
    img = _canonical(path)
    data = np.asanyarray(img.dataobj, dtype=np.float32) if img.ndim <= 3 else \
        np.asanyarray(img.dataobj[..., volume], dtype=np.float32)
    finite = data[np.isfinite(data)]
    if not finite.size:
        return data, 0.0, 1.0, False
    return data, float(np.percentile(finite, 0.5)), float(np.percentile(finite, 99.5)), True


def load_nifti_slice(path: str, axis: int, index: int, volume: int, window, bit_depth: int) -> Pixels:
    try:
        data, lo, hi, any_finite = _volume(path, volume)
        sl = np.take(data, index, axis=axis)
    except Exception as e:
        raise SkipSample("bad_nifti", type(e).__name__) from None  # nibabel's messages quote the path
    if not any_finite:
        raise SkipSample("non_finite", "no finite voxel in the volume")
    finite = np.isfinite(sl)
    n_bad = int(sl.size - np.count_nonzero(finite))
    if n_bad == sl.size:
        raise SkipSample("non_finite", "no finite voxel in the slice")
    if window is not None:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    if n_bad:  # masked-out voxels: black (+inf white); the metadata says how many
        sl = np.nan_to_num(sl, nan=lo, posinf=hi, neginf=lo)
    sl = np.rot90(sl)  # RAS voxel order -> radiological display (anterior up)
    top = 65535 if bit_depth == 16 else 255
    out = (np.clip(sl, lo, hi) - lo) / max(hi - lo, 1e-6) * top
    return Pixels(np.ascontiguousarray(out.round().astype(np.uint16 if bit_depth == 16 else np.uint8)),
                  meta={"non_finite_voxels": n_bad} if n_bad else None)


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
    raise SourceError(f"--slices {spec!r}: use all, middle or every:N (N >= 1)")


def read(opts):
    from data_prep.sources.dicom import dicom_options

    check_options(opts)
    root = Path(opts.input)
    if not root.exists():
        raise SourceError(f"--input not found: {root}")
    files, refused = walked_files(root, opts, lambda name, _: name.endswith((".nii", ".nii.gz")))
    if not files and not refused:
        raise SourceError(f"no .nii/.nii.gz files under {root}")
    check_key_secret(opts)
    dopts = dicom_options(opts)
    source = opts.source_name or "nifti"

    def gen():
        yield from refused
        for i, (rel, f) in enumerate(files):
            vid = hashed_key(source, rel, opts)
            label = f"volume #{i + 1} of {len(files)} (key {vid})"
            try:
                img = _canonical(str(f))
                shape = tuple(int(x) for x in img.shape)
                zooms = [round(float(z), 4) for z in img.header.get_zooms()[:3]]
            except Exception as e:
                yield Rejected("bad_nifti", label, type(e).__name__)
                continue
            if len(shape) < 3:
                yield Rejected("not_a_volume", label, f"shape {shape}")
                continue
            if len(shape) > 3 and opts.volume >= shape[3]:
                yield Rejected("no_such_volume", label, f"volume {opts.volume} of {shape[3]}")
                continue
            for k in _indices(shape[opts.axis], opts.slices):
                meta = {"source": source, "modality": opts.modality or "unknown", "split": opts.split or "train",
                        "volume": vid, "axis": AXES[opts.axis], "slice": k, "num_slices": shape[opts.axis],
                        "voxel_size": zooms}
                ref = ImageRef(load_nifti_slice, (str(f), opts.axis, k, opts.volume, dopts["window"],
                                                  dopts["bit_depth"]))
                yield Record(f"{vid}-{AXES[opts.axis][0]}{k:04d}", [ref], None, meta, f"{label} slice {k}")

    return gen(), None
