"""The throughput benchmark runs end to end in a tiny mode and writes every row (its figures are not checked)."""

import importlib.util
import json
import sys

import pytest
import torch
from conftest import REPO, shared_cifar_root

from har.config import from_dict

TINY = ["--steps", "1", "--warmup", "1", "--batch-size", "16", "--workers", "1", "--train-fraction", "0.02",
        "--eval-images", "16", "--eval-batch", "8", "--repeats", "1", "--target-savings", "0.25", "--device", "cpu",
        "--threads", "1"]


def load_benchmark(monkeypatch):
    """benchmarks/ holds scripts, not a package: load the file as a module (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_writes_every_row(tmp_path, monkeypatch):
    root = shared_cifar_root()
    if root is None:
        pytest.skip("no shared CIFAR-10 copy (set HAR_DATA)")
    monkeypatch.setenv("HAR_DATA", str(root))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the shared row's spawned processes import the module
    benchmark = load_benchmark(monkeypatch)
    out = tmp_path / "bench"
    benchmark.main(benchmark.get_args_parser().parse_args([*TINY, "--share", "2", "--out", str(out)]))
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in result["training"]] == ["har-fast", "har-reference", "ce-bare-fast", "har-fast x2"]
    assert all(r["images_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in result["training"])
    assert result["training"][-1]["processes"] == 2
    assert result["speedup_fast_over_reference"] > 0
    rows = result["inference"]["rows"]
    assert rows[-1]["exit_threshold"] == 1.01 and rows[-1]["exit_fractions"][-1] == 1.0
    assert all(r["seconds_per_image"] > 0 and sum(r["exit_fractions"]) == pytest.approx(1.0) for r in rows)
    assert result["inference"]["static_seconds_per_image"] > 0
    assert (tmp_path / "bench.md").read_text().startswith("# har throughput benchmark")


def test_a_failing_process_of_a_shared_row_ends_the_benchmark_with_its_reason(monkeypatch):
    """No hang: the parent reports the child's error and stops the others (here CUDA, absent on this machine)."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where asking for it fails")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    benchmark = load_benchmark(monkeypatch)
    args = benchmark.get_args_parser().parse_args([*TINY, "--share", "2", "--device", "cuda"])
    variant = benchmark.VARIANTS[0]
    with pytest.raises(SystemExit, match="failed: RunError: train.device is 'cuda' but CUDA is not available"):
        benchmark.time_shared(variant, from_dict({}), torch.device("cpu"), args)
