"""The benchmarks run end to end in a tiny mode and write every row (their figures are not checked)."""

import argparse
import importlib.util
import json
import math
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from conftest import REPO, shared_cifar_root, synthetic_data

from har.config import from_dict
from har.engine.trainer import train
from har.errors import ResultError
from har.evaluation.dynamic import READINGS
from har.evaluation.evaluate import evaluate_run
from har.losses.exit_losses import LDAMLoss
from har.reporting.results import target_label

TINY = ["--steps", "1", "--warmup", "1", "--batch-size", "16", "--workers", "1", "--train-fraction", "0.02",
        "--eval-images", "16", "--eval-batch", "8", "--repeats", "1", "--target-savings", "0.25", "--device", "cpu",
        "--threads", "1"]


def load_benchmark(monkeypatch, name="throughput"):
    """benchmarks/ holds scripts, not a package: load the file as a module (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
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
    benchmark.main(benchmark.get_args_parser().parse_args([*TINY, "--packs", "2", "--pack-executors", "fused",
                                                           "serial", "--share", "2", "--peak-gbps", "100",
                                                           "--out", str(out)]))
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in result["training"]] == ["har-fast", "har-reference", "ce-bare-fast",
                                                          "har-pack2-fused", "har-pack2-serial", "har-fast x2"]
    assert all(r["images_per_s"] > 0 and r["x_reference"] > 0 and r["tflops"] > 0 for r in result["training"])
    assert all(r["bound_min_images_per_s"] > r["bound_unfused_images_per_s"] > 0 for r in result["training"])
    assert all(r["x_compiled"] is None and r["share_peak_flops"] is None for r in result["training"])  # none given
    *packs, shared = result["training"][-3:]
    assert [p["executor"] for p in packs] == ["fused", "serial"]
    for pack in packs:
        assert pack["members"] == 2 and len(pack["block_images_per_s"]) == 1  # one timed step: one round
        assert pack["cost"] == result["training"][0]["cost"]  # per image, a member costs what its single run costs
    assert shared["processes"] == 2 and shared["peak_memory_mib"] > 0
    assert result["speedup_fast_over_reference"] > 0
    rows = result["inference"]["rows"]
    assert rows[-1]["exit_threshold"] == 1.01 and rows[-1]["exit_fractions"][-1] == 1.0
    assert all(r["seconds_per_image"] > 0 and sum(r["exit_fractions"]) == pytest.approx(1.0) for r in rows)
    assert result["inference"]["static_seconds_per_image"] > 0
    text = (tmp_path / "bench.md").read_text()
    assert text.startswith("# har throughput benchmark") and "| har-pack2-serial |" in text
    assert "bandwidth bound" in text


def test_a_failing_process_of_a_shared_row_ends_the_benchmark_with_its_reason(monkeypatch):
    """No hang: the parent reports the child's error and stops the others (here CUDA, absent on this machine)."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where asking for it fails")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    benchmark = load_benchmark(monkeypatch)
    args = benchmark.get_args_parser().parse_args([*TINY, "--share", "2", "--device", "cuda"])
    variant = benchmark.VARIANTS[0]
    with pytest.raises(SystemExit, match="failed: RunError: train.device is 'cuda' but CUDA is not available"):
        benchmark.time_shared(variant, from_dict({}), torch.device("cpu"), args, 2)


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


EARLY_EXIT_TINY = ["--device", "cpu", "--threads", "1", "--data", "generated", "--images", "12", "--latency-images",
                   "2", "--chunk", "8", "--resnet50-images", "3", "--resnet50-latency-images", "1", "--resnet50-chunk",
                   "2", "--resnet50-side", "32", "--repeats", "1"]


def load_early_exit(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports pack_kernels' machine description
    spec = importlib.util.spec_from_file_location("early_exit", REPO / "benchmarks" / "early_exit.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    return bench


def test_early_exit_benchmark_writes_a_row_per_regime(tmp_path, monkeypatch):
    bench = load_early_exit(monkeypatch)
    tiny = [*EARLY_EXIT_TINY, "--target-savings", "0.2", "5.0", "--out", str(tmp_path / "ee")]
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


def test_early_exit_benchmark_times_a_trained_run_named_by_what_it_is(tmp_path, monkeypatch):
    """--run: the run's own weights (its classifier has its dataset's classes, 100 here), named in the result by
    the folder's last three parts, its epoch and config hash, not by the (scratch) path."""
    from conftest import synthetic_data
    from test_train import tiny_config

    from har.config import config_hash
    from har.engine.trainer import train

    cfg = tiny_config(data={"dataset": "cifar100"}, train={"epochs": 1, "lr_milestones": []})
    run = tmp_path / "scratch" / "cifar100-r100" / "har_ce" / "seed0"
    train(cfg, run, data=synthetic_data(counts=(3,) * 50 + (2,) * 50, per_class_eval=1))
    bench = load_early_exit(monkeypatch)
    bench.main(bench.get_args_parser().parse_args([*EARLY_EXIT_TINY, "--run", str(run), "--target-savings", "0.2",
                                                   "--out", str(tmp_path / "ee")]))
    weights = json.loads((tmp_path / "ee.json").read_text())["models"][0]["weights"]
    assert weights == f"run 'cifar100-r100/har_ce/seed0' (last.pt: epoch 0, config sha256 {config_hash(cfg)[:12]})"
    assert "scratch" not in (tmp_path / "ee.md").read_text().split("## ResNet-32")[1]


def test_blocks_split_the_timed_steps_into_rounds(monkeypatch):
    blocks = load_benchmark(monkeypatch).blocks
    assert blocks(5, 3) == [2, 2, 1] and blocks(2, 3) == [1, 1] and blocks(6, 1) == [6]


def test_gpu_check_smoke_trains_packs_evaluates_and_prints_the_fidelity_lines(tmp_path, monkeypatch, capsys):
    """The Table II check on the CPU: 2 methods x 2 seeds, 1 epoch on 2% of the data, as 2 packs of 2 in their own
    processes; the report's lines are there (their values judge nothing: a smoke test). The packs take what CUDA
    would (fused, channels-last, bf16 autocast), as far as a CPU can follow (eager: no CUDA graphs)."""
    root = shared_cifar_root()
    if root is None:
        pytest.skip("no shared CIFAR-10 copy (set HAR_DATA)")
    monkeypatch.setenv("HAR_DATA", str(root))
    check = load_benchmark(monkeypatch, "gpu_check")
    args = ["--device", "cpu", "--methods", "ce_drw", "har_ce_drw", "--seeds", "0", "1", "--epochs", "1",
            "--set", "data.train_fraction=0.02", "--set", "data.eval_fraction=0.05", "--threads", "1",
            "--set", "train.pack_executor=fused", "--set", "train.channels_last=true", "--set", "train.amp=true",
            "--out", str(tmp_path)]
    assert check.main(check.get_args_parser().parse_args(args)) == 0
    printed = capsys.readouterr().out
    assert "4 runs in 2 packs (2, 2 members)" in printed and "not the paper's setting" in printed
    dynamic = [f"| II | cifar10-r100 | HAR(CE)+DRW | {target_label(0.32, reading)}" for reading in READINGS]
    for line in ("**Table II.**", "**Fidelity report.**", "| II | cifar10-r100 | CE+DRW | static | top-1 |", *dynamic,
                 "| II | cifar10-r100 | HAR(CE)+DRW - CE+DRW |", "training throughput over all packs:", "wall time:"):
        assert line in printed, line
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(result["runs"]) == 4 and [len(p["runs"].split(", ")) for p in result["packs"]] == [2, 2]
    assert all((tmp_path / r["run_dir"] / "eval" / "test.json").is_file() for r in result["runs"])


def test_table_ii_run_configs_train_what_the_pipeline_trains():
    """config/runs/cifar10_lt100_*.yaml (single runs by hand) and the grid's runs of config.yaml (the pipeline and
    the GPU check) agree on the model and the loss of Table II's CIFAR-10-LT-100 rows."""
    import yaml

    from har.config import load_config, to_dict
    from har.pipeline import grid
    from har.run.assembly import build_model

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for method in ("ce_drw", "har_ce_drw", "ldam_drw", "har_ldam_drw"):
        ours = load_config(REPO / "config" / "runs" / f"cifar10_lt100_{method}.yaml")
        theirs = from_dict(grid.run_config(cfg, grid.RunSpec("cifar10", 100.0, method, 0)))
        assert to_dict(ours)["loss"] == to_dict(theirs)["loss"], method
        assert (ours.data.dataset, ours.data.ratio) == (theirs.data.dataset, theirs.data.ratio)
        assert str(build_model(ours, 10)) == str(build_model(theirs, 10)), method  # layout None: the default's


def test_ldam_exit_readings_compute_each_confidence_and_the_first_qualifying_exit(monkeypatch):
    """The three readings of an LDAM exit's confidence on cosines with known softmaxes, and the exit each example
    takes: the first exit but the last that is correct with confidence above t, else the last."""
    readings = load_benchmark(monkeypatch, "ldam_exit_readings")
    ldam = LDAMLoss([100, 10], max_margin=0.5, scale=30.0)
    cosines = torch.tensor([[[0.9, -0.9], [0.1, 0.0]], [[0.9, 0.0], [0.0, 0.9]]])  # [exits, N, C]
    labels = torch.tensor([0, 1])
    got = readings.readings(cosines, labels, ldam)
    raw = torch.tensor([[1 / (1 + math.exp(-1.8)), 1 / (1 + math.exp(0.1))],
                        [1 / (1 + math.exp(-0.9)), 1 / (1 + math.exp(-0.9))]])
    assert torch.allclose(got["raw"], raw)
    assert torch.allclose(got["scaled"], torch.tensor([[1 / (1 + math.exp(-54)), 1 / (1 + math.exp(3))],
                                                       [1 / (1 + math.exp(-27)), 1 / (1 + math.exp(-27))]]))
    margin = ldam.margins  # the rare class (1) has the largest margin, 0.5
    assert torch.allclose(got["margin"][1, 1], torch.tensor(1 / (1 + math.exp(-30 * (0.9 - margin[1].item())))))
    correct = cosines.argmax(-1) == labels[None, :]
    # example 0 is right at exit 1 with raw confidence 0.86; example 1 is wrong there and right at the last exit
    assert readings.exit_shares(got["raw"], correct, 0.5) == [0.5, 0.5]
    assert readings.exit_shares(got["raw"], correct, 0.9) == [0.0, 1.0]



@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A two-epoch HAR(CE) run on synthetic data, evaluated at a 10% saving: what per_class.py and run_summary.py
    read (copy it before changing it)."""
    cfg = from_dict({"data": {"dataset": "cifar10"}, "loss": {"name": "ce", "train_threshold": 0.5},
                     "train": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0, "device": "cpu"}})
    run = tmp_path_factory.mktemp("evaluated") / "run"
    data = synthetic_data()
    train(cfg, run, data=data)
    evaluate_run(run, device="cpu", data=data, target_savings=[0.1])
    return run


def _copy_with(run, folder, per_class=None, counts=None):
    """A copy of the evaluated run whose test report says `per_class` accuracies (and `counts`, when given)."""
    shutil.copytree(run, folder)
    path = folder / "eval" / "test.json"
    report = json.loads(path.read_text())
    if per_class is not None:
        report["static"]["per_class"], report["static"]["top1"] = per_class, sum(per_class) / len(per_class)
    if counts is not None:
        report["class_counts"] = counts
    path.write_text(json.dumps(report))
    return folder


def test_per_class_averages_each_methods_seeds_and_refuses_mixed_splits(evaluated_run, tmp_path, monkeypatch):
    per_class = load_benchmark(monkeypatch, "per_class")
    counts = json.loads((evaluated_run / "eval" / "test.json").read_text())["class_counts"]
    assert len(counts) == 3
    folders = [_copy_with(evaluated_run, tmp_path / "ce" / "seed0", [0.9, 0.5, 0.1]),
               _copy_with(evaluated_run, tmp_path / "ce" / "seed1", [0.8, 0.3, 0.1]),
               _copy_with(evaluated_run, tmp_path / "ldam" / "seed0", [0.9, 0.7, 0.2])]
    table, got = per_class.per_class(folders)
    assert got == counts
    assert table.loc["ce", "seeds"] == 2 and table.loc["ldam", "seeds"] == 1
    assert table.loc["ce", "1"] == pytest.approx(40.0) and table.loc["ldam", "1"] == pytest.approx(70.0)
    assert table.loc["ce", "top1"] == pytest.approx(45.0)
    other = _copy_with(evaluated_run, tmp_path / "ce" / "seed2", counts=[*counts, 1])
    with pytest.raises(SystemExit, match="another split"):
        per_class.per_class([*folders, other])
    unevaluated = _copy_with(evaluated_run, tmp_path / "ce" / "seed3")
    (unevaluated / "eval" / "test.json").unlink()
    with pytest.raises(ResultError, match="has no eval/test.json"):
        per_class.per_class([unevaluated])


def test_all_jpeg_copy_replaces_only_the_lossless_training_images(tmp_path, monkeypatch):
    jpeg = load_benchmark(monkeypatch, "cifar_all_jpeg")
    rng = np.random.default_rng(0)
    source = tmp_path / "data" / jpeg.FOLDER
    source.mkdir(parents=True)
    batches = {}
    for name in [*jpeg.TRAIN_FILES, "test_batch"]:  # 3 images per file, R, G, B planes as in the release
        batches[name] = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [0, 1, 2]}
        (source / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    (source / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b", "c"]}))
    lossless = np.zeros(15, dtype=bool)
    lossless[[0, 4, 14]] = True
    np.savez(tmp_path / "data" / "cifar10_provenance.npz", train_lossless=lossless, test_lossless=np.ones(3, bool))
    out = tmp_path / "probe"
    monkeypatch.setattr(sys, "argv", ["cifar_all_jpeg.py", "--data", str(tmp_path / "data"), "--out", str(out)])
    jpeg.main()
    written = np.concatenate([pickle.loads((out / jpeg.FOLDER / name).read_bytes(), encoding="latin1")["data"]
                              for name in jpeg.TRAIN_FILES])
    original = np.concatenate([batches[name]["data"] for name in jpeg.TRAIN_FILES])
    as_image = original.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for i in range(15):
        if lossless[i]:  # replaced by its own JPEG decode, which differs from a random image
            decoded = jpeg.jpeg_decode(as_image[i], 75).transpose(2, 0, 1).reshape(-1)
            assert np.array_equal(written[i], decoded) and not np.array_equal(written[i], original[i])
        else:
            assert np.array_equal(written[i], original[i])
    for name in ("test_batch", "batches.meta"):
        assert (out / jpeg.FOLDER / name).read_bytes() == (source / name).read_bytes()
    assert not (out / f"{jpeg.FOLDER}.partial").exists()
    with pytest.raises(SystemExit, match="exists"):
        jpeg.main()
    np.savez(tmp_path / "data" / "cifar10_provenance.npz", train_lossless=lossless[:9], test_lossless=np.ones(3, bool))
    monkeypatch.setattr(sys, "argv", ["cifar_all_jpeg.py", "--data", str(tmp_path / "data"),
                                      "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="mask has 9 entries, the batches 15"):
        jpeg.main()
    assert not (tmp_path / "x" / jpeg.FOLDER).exists()  # a failed copy is never left where a data root would find it


def test_run_summary_prints_each_number_of_a_har_run_and_averages_exit_shares_over_a_window(evaluated_run, tmp_path,
                                                                                             monkeypatch):
    summary = load_benchmark(monkeypatch, "run_summary")
    run = _copy_with(evaluated_run, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[0]["exit_fraction"], rows[1]["exit_fraction"] = [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]
    rows[0]["train_top1_per_class"], rows[1]["train_top1_per_class"] = [0.5, 0.25, None], [1.0, 0.75, 0.5]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = json.loads((run / "eval" / "test.json").read_text())
    text = "\n".join(summary.summarise(run, [(1, 2), (2, 2)]))
    assert f"static top-1, last epoch: {100 * report['static']['top1']:.2f}" in text
    for key, reading in (("saving>=0.1", "heads counted"), ("saving_trunk>=0.1", "heads not counted")):
        assert f"10% saving, {reading}: {100 * report['dynamic_selected'][key]['top1']:.2f}" in text
    assert "epochs 1-2 (mean): 50.0% / 0.0% / 25.0% / 25.0%" in text
    assert "epochs 2-2 (mean): 0.0% / 0.0% / 50.0% / 50.0%" in text
    assert "epochs 1-2 (mean of 2): 75.0 / 50.0 / 50.0" in text  # a class an epoch did not see: out of its mean
    assert "epochs 2-2 (mean of 1): 100.0 / 75.0 / 50.0" in text
    with pytest.raises(SystemExit, match="no epoch in 3-9"):  # it trained epochs 1 and 2
        summary.summarise(run, [(3, 9)])
    with pytest.raises(argparse.ArgumentTypeError, match="first epoch comes after"):
        summary.window("9-5")
    with pytest.raises(argparse.ArgumentTypeError, match="epochs count from 1"):
        summary.window("0-5")


def test_bf16_convolutions_measures_the_float32_path_at_one_rounding_and_prints_a_row_per_shape(monkeypatch, capsys):
    bench = load_benchmark(monkeypatch, "bf16_convolutions")
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 6, 6), 0.3 * torch.randn(4, 4, 3, 3)
    grad = torch.randn(2, 4, 6, 6).to(torch.bfloat16)
    # one rounding to bf16 errs by at most 2^-8 of each value (about 1.4e-3 of the mean on random data)
    assert all(0 < e < 2.0**-8 for e in bench.errors(x, w, grad, emulated=True))
    monkeypatch.setattr(sys, "argv", ["bf16_convolutions.py", "--batch", "2", "--repeats", "1"])
    bench.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == [f"| {c}, {c}, {s}" for c, _, s in bench.SHAPES]


def _upstream_logs(folder, suffix, epochs, tested, best):
    """A pair of LDAM-DRW logs for one start: two training prints per epoch (the later one an epoch's value), and a
    test block for each of the first `tested` epochs with three classes' accuracy."""
    folder.mkdir(parents=True, exist_ok=True)
    train = "".join(f"Epoch: [{e}][{i}/97], lr: 0.01000\tTime 1.0 (1.0)\tLoss 0.5 (0.5)\t"
                    f"Prec@1 {50 + e + i:.3f} ({40 + e + i / 100:.3f})\tPrec@5 99.0 (99.0)\n"
                    for e in epochs for i in (0, 90))
    test = "".join(f"val Results: Prec@1 {20 + e:.3f} Prec@5 90.000 Loss 2.00000\n"
                   f"val Class Accuracy: [0.{e}00,0.500,0.250]\nBest Prec@1: {best:.3f}\n\n" for e in epochs[:tested])
    (folder / f"log_train{suffix}.csv").write_text(train)
    (folder / f"log_test{suffix}.csv").write_text(test)


def test_upstream_compare_places_each_starts_epochs_and_sets_the_runs_side_by_side(evaluated_run, tmp_path,
                                                                                     monkeypatch):
    compare = load_benchmark(monkeypatch, "upstream_compare")
    logs = tmp_path / "upstream"
    _upstream_logs(logs, ".20261207T100000", [0, 1, 2], tested=2, best=21)  # stopped half way through epoch 2
    _upstream_logs(logs, "", [2, 3, 4], tested=2, best=23)  # resumed at epoch 2, training epoch 4 now
    run = compare.read_upstream(logs)
    assert run.train == {1: 40.9, 2: 41.9, 3: 42.9, 4: 43.9}  # each finished epoch's last running average
    assert run.test == {1: 20.0, 2: 21.0, 3: 22.0, 4: 23.0}  # the resumed start's blocks from its first epoch on
    assert run.classes == pytest.approx([30.0, 50.0, 25.0]) and run.best == 23
    ours = _copy_with(evaluated_run, tmp_path / "ours" / "seed0", per_class=[0.9, 0.5, 0.1])
    rows = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]
    rows[0]["train_top1"], rows[1]["train_top1"], rows[1]["test_top1"] = 0.5, 0.625, 0.75
    (ours / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    both = {ours: compare.read_ours(ours)}
    assert both[ours] == ({1: 50.0, 2: 62.5}, {2: 75.0})
    lines = compare.compare(run, both, every=3)
    assert "| 2 | 41.90 | 62.50 | 21.00 | 75.00 |" in lines  # tested on both sides: shown though not a third epoch
    assert "| 3 | 42.90 | - | 22.00 | - |" in lines and "| 4 | 43.90 | - | 23.00 | - |" in lines  # third, last
    assert not any(line.startswith("| 1 |") for line in lines)
    assert "LDAM-DRW: tested to epoch 4, last 23.00, best 23.00" in lines
    assert "ours: last tested epoch 75.00 (n = 1), best epoch 75.00 (n = 1)" in lines
    table = compare.per_class_lines(run, both)
    assert "| LDAM-DRW, epoch 4 | 30.0 | 50.0 | 25.0 |" in table
    assert "| ours, epoch 2 (mean of 1) | 90.0 | 50.0 | 10.0 |" in table
    (logs / "log_test.csv").write_text((logs / "log_test.csv").read_text() * 2)  # a test block more than epochs
    with pytest.raises(SystemExit, match="4 test results for 3 epochs"):
        compare.read_upstream(logs)
    (logs / "log_test.csv").unlink()
    with pytest.raises(SystemExit, match="has no log_test.csv beside it"):
        compare.read_upstream(logs)
    with pytest.raises(SystemExit, match="holds no log_train.csv"):
        compare.read_upstream(tmp_path)


FAKE_CIFAR_TRAIN = '''
import json, os, sys
import torch
resume = sys.argv[sys.argv.index("--resume") + 1]
state = torch.load(resume, map_location="cuda:0")  # as LDAM-DRW asks for it
os.makedirs("log/store", exist_ok=True)
open("log/store/log_train.csv", "w").close()
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "epoch": state["epoch"], "data": os.path.realpath("data"),
           "cuda": torch.zeros(2).cuda().device.type, "float": torch.cuda.FloatTensor(3).device.type},
          open("seen.json", "w"))
'''


def test_upstream_train_runs_the_script_on_the_cpu_from_its_work_folder_and_keeps_the_earlier_logs(tmp_path,
                                                                                                   monkeypatch):
    wrapper = load_benchmark(monkeypatch, "upstream_train")
    checkout, data, work = tmp_path / "LDAM-DRW", tmp_path / "data", tmp_path / "work"
    checkout.mkdir()
    (checkout / "cifar_train.py").write_text(FAKE_CIFAR_TRAIN)
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (work / "log" / "store").mkdir(parents=True)
    for name in ("log_train.csv", "log_test.csv", "log_test.20260101T000000.csv"):
        (work / "log" / "store" / name).write_text(name)
    torch.save({"epoch": 15}, tmp_path / "ckpt.pth.tar")
    monkeypatch.chdir(tmp_path)  # --resume relative to where the wrapper runs, not to the script's --work
    # the stand-ins replace these for the rest of the process: put them back afterwards
    for owner, name in ((torch.Tensor, "cuda"), (torch.nn.Module, "cuda"), (torch, "load"),
                        (torch.cuda, "FloatTensor"), (torchvision.datasets.cifar, "check_integrity")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    for name in ("tensorboardX", "sklearn", "sklearn.metrics", "sklearn.utils", "sklearn.utils.multiclass"):
        if name not in sys.modules:  # None: imported, it fails as a missing module would, and the stand-in goes
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", ["upstream_train.py", "--ldam-drw", "LDAM-DRW", "--data", "data", "--work",
                                      "work", "--", "--loss_type", "CE", "--resume", "ckpt.pth.tar"])
    assert wrapper.main() == 0
    seen = json.loads((work / "seen.json").read_text())
    assert seen == {"argv": ["--loss_type", "CE", "--resume", str((tmp_path / "ckpt.pth.tar").resolve())],
                    "cwd": str(work.resolve()), "epoch": 15, "data": str(data.resolve()), "cuda": "cpu", "float": "cpu"}
    kept = sorted(p.name for p in (work / "log" / "store").iterdir())
    stamped = [name for name in kept if name.count(".") == 2 and "20260101" not in name]
    assert len(stamped) == 2 and {(work / "log" / "store" / n).read_text() for n in stamped} == {"log_train.csv",
                                                                                                 "log_test.csv"}
    assert (work / "log" / "store" / "log_test.20260101T000000.csv").read_text() == "log_test.20260101T000000.csv"
    assert (work / "log" / "store" / "log_train.csv").read_text() == ""  # the new start's own log
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["upstream_train.py", "--ldam-drw", "LDAM-DRW", "--data", "data", "--work",
                                      "work", "--", "--resume", "missing.pth.tar"])
    with pytest.raises(SystemExit, match="--resume missing.pth.tar: no such checkpoint"):
        wrapper.main()
    monkeypatch.setattr(sys, "argv", ["upstream_train.py", "--ldam-drw", "work", "--data", "data", "--work", "work"])
    with pytest.raises(SystemExit, match="must be a checkout of github.com/kaidic/LDAM-DRW"):
        wrapper.main()
