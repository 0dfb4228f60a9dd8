"""Tests of the ImageNet-LT / iNaturalist 2018 split lists: reading, identity checks, images, generators."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from har.data.imagelist import (
    ImageListDataset,
    SplitList,
    check_images_exist,
    git_blob_id,
    read_split_list,
    verify_split_list,
    write_split_list,
)
from har.data.imagenet_lt import make_imagenet_lt_split, pareto_class_sizes
from har.data.inat import inat_split_list
from har.errors import DataError
from har.facts import IMAGENET_LT_LISTS, INAT2018_LISTS, PublishedList

SHARED_SPLITS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "splits"


def _write_images(root: Path, names: list[str], size: tuple[int, int] = (8, 8)) -> None:
    """Small random RGB images; the format follows the suffix (PNG or JPEG)."""
    rng = np.random.default_rng(0)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _split(paths: list[str], labels: list[int]) -> SplitList:
    return SplitList(paths, np.asarray(labels, dtype=np.int64), "test list")


def test_read_write_and_blob_id(tmp_path: Path) -> None:
    text = "train/a/x 1.jpg 0\n\ntrain/b/y.jpg 12\n"
    path = tmp_path / "list.txt"
    path.write_text(text)
    split = read_split_list(path)
    assert split.paths == ["train/a/x 1.jpg", "train/b/y.jpg"]
    assert split.labels.dtype == np.int64 and split.labels.tolist() == [0, 12]
    assert split.class_counts(14).tolist() == [1] + [0] * 11 + [1, 0]
    assert git_blob_id(path) == hashlib.sha1(f"blob {len(text)}\0{text}".encode()).hexdigest()
    copy = tmp_path / "sub" / "copy.txt"
    write_split_list(split, copy)
    assert copy.read_text() == "train/a/x 1.jpg 0\ntrain/b/y.jpg 12\n"


@pytest.mark.parametrize("bad_line", ["train/a.jpg", "train/a.jpg -1", "train/a.jpg 1.5", "7"])
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "list.txt"
    path.write_text(f"a.jpg 0\nb.jpg 1\n{bad_line}\n")
    with pytest.raises(DataError, match=r"list\.txt, line 3: .*integer label"):
        read_split_list(path)
    with pytest.raises(DataError, match="not found"):
        read_split_list(tmp_path / "absent.txt")


def test_verify_split_list(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ImageNet_LT_val.txt"
    path.write_text("a.jpg 0\nb.jpg 1\nc.jpg 1")  # no trailing newline: still 3 lines
    right = git_blob_id(path)
    assert verify_split_list(path, right) == right
    wrong = "0" * 40
    with pytest.raises(DataError) as info:
        verify_split_list(path, wrong, strict=True, expected_lines=20_000)
    message = str(info.value)
    for part in (str(path), wrong, right, "(3 lines)", "(20,000 lines)", "published", "strict"):
        assert part in message
    with caplog.at_level(logging.WARNING, logger="har.data.imagelist"):
        assert verify_split_list(path, wrong, strict=False) == right
    assert str(path) in caplog.text and wrong in caplog.text and "anyway" in caplog.text


@pytest.mark.parametrize(
    ("published", "per_class"),
    [(IMAGENET_LT_LISTS["val"], 20), (IMAGENET_LT_LISTS["test"], 50), (INAT2018_LISTS["val"], 3)],
    ids=["imagenet_lt_val", "imagenet_lt_test", "inat2018_val"],
)
def test_shared_published_lists(published: PublishedList, per_class: int) -> None:
    path = SHARED_SPLITS / published.file_name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert verify_split_list(path, published.blob_id) == published.blob_id
    split = read_split_list(path)
    assert len(split) == published.lines == published.num_classes * per_class
    assert split.class_counts().tolist() == [per_class] * published.num_classes


def test_check_images_exist(tmp_path: Path) -> None:
    present = [f"train/c{i}/img{i}.png" for i in range(3)]
    _write_images(tmp_path, present)
    check_images_exist(_split(present, [0, 1, 2]), tmp_path)
    missing = [f"train/c0/gone{i}.png" for i in range(7)]
    split = _split(present + missing, [0] * 10)
    with pytest.raises(DataError) as info:
        check_images_exist(split, tmp_path)
    message = str(info.value)
    assert "7 of 10 checked" in message and "test list" in message and "train/" in message
    assert all(name in message for name in missing[:5]) and missing[5] not in message
    check_images_exist(split, tmp_path, limit=1)  # only the first entry, which exists
    with pytest.raises(DataError, match="1 of 2 checked"):
        check_images_exist(split, tmp_path, limit=2)


@pytest.mark.parametrize("train", [True, False])
def test_dataset_returns_normalised_images(tmp_path: Path, train: bool) -> None:
    names = ["c0/a.png", "c1/b.jpg"]
    _write_images(tmp_path, names, size=(12, 10))
    dataset = ImageListDataset(_split(names, [0, 1]), tmp_path, train=train, image_size=8)
    assert len(dataset) == 2
    for index, label in enumerate([0, 1]):
        image, target = dataset[index]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and target == label
        assert image.min() < 0 < image.max()  # normalised, not in [0, 1]


def test_dataset_reports_bad_images(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    dataset = ImageListDataset(_split(["truncated.jpg", "garbage.jpg", "absent.jpg"], [0, 0, 0]), tmp_path, False, 8)
    for index, (name, problem) in enumerate([("truncated", "corrupt"), ("garbage", "corrupt"), ("absent", "missing")]):
        with pytest.raises(DataError, match=rf"{name}\.jpg.*{problem}"):
            dataset[index]


def test_inat_json_to_list(tmp_path: Path) -> None:
    annotations = {
        "images": [{"id": 7, "file_name": "train_val2018/Plantae/5/a.jpg"},
                   {"id": 3, "file_name": "train_val2018/Aves/2/b.jpg"}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 2}, {"id": 2, "image_id": 7, "category_id": 5}],
    }
    path = tmp_path / "val2018.json"
    path.write_text(json.dumps(annotations))
    split = inat_split_list(path)
    write_split_list(split, tmp_path / "iNaturalist18_val.txt")
    assert (tmp_path / "iNaturalist18_val.txt").read_text() == (
        "train_val2018/Plantae/5/a.jpg 5\ntrain_val2018/Aves/2/b.jpg 2\n"
    )
    path.write_text(json.dumps({**annotations, "annotations": annotations["annotations"][:1]}))
    with pytest.raises(DataError, match=r"1 of 2 images have no label.*test2018"):
        inat_split_list(path)
    path.write_text(json.dumps({"images": annotations["images"]}))
    with pytest.raises(DataError, match=r"val2018\.json is not a COCO-style.*annotations"):
        inat_split_list(path)
    path.write_text("{")
    with pytest.raises(DataError, match="not readable JSON"):
        inat_split_list(path)


def test_pareto_class_sizes() -> None:
    sizes = pareto_class_sizes(1000)
    assert sizes.max() == sizes[0] == 1280 and sizes.min() == sizes[-1] == 5
    assert np.all(np.diff(sizes) <= 0)
    assert sizes.sum() == 104_850
    with pytest.raises(ValueError, match="min_images"):
        pareto_class_sizes(10, min_images=0)


def test_imagenet_lt_style_split(tmp_path: Path) -> None:
    available = [30, 30, 12, 28, 30, 26]
    for c, n in enumerate(available):
        folder = tmp_path / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"n{c:08d}_{i}.JPEG").touch()
        (folder / "notes.txt").touch()  # not an image: never drawn
    kwargs = {"max_images": 20, "min_images": 2, "val_per_class": 3}
    split = make_imagenet_lt_split(tmp_path, seed=1, **kwargs)
    again = make_imagenet_lt_split(tmp_path, seed=1, **kwargs)
    other = make_imagenet_lt_split(tmp_path, seed=2, **kwargs)
    assert split.train.paths == again.train.paths and split.val.paths == again.val.paths
    assert split.train.paths != other.train.paths
    counts = split.train.class_counts(6)
    assert sorted(counts, reverse=True) == pareto_class_sizes(6, max_images=20, min_images=2).tolist()
    assert counts.max() == 20 and counts.min() == 2
    assert np.all(counts + 3 <= np.array(available))  # the 12-image class never gets a size it cannot hold
    assert split.val.class_counts(6).tolist() == [3] * 6
    assert not set(split.train.paths) & set(split.val.paths)
    for part in (split.train, split.val):
        for path, label in zip(part.paths, part.labels.tolist(), strict=True):
            assert path.startswith(f"train/{split.classes[label]}/{split.classes[label]}_")
    check_images_exist(split.train, tmp_path)
    with pytest.raises(DataError, match=r"at least 40 \+ 3 images.*only 0 class folders"):
        make_imagenet_lt_split(tmp_path, max_images=40, min_images=2, val_per_class=3)
