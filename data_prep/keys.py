"""Sample keys that carry no path text: a keyed hash of the input's relative path.

Paths of medical data often hold patient names and record numbers (``DOE^JOHN_MRN00123456/chest.dcm``).
An unkeyed hash of such a path is reversible by hashing every MRN-shaped candidate, so keys of the
medical formats (dicom, nifti, pairs) are ``<source>-<blake2b(path, key=secret)>`` with a per-dataset
secret of 32 random bytes. The secret lives outside the shards and the manifest: in
``<out>/.key_secret`` (mode 0600; kept by ``--overwrite`` so that keys stay stable between runs), or in
the file ``--key-secret FILE`` names (share one secret between datasets whose keys must agree, e.g. the
splits of one corpus). Do not publish the secret with the shards: without it a key reveals nothing.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from vlm.data.schema import sanitize_key

SECRET_NAME = ".key_secret"
SECRET_BYTES = 32


class KeySecretError(ValueError):
    pass


def secret_path(opts) -> Path:
    given = getattr(opts, "key_secret", None)
    return Path(given) if given else Path(opts.out) / SECRET_NAME


def dataset_secret(opts) -> bytes:
    """The dataset's secret (read, or created with 32 random bytes at first use), cached on ``opts``."""
    cached = getattr(opts, "_key_secret_bytes", None)
    if cached is not None:
        return cached
    path = secret_path(opts)
    if path.exists():
        data = path.read_bytes()
        if len(data) < 16:
            raise KeySecretError(f"{path}: a key secret must hold at least 16 bytes (it holds {len(data)})")
    else:
        if path.parent.exists() and not path.parent.is_dir():
            raise KeySecretError(f"{path.parent} is not a folder (key secret {path})")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = secrets.token_bytes(SECRET_BYTES)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    opts._key_secret_bytes = data
    return data


def hashed_key(source: str, text: str, opts, digest_size: int = 10) -> str:
    """``<source>-<hex>``: a keyed blake2b of ``text`` (a relative path, a path plus a frame number)."""
    key = dataset_secret(opts)[:64]  # blake2b takes keys of up to 64 bytes
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), key=key, digest_size=digest_size)
    return sanitize_key(source) + "-" + digest.hexdigest()
