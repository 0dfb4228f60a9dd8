"""The reference runs as the project ships them (issue #19): config/reference.yaml is the paper grid narrowed, and
`har.reference` saves a working folder's runs, restores checkpoints into a new folder (another machine),
and rebuilds tables and figures from the finished runs only.

The save/restore/rebuild tests train 2-epoch runs of the reference grid on a synthetic bundle: seconds, no CIFAR.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, synthetic_data
from test_workflow import paper_config

import har.engine.loop as loop_module
from har import reference
from har.config import from_dict
from har.data.build import write_bundle
from har.engine.signals import TrainingInterrupted
from har.errors import ResultError
from har.pipeline import grid, jobs

REFERENCE_METHODS = {"ce_drw", "har_ce_drw", "ldam_drw", "har_ldam_drw"}


def reference_config() -> dict:
    return yaml.safe_load((REPO / "config" / "reference.yaml").read_text())


def test_the_reference_config_is_the_paper_grid_narrowed_to_table_ii_on_cifar10_lt100():
    """Table II's four lines the paper trained, 3 seeds, on CIFAR-10-LT-100: every run's config is the paper
    grid's run config of the same run, but for the precision the reference set pins (bf16 autocast,
    channels-last)."""
    ref, paper = reference_config(), paper_config()
    assert set(ref["methods"]) == REFERENCE_METHODS
    assert all(ref["methods"][name] == paper["methods"][name] for name in REFERENCE_METHODS)
    assert ref["seeds"] == [0, 1, 2] and ref["datasets"] == [{"name": "cifar10", "ratios": [100], "tables": ["II"]}]
    runs = grid.final_runs(ref)
    assert len(runs) == 12 and not grid.tsearch_runs(ref)
    paper_runs = {spec.run_dir: spec for spec in grid.final_runs(paper)}
    for spec in runs:
        ours, theirs = grid.run_config(ref, spec), grid.run_config(paper, paper_runs[spec.run_dir])
        assert ours["train"].pop("amp") is True and theirs["train"].pop("amp") is False
        assert ours["train"].pop("channels_last") is True and theirs["train"].pop("channels_last", None) is None
        assert ours == theirs
    assert {spec.method: grid.fixed_t(ref, spec) for spec in runs if spec.seed == 0} == {
        "ce_drw": None, "ldam_drw": None, "har_ce_drw": 0.9, "har_ldam_drw": pytest.approx(0.2)}


TINY_OVERRIDES = {"data": {"train_fraction": 1.0, "eval_fraction": 1.0},
                  "train": {"epochs": 2, "warmup_epochs": 1, "lr_milestones": [1], "lr_decay": 0.1},
                  "loss": {"drw_epoch": 1}}


@pytest.fixture
def tiny_reference(tmp_path, monkeypatch) -> Iterator[tuple[dict, Path]]:
    """The reference grid (bf16 autocast, channels-last) shortened to 2 epochs of seed 0, and a bundle of its split
    (synthetic images)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = {**reference_config(), "seeds": [0], "run_overrides": TINY_OVERRIDES}
    data_cfg = from_dict({"data": grid.split_data(cfg, "cifar10", 100.0)}).data
    bundle = tmp_path / "splits" / "cifar10-r100" / "data.npz"
    bundle.parent.mkdir(parents=True)
    write_bundle(synthetic_data((20, 12, 8, 6, 5, 4, 3, 3, 2, 2), per_class_eval=3), data_cfg, bundle)
    yield cfg, bundle
    torch.set_num_threads(threads)


def train_in(work: Path, cfg: dict, spec: grid.RunSpec, bundle: Path, evaluate: bool = True) -> Path:
    """Train (resume) and evaluate one grid run in the working folder `work`, as the pipeline's jobs do."""
    here = Path.cwd()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    try:
        jobs.train_run(cfg, spec, bundle, None, f"{spec.run_dir}/train.json")
        if evaluate:
            jobs.evaluate_run(spec, grid.target_savings(cfg, spec))
    finally:
        os.chdir(here)
    return work / spec.run_dir


def stop_after_first_epoch(monkeypatch) -> None:
    """Send this process SIGUSR1 once the first epoch's metrics are written: the trainer saves and stops there,
    as a job killed by its scheduler's warning does."""
    real = loop_module.write_history

    def write_then_signal(out, history):
        real(out, history)
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(loop_module, "write_history", write_then_signal)


def test_a_checkpoint_saved_restored_into_another_folder_finishes_bit_identical(tiny_reference, tmp_path,
                                                                                monkeypatch):
    """A run stopped after one epoch on 'machine B', saved into results/reference/checkpoints, restored into a new
    working folder ('machine C') and finished there ends with exactly the weights and metrics of the same run
    trained without a stop ('machine A'); saved again, it moves to runs/ with its weights only."""
    cfg, bundle = tiny_reference
    spec = next(s for s in grid.final_runs(cfg) if s.method == "har_ldam_drw")
    rel = Path(spec.run_dir).relative_to("results/runs")
    straight = train_in(tmp_path / "A", cfg, spec, bundle)

    with monkeypatch.context() as patch:
        stop_after_first_epoch(patch)
        with pytest.raises(TrainingInterrupted):
            train_in(tmp_path / "B", cfg, spec, bundle)
    shipped = tmp_path / "shipped"
    assert reference.save(tmp_path / "B", shipped) == [
        f"cifar10-r100/har_ldam_drw/seed0: epoch 1 of 2, checkpoint in {shipped / 'checkpoints' / rel}"]
    assert not (shipped / "runs").exists()
    assert reference.restore(tmp_path / "C", shipped) == [f"{rel}: restored at epoch 1 (was 0)"]
    assert reference.restore(tmp_path / "C", shipped) == []  # already there: nothing to bring
    resumed = train_in(tmp_path / "C", cfg, spec, bundle)

    a, c = (torch.load(d / "last.pt", weights_only=False) for d in (straight, resumed))
    assert a["epoch"] == c["epoch"] == 1
    assert a["model"].keys() == c["model"].keys()
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    momenta = [[s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()] for ckpt in (a, c)]
    assert all(torch.equal(x, y) for x, y in zip(*momenta, strict=True))

    def rows(d: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert rows(straight) == rows(resumed)
    machines = [json.loads(line) for line in (resumed / "machine.jsonl").read_text().splitlines()]
    assert [m["start_epoch"] for m in machines] == [0, 1]  # began on B, finished on C

    assert reference.save(tmp_path / "C", shipped) == [
        f"cifar10-r100/har_ldam_drw/seed0: finished, weights and evaluation in {shipped / 'runs' / rel}"]
    kept = shipped / "runs" / "cifar10-r100" / "har_ldam_drw" / "seed0"
    weights = torch.load(kept / "last.pt", weights_only=False)
    assert set(weights) == set(reference.WEIGHTS_KEYS)  # no optimiser state, RNG or progress
    assert all(torch.equal(weights["model"][k], c["model"][k]) for k in c["model"])
    assert (kept / "eval" / "test.npz").exists() and not (shipped / "checkpoints" / "cifar10-r100").exists()


def test_a_save_while_the_run_trains_on_never_ships_a_checkpoint_past_its_metrics_rows(tiny_reference, tmp_path,
                                                                                        monkeypatch):
    """The set is saved while it trains: an epoch that ends between the save's reads of the metrics and of the
    checkpoint must not leave the copy with a checkpoint whose epochs lack their rows (resuming would go on with a
    hole in metrics.jsonl); rows past the checkpoint are harmless, resuming drops them."""
    cfg, bundle = tiny_reference
    spec = next(s for s in grid.final_runs(cfg) if s.method == "ce_drw")
    with monkeypatch.context() as patch:
        stop_after_first_epoch(patch)
        with pytest.raises(TrainingInterrupted):
            train_in(tmp_path / "B", cfg, spec, bundle)
    run = tmp_path / "B" / spec.run_dir
    real = reference._copy_files

    def copy_then_an_epoch_ends(src, dest, names):
        real(src, dest, names)
        ckpt = torch.load(src / "last.pt", weights_only=False)
        rows = (src / "metrics.jsonl").read_text().splitlines()
        (src / "metrics.jsonl").write_text("\n".join([*rows, json.dumps({**json.loads(rows[-1]), "epoch": 1})]) + "\n")
        torch.save({**ckpt, "epoch": ckpt["epoch"] + 1}, src / "last.pt")

    monkeypatch.setattr(reference, "_copy_files", copy_then_an_epoch_ends)
    shipped = tmp_path / "shipped"
    reference.save(tmp_path / "B", shipped)
    kept = shipped / "checkpoints" / Path(spec.run_dir).relative_to("results/runs")
    epoch = torch.load(kept / "last.pt", weights_only=False)["epoch"]
    rows = [json.loads(line)["epoch"] for line in (kept / "metrics.jsonl").read_text().splitlines()]
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == epoch + 1  # the run did go on
    assert set(range(epoch + 1)) <= set(rows)


def test_rebuild_reads_finished_runs_only_and_refuses_an_unfinished_one_by_name(tiny_reference, tmp_path,
                                                                                monkeypatch):
    """Tables, fidelity report and figures come from the finished runs saved under runs/ (a partial set: the
    tables say n), each re-evaluated from its cache under the current rules first; a folder there whose run has not
    finished stops the rebuild, naming it."""
    cfg, bundle = tiny_reference
    config = tmp_path / "reference.yaml"
    config.write_text(yaml.safe_dump(cfg))
    specs = {s.method: s for s in grid.final_runs(cfg)}
    for method in ("ce_drw", "har_ce_drw"):
        train_in(tmp_path / "work", cfg, specs[method], bundle)
    shipped = tmp_path / "shipped"
    reference.save(tmp_path / "work", shipped)
    older = shipped / "runs" / "cifar10-r100" / "har_ce_drw" / "seed0" / "eval" / "test.json"
    report = json.loads(older.read_text())  # as an older har wrote it: no saving with the heads not counted
    report["dynamic_selected"] = {k: v for k, v in report["dynamic_selected"].items() if "trunk" not in k}
    older.write_text(json.dumps(report))
    lines = reference.rebuild(config, shipped, shipped / "tables", tmp_path / "figures", bundle.parent.parent)
    assert "saving_trunk>=0.32" in json.loads(older.read_text())["dynamic_selected"]  # re-evaluated from its cache
    rebuilt = older.read_text()
    trained = tmp_path / "work" / specs["har_ce_drw"].run_dir / "eval" / "test.json"
    trained.write_text(json.dumps(json.loads(trained.read_text()) | {"written_by": "the training clone"}))
    again = reference.save(tmp_path / "work", shipped)  # a later save leaves a finished, saved run as it is
    assert f"cifar10-r100/har_ce_drw/seed0: finished, already saved in {older.parent.parent}" in again
    assert older.read_text() == rebuilt
    assert lines[0] == ("2 finished runs; not there yet: results/runs/cifar10-r100/har_ldam_drw/seed0, "
                        "results/runs/cifar10-r100/ldam_drw/seed0")
    table = (shipped / "tables" / "table_II.md").read_text()
    assert "CE+DRW" in table and "HAR(CE)+DRW" in table
    assert (tmp_path / "figures" / "fig4_loss_per_exit.png").exists()

    with monkeypatch.context() as patch:
        stop_after_first_epoch(patch)
        with pytest.raises(TrainingInterrupted):
            train_in(tmp_path / "work", cfg, specs["ldam_drw"], bundle)
    unfinished = shipped / "runs" / "cifar10-r100" / "ldam_drw" / "seed0"
    unfinished.mkdir(parents=True)
    for name in ("config.yaml", "config.sha256", "metrics.jsonl", "last.pt"):
        (unfinished / name).write_bytes((tmp_path / "work" / specs["ldam_drw"].run_dir / name).read_bytes())
    with pytest.raises(ResultError, match=rf"{unfinished} holds an unfinished run \(epoch 1 of 2"):
        reference.rebuild(config, shipped, shipped / "tables", tmp_path / "figures", bundle.parent.parent)


def _quoted_rows(path: Path, header: str) -> list[list[str]]:
    """The body rows of the Markdown table under `header` in `path`, as cells."""
    lines = path.read_text().splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


_MEAN_STD = re.compile(r"([+-]?\d+\.\d\d) ± (\d+\.\d\d)")
_SEED_VALUE = re.compile(r"(?<![\d.])[+-]?\d+\.\d\d(?![\d%])")


@pytest.mark.parametrize("doc, header", [
    ("README.md", "| Table II, cifar10-r100 | ours | paper | diff |"),
    ("docs/method.md", "| line | ours | paper | diff |"),
])
def test_the_docs_quote_the_committed_fidelity_report(doc, header):
    """Every line of the reference set that README.md or method.md sets beside a paper value is a line of the
    committed `results/reference/tables/fidelity.csv`: its mean, std, paper value and difference, and each seed's
    value it names. When `make reference-tables` moves a number, the docs must move with it in the same commit."""
    fidelity = pd.read_csv(REPO / "results" / "reference" / "tables" / "fidelity.csv", comment="#")
    quoted = [row for row in _quoted_rows(REPO / doc, header) if row[2] != "-"]
    assert len(quoted) >= 10, quoted

    def near(column: str, value: float, digits: int) -> pd.Series:
        """The report's rows whose `column` prints as `value` at `digits` decimals."""
        return (fidelity[column] - value).abs() <= 0.51 * 10 ** -digits

    for label, ours, paper, diff in quoted:
        mean, std = (float(x) for x in _MEAN_STD.search(ours).groups())
        matches = fidelity[near("ours_mean", mean, 2) & near("ours_std", std, 2) & near("paper", float(paper), 1)
                           & near("diff", float(diff), 2)]
        assert len(matches) >= 1, (doc, label)
        ci = re.search(r"95% CI ([+-]?\d+\.\d\d) to ([+-]?\d+\.\d\d)", label + " " + ours)
        seeds = set(_SEED_VALUE.findall(_MEAN_STD.sub("", (label + " " + ours).split("95% CI")[0])))
        assert any(seeds <= {v.strip().split(": ")[1] for v in row.per_seed.split(",")}
                   and (ci is None or all(abs(a - float(b)) <= 0.0051
                                          for a, b in zip((row.ci_low, row.ci_high), ci.groups(), strict=True)))
                   for row in matches.itertuples()), (doc, label, seeds)
