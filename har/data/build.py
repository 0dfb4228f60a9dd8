"""From a data config to the three splits of one run: LT train, balanced validation, balanced test.

CIFAR splits are arrays (cut here, or read from a bundle); ImageNet-LT and iNaturalist 2018 splits are published
lists of image files, checked against their git blob ids and for missing images before any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from har.atomic import atomic_write
from har.config import DataConfig
from har.data.cifar import load_cifar, resolve_data_root
from har.data.imagelist import SplitList, check_images_exist, read_split_list, verify_split_list
from har.data.longtail import make_longtail_split, shot_groups, subsample_per_class
from har.errors import DataError
from har.facts import PUBLISHED_LISTS

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


def unknown_provenance() -> dict[str, Any]:
    """Data handed over in memory (tests, callers of `train(data=...)`): nothing says where it came from."""
    return {"dataset": None, "official": False, "files": {}, "differing": [],
            "label": "data given in memory (origin not recorded)"}


@dataclass(frozen=True)
class RunData:
    """What training and evaluation of one run read."""

    train: Split | ListSplit
    val: Split | ListSplit
    test: Split | ListSplit
    class_counts: list[int]  # training images per class: the long-tailed profile the losses see
    groups: dict[str, list[int]]  # many / medium / few class ids by training count
    classes: list[str]
    # which data these are, for the reports: dataset, official (bool), files, differing, label (a caption)
    provenance: dict[str, Any] = field(default_factory=unknown_provenance)

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
    label = (f"{full.provenance['label']} (quick run: {cfg.train_fraction:g} of every training class, "
             f"{cfg.eval_fraction:g} of val and test)")
    return RunData(train=train, val=_subsample(full.val, cfg.eval_fraction),
                   test=_subsample(full.test, cfg.eval_fraction),
                   class_counts=np.bincount(train.labels, minlength=full.num_classes).tolist(),
                   groups=full.groups, classes=full.classes,
                   provenance=full.provenance | {"train_fraction": cfg.train_fraction,
                                                 "eval_fraction": cfg.eval_fraction, "label": label})


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
        provenance=arrays.provenance,
    )


_LIST_TITLES = {"imagenet_lt": "ImageNet-LT", "inat2018": "iNaturalist 2018"}


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
    blob_ids: dict[str, str] = {}
    for name, published in PUBLISHED_LISTS[cfg.dataset].items():
        path = lists / published.file_name
        blob_ids[published.file_name] = verify_split_list(path, published.blob_id, strict=cfg.strict_lists,
                                                          expected_lines=published.lines)
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
                   groups=shot_groups(counts), classes=classes,
                   provenance=list_provenance(cfg.dataset, lists, images, blob_ids))


def list_provenance(dataset: str, lists: Path, images: Path, blob_ids: dict[str, str]) -> dict[str, Any]:
    """The lists a run read (git blob ids) and whether they are the published ones (the images are not hashed)."""
    published = {p.file_name: p.blob_id for p in PUBLISHED_LISTS[dataset].values()}
    differing = [name for name, blob in blob_ids.items() if published[name] != blob]
    title = _LIST_TITLES[dataset]
    label = (f"published {title} lists" if not differing else
             f"{title} lists at {lists} (git blob id differs from the published ones: {', '.join(differing)})")
    return {"dataset": dataset, "official": not differing, "source": str(lists), "images": str(images),
            "files": dict(blob_ids), "differing": differing, "label": label}


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
_BUNDLE_FORMAT = 2  # 2: a sha256 over the metadata and the arrays, the source data's provenance
_SPLITS = ("train", "val", "test")
_ARRAYS = tuple(f"{name}_{part}" for name in _SPLITS for part in ("images", "labels"))
_BUNDLE_FIX = ("delete it and write it again with `har export-data --config <run config> --out {path}` (a pipeline "
               "split, results/splits/<split>/data.npz, is rebuilt by the pipeline when you delete it)")


def _bundle_sha256(meta_json: str, arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the metadata and every array's name, dtype, shape and bytes: any damage changes it."""
    digest = hashlib.sha256(meta_json.encode())
    for name in _ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def write_bundle(data: RunData, cfg: DataConfig, path: str | Path) -> Path:
    """Write `data` with the data-config fields that identify it, its sizes, the provenance of the files it was
    cut from and a checksum; xz-compressed when the name ends in .xz."""
    arrays = {f"{name}_{part}": getattr(data.split(name), part) for name in _SPLITS for part in ("images", "labels")}
    meta = {key: getattr(cfg, key) for key in _BUNDLE_KEYS} | {
        "format": _BUNDLE_FORMAT, "classes": data.classes, "sizes": {name: len(data.split(name)) for name in _SPLITS},
        "provenance": data.provenance}
    meta_json = json.dumps(meta, sort_keys=True)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(meta_json), sha256=np.array(_bundle_sha256(meta_json, arrays)), **arrays)
    path = Path(path)
    payload = buffer.getvalue()
    if path.suffix == ".xz":  # worth its compression time only when the file has to travel
        payload = lzma.compress(payload, filters=_XZ_FILTERS)
    atomic_write(path, lambda f: f.write(payload))
    return path


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every entry of a bundle file; any failure to decompress or unzip it is a DataError naming the fix."""
    fix = _BUNDLE_FIX.format(path=path)
    try:
        raw = path.read_bytes()
        if raw.startswith(_XZ_MAGIC):
            raw = lzma.decompress(raw)
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except OSError as exc:
        raise DataError(f"data.bundle {path} cannot be read ({exc}); check its permissions, or {fix}") from exc
    except Exception as exc:  # damaged zip or xz bytes raise many types (BadZipFile, LZMAError, ValueError, ...)
        raise DataError(f"data.bundle {path} is corrupt or truncated ({type(exc).__name__}: {exc}); {fix}") from exc


def _check_bundle(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The bundle's metadata, after its checksum, its arrays' shapes and its label ranges are checked."""
    fix = _BUNDLE_FIX.format(path=path)
    if "meta" not in arrays:
        raise DataError(f"data.bundle {path} has no metadata (no 'meta' entry): it is not a bundle written by har; "
                        f"{fix}")
    if "sha256" not in arrays:
        raise DataError(f"data.bundle {path} has no checksum: an older har wrote it, and its contents cannot be "
                        f"checked; {fix}")
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise DataError(f"data.bundle {path} lacks {', '.join(missing)}; {fix}")
    meta_json = str(arrays["meta"])
    if _bundle_sha256(meta_json, arrays) != str(arrays["sha256"]):
        raise DataError(f"data.bundle {path} is corrupt: its contents do not match its sha256; {fix}")
    meta = json.loads(meta_json)
    num_classes = len(meta["classes"])
    for name in _SPLITS:
        images, labels = arrays[f"{name}_images"], arrays[f"{name}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DataError(f"data.bundle {path}: {name} images are {images.dtype} {images.shape}, expected uint8 "
                            f"N x H x W x 3; {fix}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(images):
            raise DataError(f"data.bundle {path}: {labels.shape} {labels.dtype} {name} labels for {len(images)} "
                            f"images, expected one integer label per image; {fix}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"data.bundle {path}: {name} labels range over [{labels.min()}, {labels.max()}], its "
                            f"{num_classes} classes need [0, {num_classes}); {fix}")
        if meta["sizes"][name] != len(labels):
            raise DataError(f"data.bundle {path}: {len(labels)} {name} images, its metadata says "
                            f"{meta['sizes'][name]}; {fix}")
    return meta


def read_bundle(cfg: DataConfig) -> RunData:
    """Splits from a bundle file, checked (checksum, shapes, labels) and refused unless it was exported for the
    same dataset, ratio and seeds."""
    path = Path(cfg.bundle)
    if path.is_dir():
        raise DataError(f"data.bundle {path} is a folder, not a bundle file; set data.bundle to the file "
                        f"`har export-data` wrote")
    if not path.is_file():
        raise DataError(f"data.bundle {path} does not exist; write it with `har export-data` or unset data.bundle")
    arrays = _read_arrays(path)
    meta = _check_bundle(path, arrays)
    wrong = [f"{k}: bundle {meta[k]!r}, config {getattr(cfg, k)!r}" for k in _BUNDLE_KEYS if meta[k] != getattr(cfg, k)]
    if wrong:
        raise DataError(f"data.bundle {path} was exported for another split ({'; '.join(wrong)}); export it again "
                        f"with this config")
    splits = {name: Split(arrays[f"{name}_images"], arrays[f"{name}_labels"].astype(np.int64, copy=False))
              for name in _SPLITS}
    counts = np.bincount(splits["train"].labels, minlength=len(meta["classes"])).tolist()
    provenance = meta["provenance"] | {"bundle": str(path), "bundle_sha256": str(arrays["sha256"])}
    return RunData(**splits, class_counts=counts, groups=shot_groups(counts), classes=meta["classes"],
                   provenance=provenance)
