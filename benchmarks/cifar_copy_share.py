"""How much of a CIFAR-10-LT training split comes from the shared copy's JPEG-decoded images, class by class.

The shared CIFAR-10 copy (../shared/data/README.md) rebuilt 13,053 of the 50,000 training images from JPEG
quality-75 copies; `cifar10_provenance.npz` marks the lossless ones. If the long tail's few images were mostly
JPEG decodes, the copy alone could cost the tail classes accuracy; this prints the share per class of the split
a run trained on, read from its bundle (results/splits/<split>/data.npz), matched to the copy image by image.

    python benchmarks/cifar_copy_share.py --bundle results/splits/cifar10-r100/data.npz --data ../shared/data
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from har.data.cifar import load_cifar


def image_keys(images: np.ndarray) -> list[bytes]:
    """One digest per HWC uint8 image: the copy's images are matched to the bundle's by content."""
    return [hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest() for image in images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a CIFAR-10 split bundle (data.npz)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="folder holding cifar-10-batches-py/ and cifar10_provenance.npz")
    args = parser.parse_args()
    full = load_cifar("cifar10", args.data).train_images  # data_batch_1..5 in order, as the provenance masks are
    lossless = np.load(args.data / "cifar10_provenance.npz")["train_lossless"]
    where = {key: row for row, key in enumerate(image_keys(full))}
    bundle = np.load(args.bundle)
    rows = np.array([where[key] for key in image_keys(bundle["train_images"])])
    jpeg, labels = ~lossless[rows], bundle["train_labels"]
    print("| class | training images | JPEG-decoded |\n| ---: | ---: | ---: |")
    for cls in np.unique(labels):
        mine = labels == cls
        print(f"| {cls} | {mine.sum()} | {100 * jpeg[mine].mean():.1f}% |")
    print(f"| all | {len(labels)} | {100 * jpeg.mean():.1f}% |")


if __name__ == "__main__":
    main()
