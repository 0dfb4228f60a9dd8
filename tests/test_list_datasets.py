"""ImageNet-LT / iNaturalist 2018 runs end to end on tiny generated image folders and split lists.

The published train lists and the images are not available here: the tests write small lists under the
published file names (so the blob-id check sees non-published lists) and 40 x 40 PNG images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import TINY

from har.config import from_dict
from har.data.batches import train_batches
from har.data.build import build_data
from har.data.imagelist import ImageListDataset
from har.data.loader import ImageBatches
from har.engine.trainer import train
from har.errors import DataError
from har.evaluation.evaluate import evaluate_run
from har.reporting.figures import fig_exit_examples

TRAIN_COUNTS = (10, 5, 3)


def write_dataset(root: Path, dataset: str = "imagenet_lt") -> None:
    """<root>/splits/<published list names> and <root>/<dataset>/<split>/<class>/<n>.png, classes by colour."""
    rng = np.random.default_rng(0)
    names = {"imagenet_lt": {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
                             "test": "ImageNet_LT_test.txt"},
             "inat2018": {"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"}}[dataset]
    (root / "splits").mkdir(parents=True)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]])
    for split, file_name in names.items():
        counts = TRAIN_COUNTS if split == "train" else (2, 2, 2)
        lines = []
        for label, count in enumerate(counts):
            for i in range(count):
                rel = f"{split}/n0{label}/{i}.png"
                noise = rng.integers(-30, 30, (40, 40, 3))
                path = root / dataset / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(colours[label] + noise, 0, 255).astype(np.uint8)).save(path)
                lines.append(f"{rel} {label}\n")
        (root / "splits" / file_name).write_text("".join(lines))


def list_config(root: Path, dataset: str = "imagenet_lt", **model):
    values = {**TINY, "data": {"dataset": dataset, "root": str(root), "strict_lists": False, "image_size": 32,
                               "workers": 0},
              "model": {"name": "resnet50", "layout": "CBEBBBE", **model}}
    values["train"] = {**TINY["train"], "epochs": 2, "batch_size": 6, "lr_batch": 12, "lr_milestones": [1]}
    return from_dict(values)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "data")
    return tmp_path / "data"


def test_lists_build_the_splits_with_a_warning_for_unpublished_lists(image_root, caplog):
    with caplog.at_level(logging.WARNING):
        data = build_data(list_config(image_root).data)
    assert data.class_counts == list(TRAIN_COUNTS) and data.classes == ["n00", "n01", "n02"]
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [18, 6, 6]
    assert data.groups == {"many": [], "medium": [], "few": [0, 1, 2]}
    assert "ImageNet_LT_train.txt is not the published one" in caplog.text


def test_strict_lists_refuse_an_unpublished_list(image_root):
    cfg = from_dict({"data": {"dataset": "imagenet_lt", "root": str(image_root)}})
    with pytest.raises(DataError, match=r"ImageNet_LT_train.txt is not the published one: its git blob id is"):
        build_data(cfg.data)


def test_a_missing_image_is_named_before_training(image_root, tmp_path):
    (image_root / "imagenet_lt" / "val" / "n01" / "1.png").unlink()
    with pytest.raises(DataError, match=r"1 of 6 checked images .* missing .*val/n01/1.png"):
        train(list_config(image_root), tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_train_list_without_some_class_is_refused(image_root):
    path = image_root / "splits" / "ImageNet_LT_train.txt"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.endswith(" 2\n")))
    with pytest.raises(DataError, match=r"no image of class\(es\) \[2\]"):
        build_data(list_config(image_root).data)


def test_inat_uses_its_val_list_as_test_and_says_so(tmp_path, caplog):
    write_dataset(tmp_path / "data", "inat2018")
    with caplog.at_level(logging.WARNING):
        data = build_data(list_config(tmp_path / "data", "inat2018").data)
    assert np.array_equal(data.val.labels, data.test.labels)
    assert "is also the test split" in caplog.text


@pytest.mark.parametrize("name, layout", [("resnet50", "CBEBBBE"), ("densenet169", "CEBBBBE")])
def test_train_and_evaluate_an_imagenet_model_on_image_lists(image_root, tmp_path, name, layout):
    cfg = list_config(image_root, name=name, layout=layout)
    history = train(cfg, tmp_path / name)
    assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)
    assert history[0]["lr"] == pytest.approx(0.1 * 6 / 12)  # linear scaling to the global batch
    report = evaluate_run(tmp_path / name, device="cpu")
    assert report["test"]["num_examples"] == 6 and len(report["test"]["exits"]) == 2
    assert report["test"]["flops"]["image_size"] == [3, 32, 32]
    run = pd.Series({"run_dir": name, "split": "imagenet_lt", "dataset": "imagenet_lt", "method": "har",
                     "display": "HAR", "seed": 0})
    fig = fig_exit_examples(run, tmp_path, {"label": "tiny"}, None)  # Fig. 7 reads the images from the lists
    shown = [image for ax in fig.axes for image in ax.images]
    assert len(shown) == 6 and shown[0].get_array().shape == (32, 32, 3)  # every test image, up to 8 per exit


def tiny_dataset(root: Path) -> ImageListDataset:
    data = build_data(list_config(root).data)
    return ImageListDataset(data.train.entries, data.train.root, train=True, image_size=16)


def test_image_batches_augment_the_same_whatever_the_workers_and_processes(image_root):
    dataset = tiny_dataset(image_root)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))

    def batches(**kwargs):
        loader = ImageBatches(dataset, 6, shuffle=True, device=torch.device("cpu"), **kwargs)
        return list(loader.epoch(torch.Generator(), order))

    one = batches()
    assert not torch.equal(one[0][0][0], ImageListDataset(dataset.split, dataset.root, False, 16)[int(order[0])][0])
    two_workers = batches(workers=2)
    shares = [batches(rank=r, world=2) for r in range(2)]
    resumed = list(ImageBatches(dataset, 6, shuffle=True, device=torch.device("cpu")).epoch(torch.Generator(), order,
                                                                                               start=2))
    for i, (images, labels) in enumerate(one):
        assert torch.equal(images, two_workers[i][0]) and torch.equal(labels, two_workers[i][1])
        assert torch.equal(images, torch.cat([shares[0][i][0], shares[1][i][0]]))
        assert torch.equal(labels, torch.cat([shares[0][i][1], shares[1][i][1]]))
    assert torch.equal(resumed[0][0], one[2][0])


def test_distributed_shares_of_cifar_batches_add_up_to_the_global_batch(tiny_data):
    cfg = from_dict(TINY)
    device = torch.device("cpu")
    whole = list(train_batches(tiny_data.train, cfg.data, 8, device).epoch(torch.Generator().manual_seed(1)))
    halves = [list(train_batches(tiny_data.train, cfg.data, 8, device, rank=r, world=2)
                   .epoch(torch.Generator().manual_seed(1))) for r in range(2)]
    assert len(whole) == len(halves[0]) == 7
    for i, (images, labels) in enumerate(whole):
        assert torch.equal(images, torch.cat([halves[0][i][0], halves[1][i][0]]))
        assert torch.equal(labels, torch.cat([halves[0][i][1], halves[1][i][1]]))
    with pytest.raises(ValueError, match="multiple of 3"):
        train_batches(tiny_data.train, cfg.data, 8, device, rank=0, world=3)
