"""Hashes of files read in chunks, so that a 170 MB CIFAR batch or a ResNet-50 checkpoint is never held whole."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hexdigest(path: Path, algorithm: str) -> str:
    """Hex digest of `path`'s bytes by a hashlib algorithm name (md5 for release checks, sha256 for identity)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
