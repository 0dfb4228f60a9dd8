"""Write a CIFAR-10 copy whose every training image is a JPEG decode: the probe for the shared copy's JPEG suspect.

The shared copy (../shared/data/README.md) holds 36,947 lossless training images and 13,053 decoded from JPEG
quality-75 copies, and no lossless original of the latter exists here, so "the official files" cannot be rebuilt.
What can be measured is the other direction: this writes the same copy with each lossless training image replaced
by its own JPEG quality-75 decode (Pillow's encoder, 4:2:0 chroma, which gives the README's median RMSE of about
7.6/255), the JPEG-decoded ones and the test set left as they are. Training the same run on both roots (same seed,
same subset: the per-class order is unchanged) shows what going from 26% to 100% JPEG costs; docs/method.md
("The CIFAR copy") has the runs and the reading.

    python benchmarks/cifar_all_jpeg.py --data ../shared/data --out ../jpeg-probe/data
"""

from __future__ import annotations

import argparse
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
FOLDER = "cifar-10-batches-py"


def jpeg_decode(image: np.ndarray, quality: int) -> np.ndarray:
    """An HWC uint8 image after one JPEG round trip at `quality` (Pillow's defaults otherwise)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="folder holding cifar-10-batches-py/ and cifar10_provenance.npz")
    parser.add_argument("--out", type=Path, required=True, help="data root to write (gets cifar-10-batches-py/)")
    parser.add_argument("--quality", type=int, default=75)
    args = parser.parse_args()
    lossless = np.load(args.data / "cifar10_provenance.npz")["train_lossless"]
    source, final = args.data / FOLDER, args.out / FOLDER
    if final.exists():
        raise SystemExit(f"{final} exists; delete it or choose another --out")
    target = args.out / f"{FOLDER}.partial"  # renamed when complete: a killed run leaves no copy that looks whole
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("test_batch", "batches.meta"):
        shutil.copyfile(source / name, target / name)
    start, changed, rmse = 0, 0, []
    for name in TRAIN_FILES:
        with open(source / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        rows = batch["data"]  # N x 3072, R, G, B planes
        images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for i in np.flatnonzero(lossless[start:start + len(rows)]):
            decoded = jpeg_decode(images[i], args.quality)
            rmse.append(np.sqrt(np.mean((decoded.astype(float) - images[i]) ** 2)))
            rows[i] = decoded.transpose(2, 0, 1).reshape(-1)
            changed += 1
        start += len(rows)
        with open(target / name, "wb") as f:
            pickle.dump(batch, f)
    if start != len(lossless):
        raise SystemExit(f"the provenance mask has {len(lossless)} entries, the batches {start} images")
    target.rename(final)
    print(f"{changed} lossless training images replaced by their JPEG q{args.quality} decode "
          f"(median RMSE {np.median(rmse):.2f}/255); {start - changed} were JPEG decodes already; written to {final}")


if __name__ == "__main__":
    main()
