"""Training, resume and evaluation of whole runs on tiny synthetic data (a few seconds each)."""

import json

import numpy as np
import pytest
import torch

import har.engine.loop as loop_module
from har.config import from_dict
from har.engine.trainer import train
from har.errors import RunError
from har.evaluation.evaluate import evaluate_run
from har.run.prepare import prepare_run_dir

TINY = {"data": {"dataset": "cifar10"}, "train": {"epochs": 3, "batch_size": 16, "warmup_epochs": 1,
                                                  "lr_milestones": [2], "lr_decay": 0.1, "device": "cpu"},
        "loss": {"name": "ce", "reweight": "drw", "drw_epoch": 2, "train_threshold": 0.5},
        "eval": {"exit_thresholds": [0.0, 0.5, 0.9, 1.01], "target_savings": [0.2]}}


def tiny_config(**sections):
    values = json.loads(json.dumps(TINY))
    for section, fields in sections.items():
        values.setdefault(section, {}).update(fields)
    return from_dict(values)


def test_a_run_writes_config_metrics_checkpoint_and_records_exits(tmp_path, tiny_data):
    history = train(tiny_config(), tmp_path / "run", data=tiny_data)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert [r["reweighted"] for r in history] == [False, False, True]  # DRW from epoch 2
    assert [r["lr"] for r in history] == pytest.approx([0.1, 0.1, 0.01])
    for row in history:
        assert len(row["exit_fraction"]) == 4 and sum(row["exit_fraction"]) == pytest.approx(1.0)
        assert np.isfinite(row["loss"])
    counts = np.bincount(tiny_data.train.labels)  # every image trains once an epoch (no batch is dropped)
    for row in history:  # each class's share right, weighted by its images, is the epoch's top-1
        assert len(row["train_top1_per_class"]) == len(counts)
        assert np.dot(counts, row["train_top1_per_class"]) / counts.sum() == pytest.approx(row["train_top1"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[-1])["train_top1_per_class"] == history[-1]["train_top1_per_class"]
    fewer = train(tiny_config(train={"epochs": 1, "record_per_class_up_to": len(counts) - 1}), tmp_path / "few",
                  data=tiny_data)
    assert "train_top1_per_class" not in fewer[0]  # more classes than train.record_per_class_up_to
    for name in ("config.yaml", "config.sha256", "last.pt"):
        assert (tmp_path / "run" / name).exists()
    assert not list((tmp_path / "run").glob("*.tmp"))


def interrupt_in_epoch(epoch, monkeypatch):
    """Make training die inside `epoch` (0-based), as a killed job would; return the undo."""
    real_epoch = loop_module.train_epoch

    def dies(group, batches, data, current, *rest):
        if current == epoch:
            raise KeyboardInterrupt
        return real_epoch(group, batches, data, current, *rest)

    monkeypatch.setattr(loop_module, "train_epoch", dies)
    return lambda: monkeypatch.setattr(loop_module, "train_epoch", real_epoch)


def without_time(line):
    return {k: v for k, v in json.loads(line).items() if k != "seconds"}


def test_a_run_leaves_torch_deterministic_setting_as_it_found_it(tmp_path, tiny_data):
    """`train.deterministic` switches torch to deterministic algorithms while the CPU run trains, then back."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    assert tiny_config().train.deterministic
    train(tiny_config(train={"epochs": 1}), tmp_path / "run", data=tiny_data)
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
        == before == (False, False)


def test_resume_after_interruption_gives_the_same_weights(tmp_path, tiny_data, monkeypatch):
    """... and keeps the same snapshot of the epoch `train.keep_epochs` names."""
    cfg = tiny_config(train={"keep_epochs": [2]})
    train(cfg, tmp_path / "straight", data=tiny_data)

    undo = interrupt_in_epoch(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", data=tiny_data)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["epoch"] == 1
    undo()
    history = train(cfg, tmp_path / "resumed", data=tiny_data)
    assert [r["epoch"] for r in history] == [0, 1, 2]

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [without_time(r) for r in straight] == [without_time(r) for r in resumed]

    for run in ("straight", "resumed"):  # the checkpoint after epoch 2 of 3: the one `prev.pt` holds at the end
        assert [p.name for p in (tmp_path / run / "snapshots").iterdir()] == ["epoch2.pt"]
    kept = torch.load(tmp_path / "straight" / "snapshots" / "epoch2.pt", weights_only=False)
    again = torch.load(tmp_path / "resumed" / "snapshots" / "epoch2.pt", weights_only=False)
    previous = torch.load(tmp_path / "straight" / "prev.pt", weights_only=False)
    assert kept["epoch"] == previous["epoch"] == 1 and kept["partial"] is None
    for key in kept["model"]:
        assert torch.equal(kept["model"][key], previous["model"][key]), key
        assert torch.equal(kept["model"][key], again["model"][key]), key


def test_a_snapshot_half_written_by_a_killed_job_is_removed_when_the_run_starts_again(tmp_path):
    snapshots = tmp_path / "run" / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / ".epoch2.pt.x1y2.tmp").write_bytes(b"half")
    (snapshots / "epoch1.pt").write_bytes(b"whole")
    prepare_run_dir(tiny_config(train={"keep_epochs": [1, 2]}), tmp_path / "run")
    assert [p.name for p in snapshots.iterdir()] == ["epoch1.pt"]


@pytest.mark.parametrize("record_from, recorded", [(None, [2]), (-1, []), (1, [1, 2])])
def test_test_top1_is_recorded_from_the_first_lr_milestone(tmp_path, tiny_data, record_from, recorded):
    """LDAM-DRW's protocol needs test top-1 per epoch after the decay; None means the first milestone (epoch 2)."""
    history = train(tiny_config(eval={"record_test_from": record_from}), tmp_path / "run", data=tiny_data)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "test_top1" in r] == [r["epoch"] for r in history if "test_top1" in r]
    assert [r["epoch"] for r in rows if "test_top1" in r] == recorded
    assert all(0 <= r["test_top1"] <= 1 for r in rows if "test_top1" in r)
    if recorded:
        final = evaluate_run(tmp_path / "run", device="cpu", data=tiny_data)["test"]["static"]["top1"]
        assert rows[-1]["test_top1"] == pytest.approx(final)  # the same static test top-1 as the evaluation



def test_list_datasets_record_no_test_top1_unless_asked():
    """ImageNet-LT / iNaturalist rows do not follow LDAM-DRW's best-epoch protocol, and a 50,000-image test pass
    per epoch would cost GPU time: by default they record nothing; CIFAR records from the first milestone."""
    from har.config import from_dict
    from har.engine.run_state import records_test

    schedule = {"epochs": 100, "lr_milestones": [60, 80]}
    cifar = from_dict({"train": schedule})
    inet = from_dict({"data": {"dataset": "imagenet_lt"}, "model": {"name": "resnet50"}, "train": schedule})
    asked = from_dict({"data": {"dataset": "imagenet_lt"}, "model": {"name": "resnet50"}, "train": schedule,
                       "eval": {"record_test_from": 90}})
    assert [records_test(cifar, e) for e in (59, 60, 99)] == [False, True, True]
    assert not any(records_test(inet, e) for e in range(100))
    assert [records_test(asked, e) for e in (89, 90)] == [False, True]

def test_a_folder_of_another_config_is_refused_with_the_difference(tmp_path, tiny_data):
    train(tiny_config(train={"epochs": 1}), tmp_path / "run", data=tiny_data)
    with pytest.raises(RunError, match=r"another config.*\n  loss.name: 'ce' -> 'focal'"):
        train(tiny_config(train={"epochs": 1}, loss={"name": "focal"}), tmp_path / "run", data=tiny_data)


def test_a_folder_of_an_older_har_resumes_and_evaluates(tmp_path, tiny_data, monkeypatch):
    """Stored hashes of another hashing rule, and stored configs without a field added since (at its default):
    the folder is still the same run, because hashes are recomputed from the stored configs."""
    import yaml

    cfg = tiny_config()
    interrupt_in_epoch(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", data=tiny_data)
    run = tmp_path / "run"
    old_config = yaml.safe_load((run / "config.yaml").read_text())
    del old_config["train"]["mixup"]  # as if written before train.mixup existed
    (run / "config.yaml").write_text(yaml.safe_dump(old_config))
    (run / "config.sha256").write_text("0" * 64 + "\n")
    ckpt = torch.load(run / "last.pt", weights_only=False)
    ckpt.update(config_sha256="0" * 64, config=old_config)
    torch.save(ckpt, run / "last.pt")
    monkeypatch.undo()  # no more interruptions
    history = train(cfg, run, data=tiny_data)
    assert [r["epoch"] for r in history] == [0, 1, 2]  # resumed after epoch 0
    evaluate_run(run, device="cpu", data=tiny_data)


def test_an_unreadable_folder_config_is_reported(tmp_path, tiny_data):
    train(tiny_config(train={"epochs": 1}), tmp_path / "run", data=tiny_data)
    (tmp_path / "run" / "config.yaml").write_text("train: [1, 2\n")
    with pytest.raises(RunError, match="config.yaml is unreadable"):
        train(tiny_config(train={"epochs": 1}), tmp_path / "run", data=tiny_data)
    (tmp_path / "run" / "config.yaml").write_text("just a string\n")
    with pytest.raises(RunError, match="not a valid config for this version"):
        train(tiny_config(train={"epochs": 1}), tmp_path / "run", data=tiny_data)


def test_corrupt_checkpoint_is_reported(tmp_path, tiny_data):
    train(tiny_config(train={"epochs": 1}), tmp_path / "run", data=tiny_data)
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(RunError, match="unreadable"):
        train(tiny_config(train={"epochs": 1}), tmp_path / "run", data=tiny_data)


@pytest.mark.parametrize("loss", ["ce", "focal", "ldam"])
def test_every_loss_trains_and_evaluates(tmp_path, tiny_data, loss):
    threshold = 0.4 if loss == "ldam" else 0.5
    cfg = tiny_config(loss={"name": loss, "train_threshold": threshold}, train={"epochs": 2})
    train(cfg, tmp_path / loss, data=tiny_data)
    reports = evaluate_run(tmp_path / loss, device="cpu", data=tiny_data)
    test = reports["test"]
    assert test["split"] == "test" and test["num_examples"] == 18
    assert 0 <= test["static"]["top1"] <= 1
    assert test["static"]["macs"] == test["flops"]["backbone_macs"]
    sweep = test["dynamic_sweep"]
    assert [r["exit_threshold"] for r in sweep] == [0.0, 0.5, 0.9, 1.01]
    assert sweep[0]["per_exit"][0]["fraction"] == 1.0  # s = 0: everyone leaves at the first exit
    last = sweep[-1]
    assert last["per_exit"][-1]["fraction"] == 1.0 and last["top1"] == test["static"]["top1"]
    heads = sum(e["head_macs"] for e in test["flops"]["exits"][:-1])
    assert last["saving"] == pytest.approx(-heads / test["flops"]["backbone_macs"])
    assert last["saving_trunk"] == pytest.approx(0.0, abs=1e-12)  # heads not counted: all at the last exit save 0
    chosen = {"best", "saving>=0.2", "saving_trunk>=0.2"}
    assert set(test["exit_thresholds_chosen"]) == set(reports["val"]["exit_thresholds_chosen"]) == chosen
    assert test["selection_protocol"] == "crossfit-test-halves" and sum(test["halves"]["sizes"]) == 18
    cached = np.load(tmp_path / loss / "eval" / "test.npz")
    assert cached["logits"].shape == (4, 18, 3)
    if loss == "ldam":  # cosine classifiers: raw outputs are cosines
        assert np.abs(cached["logits"]).max() <= 1 + 1e-5


def test_evaluating_an_unfinished_run_is_refused(tmp_path, tiny_data, monkeypatch):
    cfg = tiny_config()
    interrupt_in_epoch(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", data=tiny_data)
    with pytest.raises(RunError, match="incomplete: 1 of 3 epochs"):
        evaluate_run(tmp_path / "run", device="cpu", data=tiny_data)


def test_a_bundle_round_trips_the_splits_and_refuses_another_config(tmp_path, tiny_data):
    from har.data.build import build_data, write_bundle
    from har.errors import DataError

    cfg = tiny_config(data={"bundle": str(tmp_path / "tiny.npz.xz"), "ratio": 10.0})
    write_bundle(tiny_data, cfg.data, cfg.data.bundle)
    again = build_data(cfg.data)
    for name in ("train", "val", "test"):
        assert (again.split(name).images == tiny_data.split(name).images).all()
        assert (again.split(name).labels == tiny_data.split(name).labels).all()
    assert again.class_counts == tiny_data.class_counts and again.classes == tiny_data.classes
    quick = build_data(tiny_config(data={"bundle": cfg.data.bundle, "ratio": 10.0, "train_fraction": 0.5}).data)
    assert quick.class_counts == [20, 6, 2]
    with pytest.raises(DataError, match=r"exported for another split \(ratio: bundle 10.0, config 100.0\)"):
        build_data(tiny_config(data={"bundle": cfg.data.bundle}).data)
    (tmp_path / "tiny.npz.xz").write_bytes((tmp_path / "tiny.npz.xz").read_bytes()[:500])
    with pytest.raises(DataError, match="is corrupt"):
        build_data(cfg.data)
    with pytest.raises(DataError, match="does not exist"):
        build_data(tiny_config(data={"bundle": str(tmp_path / "none.xz")}).data)


def test_an_uncompressed_bundle_reads_the_same(tmp_path, tiny_data):
    from har.data.build import build_data, write_bundle

    cfg = tiny_config(data={"bundle": str(tmp_path / "tiny.npz")})
    write_bundle(tiny_data, cfg.data, cfg.data.bundle)
    assert (tmp_path / "tiny.npz").read_bytes()[:2] == b"PK"  # a plain npz (zip), no xz
    assert (build_data(cfg.data).test.images == tiny_data.test.images).all()
