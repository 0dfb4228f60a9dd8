"""From a data config to the three splits of one run: LT train, balanced validation, balanced test.

CIFAR splits are arrays (cut here, or read from a bundle); ImageNet-LT and iNaturalist 2018 splits are published
lists of image files, checked against their git blob ids and for missing images before any training starts.
"""

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
from har.data.imagelist import PublishedList, SplitList, check_images_exist, read_split_list, verify_split_list
from har.data.imagenet_lt import IMAGENET_LT_LISTS
from har.data.inat import INAT2018_LISTS
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
class ListSplit:
    """Images of a split list under an image root, decoded and transformed by data-loader workers."""

    entries: SplitList
    root: Path

    @property
    def labels(self) -> np.ndarray:
        return self.entries.labels

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class RunData:
    """What training and evaluation of one run read."""

    train: Split | ListSplit
    val: Split | ListSplit
    test: Split | ListSplit
    class_counts: list[int]  # training images per class: the long-tailed profile the losses see
    groups: dict[str, list[int]]  # many / medium / few class ids by training count
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def split(self, name: str) -> Split | ListSplit:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)


def build_data(cfg: DataConfig) -> RunData:
    """The splits of a run: from the dataset files, a bundle written by `export_bundle`, or split lists."""
    if cfg.is_list_dataset:
        full = list_splits(cfg)
    else:
        full = read_bundle(cfg) if cfg.bundle else full_splits(cfg)
    if cfg.train_fraction == 1 and cfg.eval_fraction == 1:
        return full
    train = _subsample(full.train, cfg.train_fraction)
    log.info("quick run: keeping %d of %d long-tailed training images", len(train), len(full.train))
    if not all(np.bincount(train.labels, minlength=full.num_classes)):
        raise DataError(f"data.train_fraction {cfg.train_fraction} leaves a class without training images; raise it")
    return RunData(train=train, val=_subsample(full.val, cfg.eval_fraction),
                   test=_subsample(full.test, cfg.eval_fraction),
                   class_counts=np.bincount(train.labels, minlength=full.num_classes).tolist(),
                   groups=full.groups, classes=full.classes)


def _subsample(split: Split | ListSplit, fraction: float) -> Split | ListSplit:
    """The first share of every class (quick runs keep the long-tailed profile)."""
    if fraction == 1:
        return split
    keep = subsample_per_class(np.arange(len(split)), split.labels, fraction)
    if isinstance(split, ListSplit):
        entries = split.entries
        return ListSplit(SplitList([entries.paths[i] for i in keep], entries.labels[keep], entries.source), split.root)
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


PUBLISHED_LISTS: dict[str, dict[str, PublishedList]] = {"imagenet_lt": IMAGENET_LT_LISTS, "inat2018": INAT2018_LISTS}


def list_splits(cfg: DataConfig) -> RunData:
    """The published train / val / test lists of ImageNet-LT or iNaturalist 2018, verified, on their image root.

    Each list is checked against its published git blob id (refused when `data.strict_lists`, else a warning),
    every listed image must exist, labels must be 0..C-1 with every class in the training list. iNaturalist 2018
    has no public test labels: as in Kang et al. and later work, its validation list is also the test split
    (a warning says so, as s is then chosen on the split that is reported).
    """
    root = resolve_data_root(cfg.root)
    lists = Path(cfg.lists) if cfg.lists else root / "splits"
    images = Path(cfg.images) if cfg.images else root / cfg.dataset
    entries: dict[str, SplitList] = {}
    for name, published in PUBLISHED_LISTS[cfg.dataset].items():
        path = lists / published.file_name
        verify_split_list(path, published.blob_id, strict=cfg.strict_lists, expected_lines=published.lines)
        entries[name] = read_split_list(path)
        check_images_exist(entries[name], images)
    if "test" not in entries:
        log.warning("%s has no test list: its validation list %s is also the test split (as in published work), so "
                    "s is chosen on the reported split", cfg.dataset, entries["val"].source)
        entries["test"] = entries["val"]
    num_classes = int(max(e.labels.max() for e in entries.values())) + 1
    counts = np.bincount(entries["train"].labels, minlength=num_classes)
    if not counts.all():
        missing = np.flatnonzero(counts == 0)
        raise DataError(f"{entries['train'].source} has no image of class(es) {missing[:10].tolist()} that the other "
                        f"lists use; labels must run 0..C-1 with every class in the training list")
    first = {int(label): path for path, label in zip(reversed(entries["train"].paths),
                                                     reversed(entries["train"].labels.tolist()))}
    classes = [Path(first[c]).parent.name for c in range(num_classes)]  # the class folder, e.g. n01440764
    return RunData(**{name: ListSplit(e, images) for name, e in entries.items()}, class_counts=counts.tolist(),
                   groups=shot_groups(counts), classes=classes)


# What a bundle must agree on with the config asking for it.
_BUNDLE_KEYS = ("dataset", "ratio", "seed", "val_per_class")


def export_bundle(cfg: DataConfig, path: str | Path) -> Path:
    """Write the full CIFAR splits of `cfg` (fractions ignored) to one compressed file.

    A GPU machine without the dataset files or a network gets exactly what a run reads (CIFAR-10-LT-100:
    about 46 MB instead of 178 MB of pickles); point `data.bundle` at the file there.
    """
    if cfg.is_list_dataset:
        raise DataError(f"{cfg.dataset} is read from split lists and image files, not exported; copy the images")
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
