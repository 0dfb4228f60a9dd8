"""Re-evaluation from the cache: a run's reports recomputed from eval/<split>.npz, its config and its architecture's
MACs table, without data or weights, equal those of the evaluation that wrote the cache."""

import json
import shutil

import numpy as np
import pytest
from conftest import synthetic_data

from har.cli import main
from har.config import from_dict
from har.engine.trainer import train
from har.errors import RunError
from har.evaluation.evaluate import evaluate_from_cache, evaluate_run


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A one-epoch HAR(CE) run evaluated at two target savings; its reports as written, read back."""
    cfg = from_dict({"data": {"dataset": "cifar10"}, "loss": {"name": "ce", "train_threshold": 0.5},
                     "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0, "device": "cpu"}})
    run = tmp_path_factory.mktemp("cache") / "run"
    data = synthetic_data()
    train(cfg, run, data=data)
    evaluate_run(run, device="cpu", data=data, target_savings=[0.1, 0.3])
    return run, {split: json.loads((run / "eval" / f"{split}.json").read_text()) for split in ("val", "test")}


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "run" / "last.pt").unlink()  # no weights needed
    return tmp_path / "run"


def test_reports_from_the_cache_equal_the_evaluations(evaluated_run, tmp_path):
    run, written = evaluated_run
    again = copy_of(run, tmp_path)
    evaluate_from_cache(again)  # the targets of the existing report (0.1, 0.3) and the config's (0.25)
    for split in ("val", "test"):
        report = json.loads((again / "eval" / f"{split}.json").read_text())
        assert report.pop("run") == str(again) and written[split]["run"] == str(run)
        chosen = set(report["dynamic_selected"])
        assert chosen == set(written[split]["dynamic_selected"]) | {"saving>=0.25", "saving_trunk>=0.25"}
        for name in ("saving>=0.25", "saving_trunk>=0.25"):
            del report["dynamic_selected"][name], report["exit_thresholds_chosen"][name]
        assert report == {k: v for k, v in written[split].items() if k != "run"}


def test_the_command_line_rewrites_the_reports_from_the_cache(evaluated_run, tmp_path, capsys):
    run, written = evaluated_run
    again = copy_of(run, tmp_path)
    (again / "eval" / "test.json").write_text(json.dumps({**written["test"], "dynamic_sweep": []}))  # an older rule's
    assert main(["evaluate", "--run", str(again), "--from-cache"]) == 0
    assert "rewritten from the cache" in capsys.readouterr().out
    test = json.loads((again / "eval" / "test.json").read_text())
    assert test["dynamic_sweep"] == written["test"]["dynamic_sweep"]


def test_the_command_line_chooses_s_at_the_savings_it_is_given(evaluated_run, tmp_path, capsys):
    run, written = evaluated_run
    again = copy_of(run, tmp_path)
    assert main(["evaluate", "--run", str(again), "--from-cache", "--target-savings", "0.2", "0.1"]) == 0
    test = json.loads((again / "eval" / "test.json").read_text())
    assert set(test["dynamic_selected"]) == {"best", "saving>=0.2", "saving_trunk>=0.2", "saving>=0.1",
                                             "saving_trunk>=0.1"}  # the given savings only, not the report's 0.3
    assert test["dynamic_selected"]["saving>=0.1"] == written["test"]["dynamic_selected"]["saving>=0.1"]
    assert main(["evaluate", "--run", str(again), "--from-cache", "--target-savings", "25"]) == 2
    assert "eval.target_savings: (25.0,) is out of range; it must be < 1" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_corrupt_cache_is_refused_naming_the_fix(evaluated_run, tmp_path, capsys, damage):
    run, _ = evaluated_run
    again = copy_of(run, tmp_path)
    cache = again / "eval" / "test.npz"
    if damage == "missing":
        cache.unlink()
    else:
        cache.write_bytes(cache.read_bytes()[:200])
    with pytest.raises(RunError, match=r"test.npz is missing, truncated or corrupt .*har evaluate --run"):
        evaluate_from_cache(again)
    assert main(["evaluate", "--run", str(again), "--from-cache"]) == 2
    assert "har evaluate --run" in capsys.readouterr().err


def test_a_cache_without_a_report_of_its_config_is_refused(evaluated_run, tmp_path):
    run, written = evaluated_run
    again = copy_of(run, tmp_path)
    (again / "eval" / "val.json").write_text(json.dumps({**written["val"], "config_sha256": "0" * 64}))
    with pytest.raises(RunError, match=r"val.json was computed for another config.*har evaluate --run"):
        evaluate_from_cache(again)
    (again / "eval" / "val.json").unlink()
    with pytest.raises(RunError, match=r"val.json is missing or unreadable.*class counts and shot groups"):
        evaluate_from_cache(again)


def test_a_cache_of_another_architecture_is_refused(evaluated_run, tmp_path):
    run, _ = evaluated_run
    again = copy_of(run, tmp_path)
    with np.load(again / "eval" / "test.npz") as cached:
        logits, labels = cached["logits"], cached["labels"]
    np.savez_compressed(again / "eval" / "test.npz", logits=logits[1:], labels=labels)
    with pytest.raises(RunError, match=r"test.npz holds 3 exits, the config's model 4"):
        evaluate_from_cache(again)
