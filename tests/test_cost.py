"""What each table cost: the benchmark files of exactly the jobs that fed it, summed, on fabricated files (no
training, no real timings)."""

import copy
import json

import pandas as pd
import pytest
from test_workflow import paper_config, snakemake, workdir_copy

from har.errors import ResultError
from har.pipeline import grid
from har.reporting.cost import write_cost

PAPER = paper_config()
LOSS_CE = {"name": "ce", "har": False}
# CIFAR (Tables I, II, IV; packs of up to 4 on one GPU) and ImageNet-LT (Table III; 4-GPU train jobs, 8-CPU evaluate
# jobs), where CE is trained only as tau-norm's stage one
CFG = {
    "label": "cost test",
    "seeds": [0, 1],
    "datasets": [{"name": "cifar10", "ratios": [100], "tables": ["I", "II", "IV"]},
                 {**copy.deepcopy(PAPER["datasets"][2]), "tables": ["III"]}],
    "methods": {
        "ce": {"tables": ["II"], "exits": False, "run": {"loss": LOSS_CE}},
        "har_ce": {"tables": ["IV"], "t": {"value": 0.9}, "run": {"loss": {"name": "ce", "har": True}}},
        "har_ce_drw": {"tables": ["II"], "t_search": "ce",
                       "run": {"loss": {"name": "ce", "reweight": "drw", "har": True}}},
        "tau_norm": {"tables": ["III"], "stage_one": "ce",
                     "run": {"decouple": {"method": "tau_norm"}, "loss": LOSS_CE}},
    },
    "t_search": {"seeds": [0], "ce": [0.8, 0.9], "unsearched": {"ce": 0.9}},
    "pack": {"size": 4},
    "resources": PAPER["resources"],
}
# The tables each kind of run feeds in this config, written out by hand: (dataset, role, method) -> tables
FEEDS = {("cifar10", "final", "ce"): {"II"}, ("cifar10", "final", "har_ce"): {"IV"},
         ("cifar10", "final", "har_ce_drw"): {"II"}, ("cifar10", "tsearch", "har_ce_drw"): {"I"},
         ("imagenet_lt", "final", "ce"): {"III"}, ("imagenet_lt", "final", "tau_norm"): {"III"}}
GPUS = {"cifar10": {"train": 1, "evaluate": 1}, "imagenet_lt": {"train": 4, "evaluate": 1}}
CPUS = {"cifar10": {"train": 4, "evaluate": 4}, "imagenet_lt": {"train": 32, "evaluate": 8}}
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(path, hours: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{3600 * hours:.2f}\t0:00:00\t1\t1\t1\t1\t0\t0\t50\t10\n")


def machine(root, run_dir: str, device: str, name: str) -> None:
    folder = root / run_dir
    folder.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "device_name": name, "precision": "fp32", "threads": 4}
    (folder / "machine.jsonl").write_text(json.dumps(record) + "\n")


def test_a_tables_cost_sums_the_benchmark_files_of_exactly_the_jobs_that_fed_it(tmp_path):
    """Each job's file holds a distinct power of two hours, so each sum names the jobs in it: a pack job counts in the
    tables of all its members, a stage-one run in its stage two's table, every job once in the whole grid; a missing
    file is a job not measured, a stray file counts nowhere."""
    grid.check_config(CFG)
    jobs = []  # (benchmark file, dataset, kind, the tables it feeds)
    for name, members in grid.packs(CFG).items():
        jobs.append((f"logs/packs/{name}/train.benchmark.tsv", "cifar10", "train",
                     set().union(*(FEEDS[(s.dataset, s.role, s.method)] for s in members))))
    runs = grid.final_runs(CFG) + grid.tsearch_runs(CFG)
    assert len(jobs) == 3 and len(runs) == 12  # packs: CE; HAR(CE) with HAR(CE)+DRW; the t search
    for spec in runs:
        feeds = FEEDS[(spec.dataset, spec.role, spec.method)]
        if spec.dataset == "imagenet_lt":  # list datasets train alone
            jobs.append((f"logs/{spec.run_dir}/train.benchmark.tsv", spec.dataset, "train", feeds))
        jobs.append((f"logs/{spec.run_dir}/evaluate.benchmark.tsv", spec.dataset, "evaluate", feeds))
    missing = "logs/results/runs/imagenet_lt/tau_norm/seed1/evaluate.benchmark.tsv"
    hours = {}
    for i, (path, *_) in enumerate(jobs):
        hours[path] = 2 ** i
        if path != missing:
            bench(tmp_path / path, 2 ** i)
    bench(tmp_path / "logs/results/runs/cifar10-r100/focal/seed0/train.benchmark.tsv", 2 ** 30)  # not a grid job
    machine(tmp_path, "results/runs/cifar10-r100/ce/seed0", "cuda:0", "NVIDIA A100-SXM4-40GB")
    machine(tmp_path, "results/runs/imagenet_lt/ce/seed1", "cuda:0", "NVIDIA H100 80GB HBM3")
    machine(tmp_path, "results/runs/imagenet_lt/tau_norm/seed0", "cpu", "AMD EPYC 9R14")

    paths = write_cost(CFG, tmp_path, tmp_path / "tables")
    assert [p.name for p in paths] == ["cost.md", "cost.csv"]
    cost = pd.read_csv(tmp_path / "tables" / "cost.csv", comment="#").set_index("Table")
    for key in ("I", "II", "III", "IV", None):
        fed = [(path, dataset, kind) for path, dataset, kind, feeds in jobs if key is None or key in feeds]
        measured = [(p, d, k) for p, d, k in fed if p != missing]
        row = cost.loc["whole grid" if key is None else f"Table {key}"]
        assert row["Jobs measured"] == f"{len(measured)} of {len(fed)}"
        assert row["Wall hours"] == pytest.approx(sum(hours[p] for p, _, _ in measured))
        assert row["GPU-hours"] == pytest.approx(sum(hours[p] * GPUS[d][k] for p, d, k in measured))
        assert row["CPU core-hours"] == pytest.approx(sum(hours[p] * CPUS[d][k] for p, d, k in measured))
    devices = cost["Trained on"].to_dict()
    assert devices["Table II"] == "NVIDIA A100-SXM4-40GB" and devices["Table I"] == "not recorded"
    assert devices["Table III"] == "AMD EPYC 9R14 (CPU); NVIDIA H100 80GB HBM3"
    assert devices["whole grid"] == "AMD EPYC 9R14 (CPU); NVIDIA A100-SXM4-40GB; NVIDIA H100 80GB HBM3"
    assert "| whole grid |" in (tmp_path / "tables" / "cost.md").read_text()

    (tmp_path / missing).write_text("not a benchmark\n1\n")
    with pytest.raises(ResultError, match="is not a Snakemake benchmark file"):
        write_cost(CFG, tmp_path, tmp_path / "tables")


def test_the_tables_job_writes_the_cost_report(tmp_path):
    work = workdir_copy(tmp_path)
    proc = snakemake(work, "--configfile", "config/ci.yaml", "-n", "results/tables/cost.md")
    assert "rule tables_build:" in proc.stdout and "results/tables/cost.csv" in proc.stdout
