"""No stale result: a stage two is tied to the stage one it started from, and the pipeline retrains a run folder
whose config or stage one changed (moving the old folder aside) or that was deleted by hand."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import shared_cifar_root
from test_methods import plain_config, stage_two_config
from test_workflow import SNAKEMAKE, job_counts, workdir_copy

from har.engine.trainer import train
from har.errors import RunError
from har.evaluation.evaluate import evaluate_run
from har.run import stage_one


def test_stage_two_of_a_retrained_stage_one_is_refused(tmp_path, tiny_data):
    """cRT records its stage one when it starts; resuming or evaluating it after stage one was trained again
    (another seed here: other weights) is refused with both folders named and the fix."""
    first, second = tmp_path / "stage1", tmp_path / "crt"
    train(plain_config(), first, data=tiny_data)
    cfg = stage_two_config(first, "crt", train={"epochs": 1})
    train(cfg, second, data=tiny_data)
    assert stage_one.recorded_stage_one(second) == stage_one.stage_one_identity(first)
    train(cfg, second, data=tiny_data)  # the same stage one: resuming a finished run is allowed
    evaluate_run(second, data=tiny_data)

    for name in ("config.yaml", "config.sha256", "metrics.jsonl", "last.pt", "prev.pt"):
        (first / name).unlink(missing_ok=True)
    train(plain_config(train={"seed": 1}), first, data=tiny_data)
    assert stage_one.stage_one_change(cfg, second)
    for action in (lambda: train(cfg, second, data=tiny_data), lambda: evaluate_run(second, data=tiny_data)):
        with pytest.raises(RunError, match="stage two of an earlier training of its stage one") as caught:
            action()
        assert str(first) in str(caught.value) and f"delete {second}" in str(caught.value)



def test_a_stale_folder_that_a_live_trainer_holds_is_not_moved_aside(tmp_path, tiny_data):
    """The cluster case: snakemake was killed while its job kept training, the config was edited, and the rerun's
    job finds the folder stale; it must not pull the folder from under the trainer that still writes it."""
    from har.errors import FolderBusy
    from har.pipeline.jobs import set_aside_stale
    from har.run.lock import folder_lock

    run = tmp_path / "seed0"
    train(plain_config(), run, data=tiny_data)
    edited = plain_config(train={"weight_decay": 1e-3})
    with folder_lock(run, "train", "run folder (--out)"):  # the trainer that is still running
        with pytest.raises(FolderBusy, match="moving the stale folder aside"):
            set_aside_stale(edited, run)
    assert (run / "last.pt").is_file() and not list(tmp_path.glob("seed0.stale-*"))
    aside = set_aside_stale(edited, run)  # once it has stopped, the folder is moved aside
    assert aside is not None and aside.name.startswith("seed0.stale-config-") and not run.exists()

# Three methods, one seed, one epoch on 1% of CIFAR-10: CE, HAR(CE) and tau-norm on CE's run (Tables III, IV).
TINY_PIPELINE = {
    "label": "stale-result test (tiny)", "data_root": None, "seeds": [0],
    "run_overrides": {"data": {"train_fraction": 0.01, "eval_fraction": 0.01},
                      "train": {"epochs": 1, "warmup_epochs": 1}, "loss": {"drw_epoch": 0},
                      "eval": {"batch_size": 300}},
    "datasets": [{"name": "cifar10", "ratios": [100], "tables": ["III", "IV"]}],
    "methods": {
        "ce": {"display": "CE", "tables": ["III", "IV"], "exits": False, "run": {"loss": {"name": "ce", "har": False}}},
        "har_ce": {"display": "HAR(CE)", "tables": ["IV"],
                   "run": {"loss": {"name": "ce", "har": True, "train_threshold": 0.9}}},
        "tau_norm": {"display": "tau-norm", "tables": ["III"], "stage_one": "ce",
                     "run": {"decouple": {"method": "tau_norm"}, "loss": {"name": "ce", "har": False}}}},
    "t_search": {"seeds": [0], "ce": [0.9], "ldam": [2.0]},
    "resources": {kind: {"runtime": 10, "mem_mb": 2000, "cpus": 1, "gpu": 0}
                  for kind in ("split", "train", "evaluate", "report")},
}
RUNS = Path("results/runs/cifar10-r100")
TABLE = Path("results/tables/table_III.csv")
needs_cifar = pytest.mark.skipif(shared_cifar_root() is None,
                                 reason="needs the CIFAR-10 copy in ../shared/data or HAR_DATA")


def pipeline(work: Path, cfg: dict, *args: str) -> str:
    """Run snakemake on `cfg` in `work`; its output."""
    (work / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HAR_DATA": str(shared_cifar_root())}
    proc = subprocess.run([*SNAKEMAKE, "--profile", "profiles/local", "--configfile", "pipeline.yaml", "--cores", "2",
                           *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def planned(work: Path, cfg: dict) -> dict[str, int]:
    output = pipeline(work, cfg, "-n", "--quiet", "rules")
    return {} if "Nothing to be done" in output else job_counts(output)


def edited(change) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(TINY_PIPELINE))
    change(cfg["methods"])
    return cfg


def moved_aside(work: Path, method: str) -> list[str]:
    """The reasons in the names of a method's folders moved aside."""
    return sorted(p.name.split(".stale-")[1].rsplit("-", 1)[0] for p in (work / RUNS / method).glob("seed0.stale-*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The tiny pipeline, run once; each test works on a copy (file times kept)."""
    work = workdir_copy(tmp_path_factory.mktemp("trained"))
    pipeline(work, TINY_PIPELINE)
    return work


@pytest.fixture
def work(trained, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


@pytest.mark.pipeline
@needs_cifar
def test_an_edited_stage_one_retrains_it_and_its_stage_two_and_rebuilds_the_tables(work):
    """CE's weight decay edited: CE and tau-norm (on CE) are trained again, their old folders moved aside, HAR(CE)
    is left alone; the tables are rebuilt and the next run has nothing to do."""
    cfg = edited(lambda m: m["ce"]["run"].update(train={"weight_decay": 1e-3}))
    assert planned(work, cfg) == {"run_train": 2, "run_evaluate": 2, "tables_build": 1, "figures_plot": 1, "all": 1}
    har_marker, table_before = (work / RUNS / "har_ce/seed0/train.json").stat().st_mtime_ns, (work / TABLE).stat()
    pipeline(work, cfg)
    assert yaml.safe_load((work / RUNS / "ce/seed0/config.yaml").read_text())["train"]["weight_decay"] == 1e-3
    assert moved_aside(work, "ce") == ["config"] and moved_aside(work, "tau_norm") == ["stage-one"]
    assert stage_one.recorded_stage_one(work / RUNS / "tau_norm/seed0")["checkpoint_sha256"] == \
        stage_one.stage_one_identity(work / RUNS / "ce/seed0")["checkpoint_sha256"]
    assert moved_aside(work, "har_ce") == []
    assert (work / RUNS / "har_ce/seed0/train.json").stat().st_mtime_ns == har_marker
    assert (work / TABLE).stat().st_mtime_ns > table_before.st_mtime_ns
    assert planned(work, cfg) == {}


@pytest.mark.pipeline
@needs_cifar
def test_an_edited_method_plans_only_its_run_and_a_deleted_folder_is_trained_again(work):
    """HAR(CE)'s threshold edited: exactly its run would be trained again (the previous test runs such a plan).
    CE's folder deleted by hand: CE is trained again, then tau-norm on it (moved aside first if the new CE's
    weights differ), and the tables are rebuilt."""
    cfg = edited(lambda m: m["har_ce"]["run"]["loss"].update(train_threshold=0.8))
    assert planned(work, cfg) == {"run_train": 1, "run_evaluate": 1, "tables_build": 1, "figures_plot": 1, "all": 1}

    cfg = TINY_PIPELINE
    shutil.rmtree(work / RUNS / "ce/seed0")
    tau_marker, table_before = (work / RUNS / "tau_norm/seed0/train.json").stat().st_mtime_ns, (work / TABLE).stat()
    assert planned(work, cfg) == {"run_train": 2, "run_evaluate": 2, "tables_build": 1, "figures_plot": 1, "all": 1}
    pipeline(work, cfg)
    assert (work / RUNS / "ce/seed0/eval/test.json").is_file() and moved_aside(work, "ce") == []
    assert (work / RUNS / "tau_norm/seed0/train.json").stat().st_mtime_ns > tau_marker
    assert stage_one.recorded_stage_one(work / RUNS / "tau_norm/seed0")["checkpoint_sha256"] == \
        stage_one.stage_one_identity(work / RUNS / "ce/seed0")["checkpoint_sha256"]
    assert (work / TABLE).stat().st_mtime_ns > table_before.st_mtime_ns
    assert planned(work, cfg) == {}
