"""The benchmarks run end to end in a tiny mode and write every row (their figures are not checked)."""

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


def test_pack_kernels_times_every_row_and_the_fused_layer_equals_the_separate_ones(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("pack_kernels", REPO / "benchmarks" / "pack_kernels.py")
    pack = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, pack)
    spec.loader.exec_module(pack)
    tiny = ["--device", "cpu", "--ks", "1", "2", "--batch", "2", "--steps", "1", "--warmup", "1", "--repeats", "1",
            "--threads", "1", "--out", str(tmp_path / "pack")]
    pack.main(pack.get_args_parser().parse_args(tiny))
    result = json.loads((tmp_path / "pack.json").read_text())
    rows = {(r["channels"], r["k"], r["variant"]): r for r in result["rows"]}
    assert len(result["rows"]) == 12 and not any(r["cuda_graph"] for r in result["rows"])  # no graphs on the CPU
    assert set(rows) == {(c, k, v) for c, _ in pack.STAGES for k in (1, 2) for v in ("grouped", "separate")}
    assert all(r["ms_per_step"] > 0 and r["run_images_per_s"] > 0 and r["tflops"] > 0 for r in rows.values())
    assert len(result["speedups"]) == 6 and all(s["grouped_over_separate"] > 0 for s in result["speedups"])
    assert result["fused_agrees"] and len(result["check"]) == 3
    assert all(c["k"] == 2 and c["output"] < 1e-9 and c["input_grad"] < 1e-9 for c in result["check"])
    assert (tmp_path / "pack.md").read_text().startswith("# har pack kernels")
    fuse = pack.fuse  # the check can fail: a fused layer with the runs in the wrong channel blocks is caught
    monkeypatch.setattr(pack, "fuse", lambda layers: fuse(layers[::-1]))
    assert pack.check_fused(16, 4, 2, 2, seed=0)["output"] > 1e-3


def test_early_exit_benchmark_writes_a_row_per_regime(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports pack_kernels' machine description
    spec = importlib.util.spec_from_file_location("early_exit", REPO / "benchmarks" / "early_exit.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    tiny = ["--device", "cpu", "--threads", "1", "--data", "generated", "--images", "12", "--latency-images", "2",
            "--chunk", "8", "--resnet50-images", "3", "--resnet50-latency-images", "1", "--resnet50-chunk", "2",
            "--resnet50-side", "32", "--repeats", "1", "--target-savings", "0.2", "5.0", "--out", str(tmp_path / "ee")]
    bench.main(bench.get_args_parser().parse_args(tiny))
    result = json.loads((tmp_path / "ee.json").read_text())
    assert [m["name"] for m in result["models"]] == ["ResNet-32 (CEBEBEBE)", "ResNet-50 (CEBEBEBEBE)"]
    text = (tmp_path / "ee.md").read_text()
    assert text.startswith("# har early exit")
    for model in result["models"]:
        assert model["unreachable_targets"] == [5.0] and not model["cuda_graphs"]
        assert [r["target_savings"] for r in model["rows"]] == [[0.2], []]  # the chosen s, then s = 1.01
        assert model["rows"][-1]["exit_threshold"] == 1.01 and model["rows"][-1]["exit_fractions"][-1] == 1.0
        for row in model["rows"]:
            assert sum(row["exit_fractions"]) == pytest.approx(1.0)
            assert row["chunked_differs"]["of"] == model["images"] and row["batch_one_differs"]["of"] > 0
        table = text.split(f"## {model['name']}")[1].split("\n## ")[0]
        regimes = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
        assert regimes == ["| regime", "| static backbone", "| early exit", "| early exit"]
