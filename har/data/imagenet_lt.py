"""ImageNet-LT (Liu et al., 2019, "Large-Scale Long-Tailed Recognition in an Open World"): published split lists
and a generator of ImageNet-LT-style splits for users without them.

:func:`make_imagenet_lt_split` reproduces the *procedure* (class sizes following a Pareto distribution with
alpha = 6, from 1280 down to 5 images), not the published file: its draws are ours, so its lists differ from
``ImageNet_LT_train.txt`` and results on them are not comparable with published numbers. For 1000 classes it
keeps 104,850 images with 350 many-, 492 medium- and 158 few-shot classes (published: 115,846 images,
385 / 479 / 136).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from har.data.imagelist import SplitList
from har.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True, eq=False)
class ImageNetLTSplit:
    """A generated long-tailed training list, a balanced validation list drawn from the images it left out
    (as ImageNet-LT's validation set is), and the class folder names in label order."""

    train: SplitList
    val: SplitList
    classes: list[str]


def pareto_class_sizes(num_classes: int, alpha: float = 6.0, max_images: int = 1280,
                       min_images: int = 5) -> np.ndarray:
    """Decreasing class sizes: the Pareto(alpha) quantiles at (i + 0.5) / num_classes, scaled linearly so the
    largest is ``max_images`` and the smallest ``min_images``, then rounded.

    Quantiles rather than random draws give the same profile for every seed: random draws from such a heavy
    tail would change the total by tens of thousands of images from one seed to the next.

    Raises:
        ValueError: fewer than 2 classes, ``alpha`` <= 0 or not 1 <= ``min_images`` <= ``max_images``.
    """
    if num_classes < 2:
        raise ValueError(f"a long-tailed profile needs at least 2 classes, got {num_classes}")
    if alpha <= 0:
        raise ValueError(f"the Pareto exponent alpha must be > 0 (ImageNet-LT uses 6), got {alpha}")
    if not 1 <= min_images <= max_images:
        raise ValueError(f"need 1 <= min_images <= max_images (ImageNet-LT: 5 and 1280), got {min_images} and "
                         f"{max_images}")
    upper_tail = 1 - (np.arange(num_classes) + 0.5) / num_classes
    quantiles = upper_tail[::-1] ** (-1 / alpha)  # largest first
    scaled = (quantiles - quantiles[-1]) / (quantiles[0] - quantiles[-1])
    return np.round(min_images + scaled * (max_images - min_images)).astype(np.int64)


def make_imagenet_lt_split(image_root: str | Path, train_dir: str = "train", seed: int = 0, alpha: float = 6.0,
                           max_images: int = 1280, min_images: int = 5,
                           val_per_class: int = 20) -> ImageNetLTSplit:
    """Cut an ImageNet-LT-style split from a full ImageNet training folder by Liu et al.'s Pareto procedure.

    Classes are the sorted subfolders of ``image_root / train_dir`` (label = index, as in ImageNet-LT). The
    sizes of :func:`pareto_class_sizes` go to classes in a seeded random order, each to the next class with
    enough images for it and ``val_per_class`` more; each class then draws its training and validation images
    at random (seeded) from its sorted file names. Paths are relative to ``image_root``, like the published ones.

    Raises:
        DataError: the folder has no class subfolders, or too few classes have enough images for the sizes.
        ValueError: bad size arguments.
    """
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0 (ImageNet-LT: 20), got {val_per_class}")
    root = Path(image_root)
    folder = root / train_dir
    if not folder.is_dir():
        raise DataError(f"ImageNet training folder {folder} not found; pass the ImageNet root that holds "
                        f"{train_dir}/ with one subfolder per class")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if len(classes) < 2:
        raise DataError(f"{folder} holds {len(classes)} class subfolders, need at least 2: pass the folder with "
                        f"one subfolder of images per class (n01440764/, ...)")
    files = [sorted(f.name for f in (folder / c).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
             for c in classes]
    rng = np.random.default_rng(seed)
    sizes = _assign_sizes(pareto_class_sizes(len(classes), alpha, max_images, min_images),
                          [len(f) for f in files], val_per_class, rng, folder)
    train: tuple[list[str], list[int]] = ([], [])
    val: tuple[list[str], list[int]] = ([], [])
    for label, (name, names) in enumerate(zip(classes, files, strict=True)):
        order = rng.permutation(len(names))
        size = sizes[label]
        for part, chosen in ((train, order[:size]), (val, order[size:size + val_per_class])):
            part[0].extend(f"{train_dir}/{name}/{names[i]}" for i in sorted(chosen))
            part[1].extend([label] * len(chosen))
    source = f"ImageNet-LT-style split of {folder} (seed {seed})"
    return ImageNetLTSplit(SplitList(train[0], np.asarray(train[1], dtype=np.int64), source + ", train"),
                           SplitList(val[0], np.asarray(val[1], dtype=np.int64), source + ", val"), classes)


def _assign_sizes(sizes: np.ndarray, available: list[int], val_per_class: int, rng: np.random.Generator,
                  folder: Path) -> np.ndarray:
    """Class -> size: largest sizes first, each to the next class of a seeded order that has enough images."""
    waiting = rng.permutation(len(available)).tolist()
    assigned = np.zeros(len(available), dtype=np.int64)
    for size in sizes:
        fits = next((c for c in waiting if available[c] >= size + val_per_class), None)
        if fits is None:
            enough = sum(n >= size + val_per_class for n in available)
            raise DataError(f"{folder}: {int((sizes >= size).sum())} classes need at least {size} + {val_per_class} "
                            f"images, but only {enough} class folders have that many; use the full ImageNet "
                            f"training set or lower max_images / val_per_class")
        waiting.remove(fits)
        assigned[fits] = size
    return assigned
