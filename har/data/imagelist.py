"""Split lists ``<relative image path> <integer label>`` (ImageNet-LT, iNaturalist 2018) and a dataset on them.

Published numbers on these benchmarks are only comparable when the very same lists are used, so each list can
be checked against its published git blob id (what ``git hash-object`` prints) before training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from har.atomic import atomic_write_text
from har.errors import DataError
from har.facts import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)



@dataclass(frozen=True, eq=False)
class SplitList:
    """Image paths (relative to an image root) and their int64 labels; ``source`` names it in messages."""

    paths: list[str]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self, num_classes: int | None = None) -> np.ndarray:
        """Images per class, e.g. for :func:`har.data.longtail.shot_groups`."""
        return np.bincount(self.labels, minlength=num_classes or 0)


def read_split_list(path: str | Path) -> SplitList:
    """Read a split list, one ``<path> <label>`` per line (blank lines are skipped; paths may hold spaces).

    Raises:
        DataError: the file is missing or unreadable, or a line is not a path and a non-negative integer.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"split list {path} not found; download the published list or generate one "
                        f"(har.data.inat, har.data.imagenet_lt), and check the path") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"split list {path} cannot be read as UTF-8 text ({exc}); download it again") from exc
    paths: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdigit()):
            raise DataError(f"{path}, line {number}: {line[:200]!r} is not '<relative image path> <integer "
                            f"label>' with a non-negative label; fix or remove the line, or download the list again")
        paths.append(fields[0])
        labels.append(int(fields[1]))
    if not paths:
        raise DataError(f"split list {path} holds no images; download it again or point to the right file")
    return SplitList(paths, np.asarray(labels, dtype=np.int64), str(path))


def write_split_list(split: SplitList, path: str | Path) -> None:
    """Write ``split`` in the list format (one ``<path> <label>`` line each, trailing newline), atomically."""
    lines = (f"{p} {label}\n" for p, label in zip(split.paths, split.labels.tolist(), strict=True))
    atomic_write_text(Path(path), "".join(lines))


def _blob_id_and_lines(path: Path) -> tuple[str, int]:
    """Git blob id and line count in one pass over the file."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    lines, last = 0, b"\n"
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return digest.hexdigest(), lines + (last != b"\n")


def git_blob_id(path: str | Path) -> str:
    """sha1 of ``b"blob <size>\\0" + content``, what ``git hash-object`` prints: the ids lists are published with."""
    return _blob_id_and_lines(Path(path))[0]


def verify_split_list(path: str | Path, expected_id: str, strict: bool = True,
                      expected_lines: int | None = None) -> str:
    """Check a split list against its published git blob id and return the file's id.

    Args:
        path: the list.
        expected_id: its published id, e.g. ``IMAGENET_LT_LISTS["val"].blob_id``.
        strict: a mismatch raises; otherwise it is logged as a warning and the list is used anyway.
        expected_lines: the published line count, reported next to the file's own on a mismatch.

    Raises:
        DataError: the file is missing, or (when ``strict``) its id differs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split list {path} not found; download the published list and check the path")
    actual, lines = _blob_id_and_lines(path)
    if actual == expected_id:
        return actual
    published = expected_id + ("" if expected_lines is None else f" ({expected_lines:,} lines)")
    message = (f"split list {path} is not the published one: its git blob id is {actual} ({lines:,} lines), "
               f"the published list's is {published}. Replace it with the published file for results comparable "
               f"with published numbers")
    if strict:
        raise DataError(message + ", or turn the strict split-list check off to use this list anyway")
    log.warning("%s; using it anyway because the strict check is off", message)
    return actual


def check_images_exist(split: SplitList, image_root: str | Path, limit: int | None = None) -> None:
    """Fail early, before hours of training, when images of the list are missing under ``image_root``.

    Args:
        limit: check only this many entries, spread evenly over the list (a quick check of a large list on a
            slow file system); None checks every entry.

    Raises:
        DataError: naming up to 5 missing images and how many of the checked ones are missing.
    """
    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"image root {root} is not a folder; set it to the folder the paths of {split.source} "
                        f"are relative to")
    indices = range(len(split))
    if limit is not None and limit < len(split):
        indices = np.linspace(0, len(split) - 1, max(limit, 1)).round().astype(int).tolist()
    missing = [split.paths[i] for i in indices if not (root / split.paths[i]).is_file()]
    if missing:
        top = Path(split.paths[0]).parts[0]
        raise DataError(f"{len(missing):,} of {len(indices):,} checked images listed in {split.source} are missing "
                        f"under {root}: {', '.join(str(root / p) for p in missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}; set the image root to the folder that holds "
                        f"{top}/ or download the missing images")


def image_transform(train: bool, image_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> Callable:
    """The standard ImageNet transforms, with ``image_size`` configurable so tests can use tiny images.

    Train: RandomResizedCrop + horizontal flip; eval: resize to ``image_size * 256 / 224`` (256 for 224) and
    centre crop. Both end with ToTensor and normalisation by ``mean`` and ``std`` (ImageNet's by default).
    """
    from torchvision import transforms  # deferred: importing torchvision takes seconds

    if train:
        crop = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        crop = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(mean, std)])


class ImageListDataset(Dataset):
    """Images of a split list under ``image_root`` as (normalised float tensor 3 x S x S, label) pairs."""

    def __init__(self, split: SplitList, image_root: str | Path, train: bool, image_size: int = 224,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.split = split
        self.root = Path(image_root)
        self.transform = image_transform(train, image_size, mean, std)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load(index)), int(self.split.labels[index])

    def load(self, index: int) -> Image.Image:
        """The RGB PIL image of entry ``index``; any decoding problem becomes a DataError naming the file."""
        path = self.root / self.split.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError as exc:
            raise DataError(f"image {path} (listed in {self.split.source}) is missing; check the image root "
                            f"or download the image again") from exc
        except (OSError, SyntaxError, ValueError) as exc:  # PIL reports damaged files with all three
            raise DataError(f"image {path} is corrupt or truncated ({exc}); download or extract it again") from exc
