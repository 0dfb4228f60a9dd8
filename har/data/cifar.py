"""CIFAR-10/100 read straight from the python-pickle release into numpy arrays.

Reading the pickles ourselves (rather than through ``torchvision.datasets``) lets us check every file and
turn each problem into a :class:`DataError` that names the file and the fix. A checksum mismatch only warns:
re-built copies of CIFAR (such as the shared one used in CI) differ byte-wise from the official release.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from har.digest import file_hexdigest
from har.errors import DataError

log = logging.getLogger(__name__)

_ROOT_FIX = ("set data.root in the config or the HAR_DATA environment variable to the folder that holds "
             "{folder}/, or allow the download with data.download: true")
_CORRUPT_FIX = "delete it and download the dataset again (data.download: true)"


@dataclass(frozen=True, eq=False)
class CifarArrays:
    """Both splits of a CIFAR dataset: uint8 images N x 32 x 32 x 3 (HWC) and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    num_classes: int
    provenance: dict[str, Any]  # which files these are: see `cifar_provenance`


@dataclass(frozen=True)
class _Spec:
    """Where a CIFAR variant keeps what, and how big the official files are."""

    title: str
    torchvision_name: str
    folder: str
    label_key: str
    num_classes: int
    rows_per_train_file: int

    @property
    def torchvision_cls(self) -> type:
        """torchvision's dataset class: the official file list, md5 sums and downloader."""
        import torchvision.datasets  # deferred: importing torchvision takes seconds, only loading needs it

        return getattr(torchvision.datasets, self.torchvision_name)

    def files(self) -> dict[str, str]:
        """File name -> official md5, meta file included."""
        cls = self.torchvision_cls
        return {**dict(cls.train_list), **dict(cls.test_list), cls.meta["filename"]: cls.meta["md5"]}


_SPECS = {
    "cifar10": _Spec("CIFAR-10", "CIFAR10", "cifar-10-batches-py", "labels", 10, 10_000),
    "cifar100": _Spec("CIFAR-100", "CIFAR100", "cifar-100-python", "fine_labels", 100, 50_000),
}
_TEST_ROWS = 10_000
_IMAGE_BYTES = 3 * 32 * 32


def resolve_data_root(root: str | Path | None) -> Path:
    """The data folder: an explicit value wins, then the ``HAR_DATA`` environment variable, then ``data``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("HAR_DATA")
    return Path(env).expanduser() if env else Path("data")


def load_cifar(name: str, root: Path, download: bool = False,
               expect_official_sizes: bool = True) -> CifarArrays:
    """Load CIFAR-10 (``"cifar10"``) or CIFAR-100 (``"cifar100"``) from ``root``, checking every file.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: Folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        download: Fetch missing files with torchvision instead of failing.
        expect_official_sizes: Also require the official image counts per file and per class; tests turn
            this off to read small fake files.

    Raises:
        DataError: A file is missing (and ``download`` is off), unreadable, or inconsistent.
    """
    if name not in _SPECS:
        raise DataError(f"unknown dataset {name!r}: set data.dataset to one of {', '.join(sorted(_SPECS))}")
    spec = _SPECS[name]
    root = Path(root)
    _ensure_files(spec, root, download)
    folder = root / spec.folder
    md5s = {f: _md5(folder / f) for f in spec.files()}
    provenance = cifar_provenance(spec.title, name, folder, md5s, spec.files())
    if provenance["differing"]:
        log.warning("%s: %s differ from the official release (md5); they load, but results may differ "
                    "slightly from those on the official files", folder, ", ".join(provenance["differing"]))
    cls = spec.torchvision_cls
    classes = _read_classes(folder / cls.meta["filename"], cls.meta["key"], spec)
    train_files = [folder / f for f, _ in cls.train_list]
    test_files = [folder / f for f, _ in cls.test_list]
    train_images, train_labels = _read_split(train_files, spec, spec.rows_per_train_file,
                                             expect_official_sizes)
    test_images, test_labels = _read_split(test_files, spec, _TEST_ROWS, expect_official_sizes)
    return CifarArrays(train_images, train_labels, test_images, test_labels, classes, spec.num_classes, provenance)


def cifar_provenance(title: str, dataset: str, folder: Path, md5s: dict[str, str],
                     official: dict[str, str]) -> dict[str, Any]:
    """What a run read, for its reports: each file's md5 and whether all are the official release's.

    Re-built copies load too (see the module docstring), so the reports say which kind of data they are on.
    """
    differing = [f for f, md5 in official.items() if md5s.get(f) != md5]
    label = (f"official {title}" if not differing else
             f"{title} copy at {folder} (md5 differs from the official release: {', '.join(differing)})")
    return {"dataset": dataset, "official": not differing, "source": str(folder), "files": dict(md5s),
            "differing": differing, "label": label}


def _ensure_files(spec: _Spec, root: Path, download: bool) -> None:
    """Fail early, naming every missing file, or let torchvision download the release."""
    folder = root / spec.folder
    missing = [f for f in spec.files() if not (folder / f).is_file()]
    if missing and download:
        log.info("downloading %s into %s", spec.title, root)
        try:
            spec.torchvision_cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"downloading {spec.title} into {root} failed ({exc}); check the network, or "
                            f"copy the python-version release so that {folder}/ holds "
                            f"{', '.join(spec.files())}") from exc
        missing = [f for f in spec.files() if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{spec.title} file(s) missing in {folder}: {', '.join(missing)}; "
                        + _ROOT_FIX.format(folder=spec.folder))


# md5 by (path, size, mtime): a process that loads the same files twice (train, then evaluate) hashes them once.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _md5(path: Path) -> str:
    """Hex md5 of a file; a mismatch with the release is a warning, never an error (see load_cifar)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        _MD5_CACHE[key] = file_hexdigest(path, "md5")
    return _MD5_CACHE[key]


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR pickle; keys may be bytes (python-2 pickles), so decode them."""
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as exc:  # unpickling damaged bytes can raise almost any exception type
        raise DataError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                        f"{_CORRUPT_FIX}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} is corrupt: it holds a {type(obj).__name__}, not a CIFAR dict; "
                        f"{_CORRUPT_FIX}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _get(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise DataError(f"{path} has no {key!r} entry (keys: {', '.join(map(str, batch))}); it is not a "
                        f"valid CIFAR file: {_CORRUPT_FIX}")
    return batch[key]


def _read_classes(path: Path, key: str, spec: _Spec) -> list[str]:
    names = _get(_unpickle(path), key, path)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        raise DataError(f"{path}: {key!r} should list the {spec.num_classes} class names of "
                        f"{spec.title}; {_CORRUPT_FIX}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _read_split(paths: list[Path], spec: _Spec, official_rows: int,
                official: bool) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the files of one split into HWC images and labels, checking each file and the totals."""
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        data = np.asarray(_get(batch, "data", path))
        lab = np.asarray(_get(batch, spec.label_key, path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
            raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 "
                            f"N x {_IMAGE_BYTES}; {_CORRUPT_FIX}")
        if lab.ndim != 1 or len(lab) != len(data) or not np.issubdtype(lab.dtype, np.integer):
            raise DataError(f"{path}: {len(lab)} {spec.label_key!r} entries of type {lab.dtype} for "
                            f"{len(data)} images, expected one integer label per image; {_CORRUPT_FIX}")
        if len(lab) and (lab.min() < 0 or lab.max() >= spec.num_classes):
            raise DataError(f"{path}: labels range over [{lab.min()}, {lab.max()}], {spec.title} needs "
                            f"[0, {spec.num_classes}); {_CORRUPT_FIX}")
        if official and len(data) != official_rows:
            raise DataError(f"{path} holds {len(data)} images, the official file holds {official_rows}; "
                            f"{_CORRUPT_FIX}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab.astype(np.int64))
    all_labels = np.concatenate(labels)
    if official:
        per_class = len(paths) * official_rows // spec.num_classes
        counts = np.bincount(all_labels, minlength=spec.num_classes)
        if np.any(counts != per_class):
            names = ", ".join(str(p) for p in paths)
            raise DataError(f"{names}: images per class range over [{counts.min()}, {counts.max()}], the "
                            f"official files have {per_class} per class; {_CORRUPT_FIX}")
    return np.ascontiguousarray(np.concatenate(images)), all_labels
