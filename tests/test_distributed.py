"""Data-parallel training with torchrun on the CPU (gloo): two processes give the one-process result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import synthetic_data
from ddp_worker import STOP_AT_CALL  # registers the batch-norm-free test model

from har.config import from_dict
from har.engine.signals import EXIT_TEMPFAIL
from har.engine.trainer import train
from har.run.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
# 56 examples in global batches of 8: 7 steps per epoch, every process gets 4 examples per step
CONFIG = {"data": {"dataset": "cifar10"}, "model": {"name": "plain_convnet"},
          "loss": {"name": "ce", "reweight": "drw", "drw_epoch": 1, "train_threshold": 0.5},
          "train": {"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "lr_milestones": [1], "lr_decay": 0.1,
                    "device": "cpu", "log_every": 1}}


def torchrun(out: Path, stop_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if stop_at is not None:
        env[STOP_AT_CALL] = str(stop_at)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(TESTS / "ddp_worker.py"), str(out), json.dumps(CONFIG)],
                          env=env, capture_output=True, text=True, timeout=300)


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(from_dict(CONFIG), root / "one", data=synthetic_data())
    finally:
        torch.set_num_threads(threads)
    proc = torchrun(root / "two")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"one": root / "one", "two": root / "two", "root": root}


def test_two_processes_train_as_one_on_the_same_global_batch(runs):
    one, two = load_checkpoint(runs["one"] / "last.pt"), load_checkpoint(runs["two"] / "last.pt")
    for key, value in one["model"].items():
        assert torch.allclose(value, two["model"][key], rtol=1e-4, atol=2e-5), key  # float sums in another order
    for a, b in zip(rows(runs["one"]), rows(runs["two"]), strict=True):
        assert a["epoch"] == b["epoch"] and a["lr"] == b["lr"] and a["reweighted"] == b["reweighted"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["exit_fraction"] == pytest.approx(b["exit_fraction"])  # every process's examples counted
        assert a["train_top1"] == pytest.approx(b["train_top1"])


def test_a_distributed_run_stopped_mid_epoch_resumes_to_the_same_result(runs):
    out = runs["root"] / "stopped"
    proc = torchrun(out, stop_at=9)  # step 2 of epoch 1
    assert proc.returncode != 0 and f"exit status {EXIT_TEMPFAIL}" in proc.stderr, proc.stderr[-4000:]
    saved = load_checkpoint(out / "last.pt")
    assert saved["epoch"] == 0 and saved["partial"]["step"] == 3  # stopped after the step that saw the signal
    proc = torchrun(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done, reference = load_checkpoint(out / "last.pt")["model"], load_checkpoint(runs["two"] / "last.pt")["model"]
    assert all(torch.equal(done[k], reference[k]) for k in done)
    for a, b in zip(rows(out), rows(runs["two"]), strict=True):  # the loss sums were added in another order
        assert a.pop("loss") == pytest.approx(b.pop("loss"), rel=1e-6)
        exit_a, exit_b = a.pop("exit_loss"), b.pop("exit_loss")  # so were the per-exit loss sums
        assert [x is None for x in exit_a] == [x is None for x in exit_b]
        assert [x for x in exit_a if x is not None] == pytest.approx([x for x in exit_b if x is not None], rel=1e-6)
        assert a == b


PIPELINE = {"label": "t", "seeds": [0],
            "datasets": [{"name": "cifar10", "ratios": [100], "resources": {"train": {"gpu": 2, "runtime": 5}}}],
            "methods": {"ce": {"tables": ["II"], "exits": False, "run": {"loss": {"name": "ce", "har": False}}}},
            "t_search": {"seeds": [0]},
            "run_overrides": {"train": {"epochs": 2, "batch_size": 8, "device": "cpu", "log_every": 5}},
            "resources": {kind: {"runtime": 10, "mem_mb": 1000, "cpus": 1, "gpu": 0}
                          for kind in ("split", "train", "evaluate", "report")}}
JOB = """
import json, sys
from har.pipeline import grid, jobs
cfg = json.loads(sys.argv[1])
jobs.train_run(cfg, grid.final_runs(cfg)[0], "b.npz", None, "train.json", processes=2)
"""


def test_a_pipeline_train_job_with_several_gpus_trains_under_torchrun_and_survives_slurms_warning(tmp_path):
    from har.config import DataConfig
    from har.data.build import write_bundle
    from har.pipeline import grid

    spec = grid.final_runs(PIPELINE)[0]
    assert grid.run_resources(PIPELINE, spec, "train") == {"runtime": 5, "mem_mb": 1000, "cpus": 1, "gpu": 2}
    assert grid.run_resources(PIPELINE, spec, "evaluate")["gpu"] == 0
    write_bundle(synthetic_data(counts=(160, 48, 16)), DataConfig(dataset="cifar10", ratio=100.0), tmp_path / "b.npz")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", JOB, json.dumps(PIPELINE)]
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / spec.run_dir / "last.pt"
    while not checkpoint.exists() and job.poll() is None:  # SLURM's warning once the first epoch is saved
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0 and "SIGTERM received: saved" in stderr, stderr[-3000:]  # forwarded as SIGTERM
    assert not (tmp_path / "train.json").exists()
    saved = load_checkpoint(checkpoint)
    assert saved["epoch"] == 0 and saved["partial"] is not None  # stopped inside epoch 1, with a checkpoint
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr
    marker = json.loads((tmp_path / "train.json").read_text())
    assert marker["epochs"] == 2 and [r["epoch"] for r in rows(tmp_path / spec.run_dir)] == [0, 1]
