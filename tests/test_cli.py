"""The command line as users type it: clear errors with exit status 2, JSON tables, a real short CIFAR run."""

import json

import pytest
from conftest import shared_cifar_root

from har.cli import main


def test_flops_prints_the_cost_table(capsys):
    assert main(["flops", "--model", "resnet32", "--num-classes", "10"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["backbone_macs"] == 68_862_592 and table["backbone_params"] == 464_154
    assert [e["position"] for e in table["exits"]][0] == "after stem" and len(table["exits"]) == 4


@pytest.mark.parametrize("yaml_text, message", [
    ("loss:\n  name: hinge\n", "loss.name: 'hinge' is not allowed; choose one of ['ce', 'focal', 'ldam']"),
    ("train:\n  epochs: -3\n", "train.epochs: -3 is out of range; it must be >= 1"),
    ("model:\n  layout: CBBE\n", "Layout 'CBBE' has 2 'B's but the backbone has 3 block groups"),
])
def test_bad_config_stops_before_training_with_the_reason(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--set", "data.root=/nowhere",
                 "--set", "data.download=false"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_data_names_the_files_and_the_fix(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'empty'}",
                 "--set", "data.download=false"]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "HAR_DATA" in err


@pytest.mark.skipif(shared_cifar_root() is None, reason="needs the CIFAR-10 copy in ../shared/data or HAR_DATA")
def test_short_real_cifar10_lt_run_trains_and_evaluates(tmp_path, capsys):
    """CIFAR-10-LT (imbalance 100), HAR(CE)+DRW, 5% of each class, 2 epochs: the whole path on real images."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--set", f"data.root={shared_cifar_root()}",
                 "--set", "data.train_fraction=0.05", "--set", "data.eval_fraction=0.05", "--set", "train.epochs=2",
                 "--set", "train.warmup_epochs=1", "--set", "loss.reweight=drw", "--set", "loss.drw_epoch=1",
                 "--set", "train.device=cpu"]) == 0
    printed = capsys.readouterr().out
    print(printed)  # the metrics, for the log
    assert "[test] 500 images" in printed and "static  top-1" in printed
    test = json.loads((out / "eval" / "test.json").read_text())
    assert test["class_counts"] == [250, 150, 90, 54, 33, 20, 12, 7, 5, 3]  # 5% of 5000, 2997, ...
    assert test["groups"] == {"many": [0, 1, 2, 3, 4, 5, 6, 7], "medium": [8, 9], "few": []}
    assert test["static"]["shot"]["few"] is None
    assert 0.0 <= test["static"]["top1"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reweighted"] for r in rows] == [False, True]


def test_list_generators_write_the_lists_a_run_reads(tmp_path, capsys):
    from PIL import Image

    annotations = {"images": [{"id": 1, "file_name": "train_val2018/Aves/3/a.jpg"},
                              {"id": 2, "file_name": "train_val2018/Aves/5/b.jpg"}],
                   "annotations": [{"image_id": 1, "category_id": 3}, {"image_id": 2, "category_id": 5}]}
    (tmp_path / "train2018.json").write_text(json.dumps(annotations))
    assert main(["inat-list", "--annotations", str(tmp_path / "train2018.json"),
                 "--out", str(tmp_path / "lists" / "iNaturalist18_train.txt")]) == 0
    assert (tmp_path / "lists" / "iNaturalist18_train.txt").read_text() == ("train_val2018/Aves/3/a.jpg 3\n"
                                                                            "train_val2018/Aves/5/b.jpg 5\n")
    for c in range(3):
        for i in range(30):
            path = tmp_path / "imagenet" / "train" / f"n0{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(path)
    assert main(["imagenet-lt-split", "--imagenet", str(tmp_path / "imagenet"), "--out", str(tmp_path / "lt"),
                 "--max-images", "20", "--min-images", "2", "--val-per-class", "5"]) == 0
    train = (tmp_path / "lt" / "ImageNet_LT_train.txt").read_text().splitlines()
    val = (tmp_path / "lt" / "ImageNet_LT_val.txt").read_text().splitlines()
    assert len(val) == 3 * 5 and 22 <= len(train) <= 30 and all(line.startswith("train/n0") for line in train + val)
    assert "not the published lists" in capsys.readouterr().out
