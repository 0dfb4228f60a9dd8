"""Split bundles (`write_bundle` / `read_bundle`): checked on reading, refused with the fix when damaged, and the
provenance of the files they were cut from carried into every evaluation report."""

from __future__ import annotations

import io
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from har.config import DataConfig, from_dict
from har.data.build import RunData, Split, build_data, list_provenance, read_bundle, write_bundle
from har.errors import DataError

SOURCE = {"dataset": "cifar10", "official": False, "source": "/data/cifar-10-batches-py",
          "files": {"data_batch_1": "0" * 32}, "differing": ["data_batch_1"],
          "label": "CIFAR-10 copy at /data/cifar-10-batches-py (md5 differs from the official release: data_batch_1)"}
FIX = "delete it and write it again with `har export-data"


def _with_provenance(data: RunData) -> RunData:
    return RunData(data.train, data.val, data.test, data.class_counts, data.groups, data.classes, SOURCE)


def _bundle(tmp_path: Path, data: RunData, name: str = "b.npz") -> DataConfig:
    cfg = DataConfig(dataset="cifar10", bundle=str(tmp_path / name))
    write_bundle(data, cfg, cfg.bundle)
    return cfg


def _entries(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("name", ["b.npz", "b.npz.xz"])
def test_a_bundle_keeps_the_source_provenance_and_adds_its_own(tmp_path, tiny_data, name):
    cfg = _bundle(tmp_path, _with_provenance(tiny_data), name)
    data = read_bundle(cfg)
    assert {k: data.provenance[k] for k in SOURCE} == SOURCE
    assert data.provenance["bundle"] == cfg.bundle and len(data.provenance["bundle_sha256"]) == 64
    assert data.train.labels.tolist() == tiny_data.train.labels.tolist()
    quick = build_data(DataConfig(dataset="cifar10", bundle=cfg.bundle, train_fraction=0.5))
    assert quick.provenance["train_fraction"] == 0.5 and quick.provenance["label"].startswith(SOURCE["label"])
    assert "quick run" in quick.provenance["label"] and "quick run" not in data.provenance["label"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["b.npz", "b.npz.xz"])
@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit], ids=["truncated", "bit-flipped"])
def test_a_damaged_bundle_is_refused_with_the_fix(tmp_path, tiny_data, name, damage):
    cfg = _bundle(tmp_path, tiny_data, name)
    damage(Path(cfg.bundle))
    with pytest.raises(DataError, match="is corrupt") as err:
        read_bundle(cfg)
    assert cfg.bundle in str(err.value) and FIX in str(err.value)


def _rewrite(path: Path, entries: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **entries)
    path.write_bytes(buffer.getvalue())


def test_changed_arrays_with_intact_zip_checksums_fail_the_sha256(tmp_path, tiny_data):
    """A pixel changed and the zip rewritten (its CRCs fine): only the bundle's own sha256 tells."""
    cfg = _bundle(tmp_path, tiny_data)
    entries = _entries(Path(cfg.bundle))
    entries["test_images"] = entries["test_images"].copy()
    entries["test_images"][0, 0, 0, 0] ^= 1
    _rewrite(Path(cfg.bundle), entries)
    with pytest.raises(DataError, match="its contents do not match its sha256"):
        read_bundle(cfg)


@pytest.mark.parametrize("drop, message", [("meta", "has no metadata"), ("sha256", "has no checksum: an older har"),
                                           ("val_labels", "lacks val_labels")])
def test_a_bundle_without_its_metadata_checksum_or_an_array_is_refused(tmp_path, tiny_data, drop, message):
    cfg = _bundle(tmp_path, tiny_data)
    entries = _entries(Path(cfg.bundle))
    del entries[drop]
    _rewrite(Path(cfg.bundle), entries)
    with pytest.raises(DataError, match=message) as err:
        read_bundle(cfg)
    assert FIX in str(err.value)


def test_a_bundle_in_the_old_format_is_refused_with_the_fix_to_rebuild(tmp_path, tiny_data):
    path = tmp_path / "old.npz.xz"
    meta = {"dataset": "cifar10", "ratio": 100.0, "seed": 0, "val_per_class": 50, "classes": tiny_data.classes}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **{f"{s}_{p}": getattr(tiny_data.split(s), p)
                                                       for s in ("train", "val", "test") for p in ("images", "labels")})
    path.write_bytes(lzma.compress(buffer.getvalue()))
    with pytest.raises(DataError, match="has no checksum") as err:
        read_bundle(DataConfig(bundle=str(path)))
    assert "rebuilt by the pipeline when you delete it" in str(err.value)


def _bad(data: RunData, split: str, labels: np.ndarray) -> RunData:
    parts = {name: data.split(name) for name in ("train", "val", "test")}
    parts[split] = Split(parts[split].images, labels)
    return RunData(**parts, class_counts=data.class_counts, groups=data.groups, classes=data.classes)


def test_labels_out_of_range_or_fewer_than_the_images_are_refused(tmp_path, tiny_data):
    labels = tiny_data.test.labels.copy()
    labels[3] = len(tiny_data.classes)
    cfg = _bundle(tmp_path, _bad(tiny_data, "test", labels))
    with pytest.raises(DataError, match=r"test labels range over \[0, 3\], its 3 classes need \[0, 3\)"):
        read_bundle(cfg)
    cfg = _bundle(tmp_path, _bad(tiny_data, "val", tiny_data.val.labels[:-2]))
    with pytest.raises(DataError, match=rf"\({len(tiny_data.val) - 2},\) int64 val labels for {len(tiny_data.val)} "):
        read_bundle(cfg)
    labels = tiny_data.train.labels.copy()
    labels[0] = -1
    with pytest.raises(DataError, match=r"train labels range over \[-1, "):
        read_bundle(_bundle(tmp_path, _bad(tiny_data, "train", labels)))


def test_a_folder_as_bundle_is_named_as_such(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a bundle file"):
        read_bundle(DataConfig(bundle=str(tmp_path)))


def test_list_provenance_says_whether_the_lists_are_the_published_ones(tmp_path):
    from har.facts import IMAGENET_LT_LISTS

    published = {p.file_name: p.blob_id for p in IMAGENET_LT_LISTS.values()}
    ours = list_provenance("imagenet_lt", tmp_path, tmp_path / "img", published)
    assert ours["official"] and ours["label"] == "published ImageNet-LT lists" and ours["files"] == published
    changed = dict(published, **{"ImageNet_LT_val.txt": "f" * 40})
    other = list_provenance("imagenet_lt", tmp_path, tmp_path / "img", changed)
    assert not other["official"] and other["differing"] == ["ImageNet_LT_val.txt"]
    assert other["label"] == (f"ImageNet-LT lists at {tmp_path} (git blob id differs from the published ones: "
                              f"ImageNet_LT_val.txt)")


def test_every_evaluation_report_records_the_data_provenance(tmp_path, tiny_data, single_thread):
    from har.engine.trainer import train
    from har.evaluation.evaluate import evaluate_run

    cfg = from_dict({"data": {"bundle": _bundle(tmp_path, _with_provenance(tiny_data)).bundle},
                     "model": {"layout": "CBBEBE"},
                     "train": {"epochs": 1, "batch_size": 28, "warmup_epochs": 0, "lr_milestones": [],
                               "device": "cpu"},
                     "eval": {"exit_thresholds": [0.5, 1.01], "target_savings": [0.2]}})
    train(cfg, tmp_path / "run")
    evaluate_run(tmp_path / "run", device="cpu")
    for split in ("val", "test"):
        report = json.loads((tmp_path / "run" / "eval" / f"{split}.json").read_text())
        recorded = report["data_provenance"]
        assert (recorded["label"], recorded["official"]) == (SOURCE["label"], False)
        assert recorded["bundle"] == cfg.data.bundle


def test_a_pipeline_job_on_a_damaged_bundle_ends_its_log_with_the_named_error(tmp_path, tiny_data):
    """A Snakemake script job (har.pipeline.jobs.setup_job, then the job) that reads a damaged bundle ends with
    exit status 1 and its log's last line is the DataError naming the file and the fix, with no traceback."""
    import subprocess
    import sys

    cfg = _bundle(tmp_path, tiny_data)
    _truncate(Path(cfg.bundle))
    log = tmp_path / "logs" / "train.log"
    script = ("from har.pipeline.jobs import setup_job\nfrom har.config import DataConfig\n"
              "from har.data.build import build_data\n"
              f"setup_job({str(log)!r})\nbuild_data(DataConfig(dataset='cifar10', bundle={cfg.bundle!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    text = log.read_text()
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("har: DataError: ") and cfg.bundle in last and FIX in last
