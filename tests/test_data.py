"""Tests of har.data: CIFAR loading and checks, LDAM-DRW long-tailed splits, batch augmentation, batching."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from har.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    BatchAugment,
    DataError,
    TensorBatches,
    load_cifar,
    longtail_counts,
    make_longtail_split,
    normalize,
    resolve_data_root,
    shot_groups,
    subsample_per_class,
)

LT_TOTALS = {
    "cifar10": {100: 12406, 50: 13996, 10: 20431},
    "cifar100": {100: 10847, 50: 12608, 10: 19573},
}
CIFAR10_LT100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _shared_root() -> Path | None:
    """HAR_DATA first, then the shared folder next to the repository; None when CIFAR-10 is in neither."""
    candidates = [Path(os.environ["HAR_DATA"])] if os.environ.get("HAR_DATA") else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    return next((c for c in candidates if (c / "cifar-10-batches-py").is_dir()), None)


SHARED = _shared_root()
needs_cifar10 = pytest.mark.skipif(SHARED is None,
                                   reason="CIFAR-10 not found under $HAR_DATA or ../shared/data")


@pytest.fixture(scope="module")
def cifar10():
    """The shared CIFAR-10, read once (it takes seconds), with the messages its loading logged."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("har.data.cifar")
    logger.addHandler(handler)
    try:
        arrays = load_cifar("cifar10", SHARED)
    finally:
        logger.removeHandler(handler)
    return arrays, [r.getMessage() for r in records if r.levelno == logging.WARNING]


def _shuffled_balanced(num_classes: int, per_class: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _write_cifar100(root: Path, n_train: int = 300, n_test: int = 200) -> Path:
    """Small CIFAR-100 files in the release layout; the train file uses bytes keys, as some pickles do."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                 "coarse_labels": (fine // 5).tolist()}
        if name == "train":
            batch = {k.encode(): v for k, v in batch.items()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return folder


def _rewrite(path: Path, **changes) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    path.write_bytes(pickle.dumps({**batch, **changes}))


# ---- long-tailed profiles and splits ----

def test_longtail_counts_match_ldam_drw():
    assert longtail_counts(5000, 10, 100) == CIFAR10_LT100
    assert longtail_counts(500, 100, 1) == [500] * 100
    with pytest.raises(ValueError, match="ratio"):
        longtail_counts(5000, 10, 0.5)


@pytest.mark.parametrize("name, num_classes, per_class", [("cifar10", 10, 5000), ("cifar100", 100, 500)])
@pytest.mark.parametrize("ratio", [100, 50, 10])
def test_longtail_totals_on_synthetic_labels(name, num_classes, per_class, ratio):
    labels = _shuffled_balanced(num_classes, per_class)
    split = make_longtail_split(labels, num_classes, ratio)
    assert sum(split.class_counts) == len(split.train_indices) == LT_TOTALS[name][ratio]
    assert np.bincount(labels[split.train_indices], minlength=num_classes).tolist() == split.class_counts


def test_split_matches_ldam_drw_global_seed_procedure():
    labels = _shuffled_balanced(10, 300)
    state = np.random.get_state()
    try:  # LDAM-DRW: np.random.seed(0), then one global shuffle per class
        np.random.seed(0)
        expected = []
        for c, n in enumerate(longtail_counts(300, 10, 100)):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            expected.append(idx[:n])
    finally:
        np.random.set_state(state)
    split = make_longtail_split(labels, 10, 100, seed=0)
    np.testing.assert_array_equal(split.train_indices, np.concatenate(expected))


def test_split_validation_is_disjoint_and_balanced_except_head(caplog):
    labels = _shuffled_balanced(10, 5000)
    with caplog.at_level(logging.WARNING, logger="har.data.longtail"):
        split = make_longtail_split(labels, 10, 100, val_per_class=50)
    assert "classes [0]" in caplog.text
    assert not set(split.train_indices) & set(split.val_indices)
    assert split.val_counts == [0] + [50] * 9
    assert np.bincount(labels[split.val_indices], minlength=10).tolist() == split.val_counts
    assert np.all(np.diff(labels[split.train_indices]) >= 0)  # grouped by class, in class order
    assert split.train_indices.dtype == split.val_indices.dtype == np.int64
    assert (split.ratio, split.seed) == (100.0, 0)


def test_split_rejects_unbalanced_labels():
    with pytest.raises(ValueError, match="balanced"):
        make_longtail_split(np.array([0, 0, 1]), 2, 10)


def test_shot_groups_cifar10_lt100():
    assert shot_groups(CIFAR10_LT100) == {"many": list(range(8)), "medium": [8, 9], "few": []}
    groups = shot_groups(longtail_counts(500, 100, 100))
    assert [len(groups[k]) for k in ("many", "medium", "few")] == [35, 35, 30]


def test_subsample_keeps_profile_and_order():
    labels = _shuffled_balanced(10, 5000)
    indices = make_longtail_split(labels, 10, 100).train_indices
    kept = subsample_per_class(indices, labels, 0.1)
    assert np.bincount(labels[kept], minlength=10).tolist() == [500, 300, 180, 108, 65, 39, 24, 14, 9, 5]
    np.testing.assert_array_equal(kept, indices[np.isin(indices, kept)])  # a subsequence: order kept
    assert np.bincount(labels[subsample_per_class(indices, labels, 1e-4)], minlength=10).tolist() == [1] * 10
    assert len(subsample_per_class(np.arange(10), np.zeros(10, dtype=int), 0.7)) == 7
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subsample_per_class(indices, labels, bad)


# ---- CIFAR files ----

def test_resolve_data_root(monkeypatch):
    monkeypatch.setenv("HAR_DATA", "/from/env")
    assert resolve_data_root("/explicit") == Path("/explicit")
    assert resolve_data_root(None) == Path("/from/env")
    monkeypatch.delenv("HAR_DATA")
    assert resolve_data_root(None) == Path("data")


@needs_cifar10
def test_cifar10_shared_copy_loads_with_checksum_warning(cifar10):
    arrays, warnings = cifar10
    assert len(warnings) == 1 and "results may differ slightly" in warnings[0]
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert name in warnings[0]
    assert arrays.train_images.shape == (50000, 32, 32, 3) and arrays.train_images.dtype == np.uint8
    assert arrays.test_images.shape == (10000, 32, 32, 3)
    assert arrays.train_labels.dtype == arrays.test_labels.dtype == np.int64
    assert arrays.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert arrays.num_classes == 10 and arrays.classes[:2] == ["airplane", "automobile"]
    provenance = arrays.provenance
    assert not provenance["official"] and provenance["label"].startswith("CIFAR-10 copy at ")
    assert set(provenance["files"]) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    assert "data_batch_1" in provenance["differing"] and "md5 differs" in provenance["label"]
    # the published per-channel test mean checks that the R,G,B planes became HWC correctly
    np.testing.assert_allclose(arrays.test_images.reshape(-1, 3).mean(0) / 255, [0.4942, 0.4851, 0.4504],
                               atol=1e-4)


@needs_cifar10
def test_cifar10_lt_splits_on_shared_labels(cifar10):
    labels = cifar10[0].train_labels
    for ratio, total in LT_TOTALS["cifar10"].items():
        split = make_longtail_split(labels, 10, ratio)
        assert len(split.train_indices) == total
    split = make_longtail_split(labels, 10, 100)
    assert split.class_counts == CIFAR10_LT100
    assert split.val_counts == [0] + [50] * 9
    assert np.bincount(labels[split.train_indices], minlength=10).tolist() == CIFAR10_LT100


def test_cifar100_fake_files_load(tmp_path, caplog):
    folder = _write_cifar100(tmp_path)
    with caplog.at_level(logging.WARNING, logger="har.data.cifar"):
        arrays = load_cifar("cifar100", tmp_path, expect_official_sizes=False)
    assert caplog.text.count("differ from the official release") == 1
    assert "train, test, meta differ" in caplog.text
    assert arrays.train_images.shape == (300, 32, 32, 3) and arrays.test_images.shape == (200, 32, 32, 3)
    assert arrays.num_classes == 100 and arrays.classes[5] == "c5"
    np.testing.assert_array_equal(arrays.train_labels, np.arange(300) % 100)
    raw = pickle.loads((folder / "train").read_bytes())[b"data"]
    # pixel (y=2, x=7) of channel c sits at column c * 1024 + 2 * 32 + 7 of the release's rows
    np.testing.assert_array_equal(arrays.train_images[4, 2, 7], raw[4, [71, 1024 + 71, 2048 + 71]])


def test_provenance_is_official_only_when_every_md5_is_the_releases(tmp_path, monkeypatch):
    from har.data import cifar

    folder = _write_cifar100(tmp_path)
    copy = load_cifar("cifar100", tmp_path, expect_official_sizes=False).provenance
    assert not copy["official"] and copy["differing"] == ["train", "test", "meta"]
    assert copy["label"] == f"CIFAR-100 copy at {folder} (md5 differs from the official release: train, test, meta)"
    monkeypatch.setattr(cifar._Spec, "files", lambda self: copy["files"])  # as if these were the release's
    official = load_cifar("cifar100", tmp_path, expect_official_sizes=False).provenance
    assert official["official"] and official["label"] == "official CIFAR-100" and official["differing"] == []


def test_md5_is_computed_once_per_file_version(tmp_path, monkeypatch):
    from har.data import cifar

    calls = []
    real = cifar.file_hexdigest
    monkeypatch.setattr(cifar, "file_hexdigest", lambda *args: calls.append(1) or real(*args))
    path = tmp_path / "f"
    path.write_bytes(b"one")
    first = cifar._md5(path)
    assert cifar._md5(path) == first and len(calls) == 1
    path.write_bytes(b"other")  # new size (and mtime): hashed again
    assert cifar._md5(path) != first and len(calls) == 2


def test_small_files_refused_when_official_sizes_expected(tmp_path):
    _write_cifar100(tmp_path)
    with pytest.raises(DataError, match="official file holds 50000"):
        load_cifar("cifar100", tmp_path)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match="HAR_DATA") as err:
        load_cifar("cifar10", tmp_path)
    assert "data_batch_1" in str(err.value) and "data.download: true" in str(err.value)


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(DataError, match="cifar10, cifar100"):
        load_cifar("mnist", tmp_path)


def test_truncated_pickle_names_the_file(tmp_path):
    folder = _write_cifar100(tmp_path)
    path = folder / "train"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt") as err:
        load_cifar("cifar100", tmp_path, expect_official_sizes=False)
    assert str(path) in str(err.value)


def test_labels_out_of_range(tmp_path):
    folder = _write_cifar100(tmp_path)
    labels = (np.arange(200) % 100).tolist()
    labels[7] = 100
    _rewrite(folder / "test", fine_labels=labels)
    with pytest.raises(DataError, match=r"test: labels range over \[0, 100\], CIFAR-100 needs \[0, 100\)"):
        load_cifar("cifar100", tmp_path, expect_official_sizes=False)


def test_label_count_must_match_images(tmp_path):
    folder = _write_cifar100(tmp_path)
    _rewrite(folder / "test", fine_labels=[0] * 10)
    with pytest.raises(DataError, match="10 'fine_labels' entries"):
        load_cifar("cifar100", tmp_path, expect_official_sizes=False)


# ---- augmentation and batching ----

def test_batch_augment_shape_and_identity_without_randomness():
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    out = BatchAugment(CIFAR_MEAN, CIFAR_STD)(images, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    plain = BatchAugment(CIFAR_MEAN, CIFAR_STD, crop_padding=0, flip=False)(images, torch.Generator())
    torch.testing.assert_close(plain, normalize(images, CIFAR_MEAN, CIFAR_STD), rtol=0, atol=0)
    expected = (images[1, 3, 5, 2] / 255 - CIFAR_MEAN[2]) / CIFAR_STD[2]
    torch.testing.assert_close(plain[1, 2, 3, 5], expected.float())


def test_batch_augment_offsets_uniform_and_flips_half():
    """A marked pixel's place in each output reveals the crop offset and the flip.

    On 20 x 20 images with the mark at (8, 4), an unflipped mark lands in columns 0..8 and a flipped one in
    11..19; padding is zero while the image is 100, so the count of zeros checks the crop geometry too.
    """
    n, size, pad = 16200, 20, 4
    images = torch.full((n, size, size, 3), 100, dtype=torch.uint8)
    images[:, 8, 4] = 255
    out = BatchAugment((0, 0, 0), (1, 1, 1), crop_padding=pad)(images, torch.Generator().manual_seed(0))[:, 0]
    flat = out.reshape(n, -1).argmax(1)
    row, col = flat // size, flat % size
    flipped = col > 10
    dy = 8 + pad - row
    dx = torch.where(flipped, col - (size - 1 - 4 - pad), 4 + pad - col)
    assert abs(flipped.float().mean().item() - 0.5) < 0.03
    freq = torch.bincount(dy * (2 * pad + 1) + dx, minlength=81)
    assert len(freq) == 81 and freq.min() > 120 and freq.max() < 280  # expected 200 each
    zeros = (out == 0).sum((1, 2))
    expected = size * size - (size - (dy - pad).abs()) * (size - (dx - pad).abs())
    torch.testing.assert_close(zeros, expected)


def test_tensor_batches_cover_each_example_once_and_are_deterministic():
    images = torch.randint(0, 256, (103, 8, 8, 3), dtype=torch.uint8)
    labels = torch.arange(103)
    batches = TensorBatches(images, labels, 10, shuffle=True, augment=BatchAugment(CIFAR_MEAN, CIFAR_STD),
                            mean=CIFAR_MEAN, std=CIFAR_STD)
    assert len(batches) == 11
    first = list(batches.epoch(torch.Generator().manual_seed(3)))
    assert len(first) == 11 and first[0][0].shape == (10, 3, 8, 8)
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(103))
    again = list(batches.epoch(torch.Generator().manual_seed(3)))
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = list(batches.epoch(torch.Generator().manual_seed(4)))
    assert not torch.equal(first[0][1], other[0][1])


def test_tensor_batches_in_order_without_augment_and_drop_last():
    images = torch.randint(0, 256, (25, 4, 4, 3), dtype=torch.uint8)
    batches = TensorBatches(images, torch.arange(25), 10, shuffle=False, augment=None, mean=CIFAR_MEAN,
                            std=CIFAR_STD, drop_last=True)
    out = list(batches.epoch(torch.Generator()))
    assert len(batches) == len(out) == 2
    assert torch.cat([y for _, y in out]).tolist() == list(range(20))
    torch.testing.assert_close(out[1][0], normalize(images[10:20], CIFAR_MEAN, CIFAR_STD))
