"""From a data config to the three splits of one run: LT train, balanced validation, balanced test."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from har.atomic import atomic_write
from har.config import DataConfig
from har.data.cifar import load_cifar, resolve_data_root
from har.data.errors import DataError
from har.data.longtail import make_longtail_split, shot_groups, subsample_per_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Images (uint8, N x 32 x 32 x 3) and labels of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class RunData:
    """What training and evaluation of one run read."""

    train: Split
    val: Split
    test: Split
    class_counts: list[int]  # training images per class: the long-tailed profile the losses see
    groups: dict[str, list[int]]  # many / medium / few class ids by training count
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)


def build_data(cfg: DataConfig) -> RunData:
    """The splits of a run: from the dataset files, or from a bundle written by `export_bundle`."""
    full = read_bundle(cfg) if cfg.bundle else full_splits(cfg)
    if cfg.train_fraction == 1 and cfg.eval_fraction == 1:
        return full
    train = _subsample(full.train, cfg.train_fraction)
    log.info("quick run: keeping %d of %d long-tailed training images", len(train), len(full.train))
    return RunData(train=train, val=_subsample(full.val, cfg.eval_fraction),
                   test=_subsample(full.test, cfg.eval_fraction),
                   class_counts=np.bincount(train.labels, minlength=full.num_classes).tolist(),
                   groups=full.groups, classes=full.classes)


def _subsample(split: Split, fraction: float) -> Split:
    """The first share of every class (quick runs keep the long-tailed profile)."""
    if fraction == 1:
        return split
    keep = subsample_per_class(np.arange(len(split)), split.labels, fraction)
    return Split(split.images[keep], split.labels[keep])


def full_splits(cfg: DataConfig) -> RunData:
    """Load the dataset files and cut the long-tailed training subset, the validation and the test split."""
    arrays = load_cifar(cfg.dataset, resolve_data_root(cfg.root), download=cfg.download)
    split = make_longtail_split(arrays.train_labels, arrays.num_classes, cfg.ratio, seed=cfg.seed,
                                val_per_class=cfg.val_per_class)
    return RunData(
        train=Split(arrays.train_images[split.train_indices], arrays.train_labels[split.train_indices]),
        val=Split(arrays.train_images[split.val_indices], arrays.train_labels[split.val_indices]),
        test=Split(arrays.test_images, arrays.test_labels),
        class_counts=list(split.class_counts),
        groups=shot_groups(split.class_counts),
        classes=list(arrays.classes),
    )


# What a bundle must agree on with the config asking for it.
_BUNDLE_KEYS = ("dataset", "ratio", "seed", "val_per_class")


def export_bundle(cfg: DataConfig, path: str | Path) -> Path:
    """Write the full splits of `cfg` (fractions ignored) to one compressed file.

    A GPU machine without the dataset files or a network gets exactly what a run reads (CIFAR-10-LT-100:
    about 46 MB instead of 178 MB of pickles); point `data.bundle` at the file there.
    """
    return write_bundle(full_splits(dataclasses.replace(cfg, bundle=None)), cfg, path)


# xz over per-channel pixel differences: CIFAR-10-LT-100 + test in 46 MB and 17 s (plain xz: 52 MB, 22 s).
_XZ_MAGIC = b"\xfd7zXZ\x00"
_XZ_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 3}, {"id": lzma.FILTER_LZMA2, "preset": 0}]


def write_bundle(data: RunData, cfg: DataConfig, path: str | Path) -> Path:
    """Write `data` with the data-config fields that identify it; xz-compressed when the name ends in .xz."""
    meta = {key: getattr(cfg, key) for key in _BUNDLE_KEYS} | {"classes": data.classes}
    arrays = {f"{name}_{part}": getattr(data.split(name), part)
              for name in ("train", "val", "test") for part in ("images", "labels")}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    path = Path(path)
    payload = buffer.getvalue()
    if path.suffix == ".xz":  # worth its compression time only when the file has to travel
        payload = lzma.compress(payload, filters=_XZ_FILTERS)
    atomic_write(path, lambda f: f.write(payload))
    return path


def read_bundle(cfg: DataConfig) -> RunData:
    """Splits from a bundle file, refused unless it was exported for the same dataset, ratio and seeds."""
    path = Path(cfg.bundle)
    if not path.is_file():
        raise DataError(f"data.bundle {path} does not exist; write it with `har export-data` or unset data.bundle")
    try:
        raw = path.read_bytes()
        if raw.startswith(_XZ_MAGIC):
            raw = lzma.decompress(raw)
        with np.load(io.BytesIO(raw)) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (lzma.LZMAError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"data.bundle {path} is corrupt ({exc}); export it again with `har export-data`") from exc
    meta = json.loads(str(arrays.pop("meta")))
    wrong = [f"{k}: bundle {meta[k]!r}, config {getattr(cfg, k)!r}" for k in _BUNDLE_KEYS if meta[k] != getattr(cfg, k)]
    if wrong:
        raise DataError(f"data.bundle {path} was exported for another split ({'; '.join(wrong)}); export it again "
                        f"with this config")
    splits = {name: Split(arrays[f"{name}_images"], arrays[f"{name}_labels"]) for name in ("train", "val", "test")}
    counts = np.bincount(splits["train"].labels, minlength=len(meta["classes"])).tolist()
    return RunData(**splits, class_counts=counts, groups=shot_groups(counts), classes=meta["classes"])
