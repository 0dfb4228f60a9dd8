"""GPU check: full 200-epoch CIFAR-10-LT (imbalance 100) runs of HAR(LDAM)+DRW and LDAM+DRW, next to Table II.

Sized for one H100 or H200 within 15 minutes, start-up included, on a machine with no network: the data
come from a bundle written here by `har export-data` and carried along. The two runs share the GPU (one
small ResNet-32 cannot fill it), each in its own process. Before them, a short check confirms that a
training step makes no host-device synchronisation: the number of synchronising calls in an epoch must
not grow with the number of steps.

    har export-data --config config/runs/cifar10_lt100_har_ldam_drw.yaml --out .carry/cifar10-lt100.npz.xz
    python benchmarks/gpu_check.py --bundle .carry/cifar10-lt100.npz.xz --out OUT

On CUDA the runs use `train.compile: reduce-overhead` (CUDA graphs) unless `--compile` says otherwise. The sync
check compiles the same kind of step first: if compiling fails there, the runs train eagerly and the output says so,
rather than both runs dying after the session's device time has been spent on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (run name, config, Table II's published top-1 on CIFAR-10-LT at imbalance 100)
RUNS = [("har-ldam-drw", "config/runs/cifar10_lt100_har_ldam_drw.yaml", 78.1),
        ("ldam-drw", "config/runs/cifar10_lt100_ldam_drw.yaml", 77.0)]


def sync_check(bundle: str, compile_mode: str, steps: tuple[int, int] = (4, 16)) -> dict[int, int]:
    """Synchronising CUDA calls in one training epoch of `steps` batches each; no growth with steps: none per step.

    The step is the HAR run's, built as the trainer builds it (`train.compile` = `compile_mode`); an untimed epoch
    first compiles it (and records its CUDA graphs), so the counted epochs see only steady-state steps; inductor's
    on-disk cache may then spare the HAR run its own compile. Raises what compiling raises.
    """
    import torch

    from har.config import load_config
    from har.data.augment import BatchAugment
    from har.data.build import build_data
    from har.data.loader import TensorBatches
    from har.engine import assembly, trainer
    from har.engine.signals import StopRequest

    cfg = load_config(REPO / RUNS[0][1], [f"data.bundle={bundle}", "train.device=cuda", f"train.log_every={10**9}",
                                          f"train.compile={compile_mode}"])  # the HAR run's own step
    data = build_data(cfg.data)
    device = torch.device("cuda")
    model = assembly.build_model(cfg, data.num_classes).to(device).to(memory_format=torch.channels_last)
    har_loss = assembly.build_loss(cfg, data.class_counts).to(device)
    har_loss.exit_loss.set_weight(torch.ones(data.num_classes, device=device))  # as the trainer's before DRW
    optimizer = assembly.build_optimizer(cfg, model)
    step_loss = assembly.build_step_loss(model, har_loss, model.num_exits, cfg, amp=True)

    def epoch(n: int) -> None:
        images = torch.from_numpy(data.train.images[: n * 128]).to(device)
        labels = torch.from_numpy(data.train.labels[: n * 128]).to(device)
        batches = TensorBatches(images, labels, 128, shuffle=True, augment=BatchAugment(*cfg.data.normalization()),
                                mean=cfg.data.normalization()[0], std=cfg.data.normalization()[1])
        generator = torch.Generator(device=device).manual_seed(0)
        progress = trainer.EpochProgress.begin(batches.order(generator), model.num_exits)
        trainer._train_epoch(step_loss, optimizer, batches, generator, 0, cfg, False, progress, StopRequest())

    epoch(steps[0])  # warm-up: compiling and graph recording synchronise, once
    counts = {}
    for n in steps:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            epoch(n)
            torch.cuda.set_sync_debug_mode("default")
        counts[n] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def launch(name: str, config: str, bundle: str, out: Path, device: str,
           extra: list[str]) -> tuple[subprocess.Popen, float]:
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "har.cli", "run", "--config", str(REPO / config), "--out", str(out / name),
           "--set", f"data.bundle={bundle}", "--set", f"train.device={device}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)"
    print(f"device: {name}  torch {torch.__version__}", flush=True)
    compile_mode = args.compile or ("reduce-overhead" if args.device == "cuda" else "off")
    if args.device == "cuda" and not args.skip_sync_check:
        began = time.perf_counter()
        try:
            counts = sync_check(args.bundle, compile_mode)
        except Exception:  # noqa: BLE001 - a failed compile must not cost the session its full runs
            print(f"train.compile={compile_mode} FAILED on this machine; the runs train eagerly instead:\n"
                  f"{traceback.format_exc()[-3000:]}", flush=True)
            compile_mode = "off"
            counts = sync_check(args.bundle, compile_mode)
        few, many = (counts[n] for n in sorted(counts))
        verdict = "none per step" if many <= few else "PER-STEP SYNCS"
        print(f"synchronising calls per epoch by steps in the epoch (train.compile={compile_mode}): {counts} -> "
              f"{verdict} ({time.perf_counter() - began:.0f} s, compiling included)", flush=True)
    if args.sync_check_only:
        return 0
    print(f"runs: train.compile={compile_mode}", flush=True)
    extra = [x for pair in (("--set", s) for s in [f"train.compile={compile_mode}", *args.set]) for x in pair]
    procs = {name: launch(name, config, args.bundle, out, args.device, extra) for name, config, _ in RUNS}
    ended: dict[str, float] = {}
    while len(ended) < len(procs):  # each run's own end: one finishing first must not wait for the other's
        for name, (proc, _) in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.perf_counter()
        time.sleep(0.5)
    rows = []
    for name, _, paper in RUNS:
        proc, began = procs[name]
        code = proc.returncode
        seconds = ended[name] - began
        report_path = out / name / "eval" / "test.json"
        if code != 0 or not report_path.exists():
            print(f"{name}: FAILED (exit {code}); see {out / (name + '.log')}", flush=True)
            print((out / f"{name}.log").read_text()[-3000:])
            continue
        test = json.loads(report_path.read_text())
        best = test["dynamic_selected"]["best"]
        rows.append({"run": name, "paper_top1": paper, "top1": 100 * test["static"]["top1"],
                     "many": test["static"]["shot"]["many"], "medium": test["static"]["shot"]["medium"],
                     "few": test["static"]["shot"]["few"], "dynamic_top1": 100 * best["top1"],
                     "dynamic_s": best["exit_threshold"], "dynamic_saving": best["saving"],
                     "wall_seconds": seconds})
    print("\n| run | Table II top-1 | ours: static top-1 | many / medium / few | dynamic (s on val) | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        shots = " / ".join("-" if r[k] is None else f"{100 * r[k]:.1f}" for k in ("many", "medium", "few"))
        print(f"| {r['run']} | {r['paper_top1']:.1f} | {r['top1']:.2f} | {shots} | {r['dynamic_top1']:.2f} at "
              f"s={r['dynamic_s']:.3f}, saving {100 * r['dynamic_saving']:+.1f}% | {r['wall_seconds']:.0f} s |")
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if len(rows) == len(RUNS) else 1


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="data bundle from `har export-data` (CIFAR-10-LT-100)")
    parser.add_argument("--out", required=True, help="folder for the run folders, logs and gpu_check.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both runs, e.g. train.epochs=2 for a dry run (default: none)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu only for a dry run of this script (default: cuda)")
    parser.add_argument("--compile", choices=["off", "default", "reduce-overhead"],
                        help="train.compile of the sync check and both runs; if compiling fails in the sync check, the "
                             "runs train eagerly (default: reduce-overhead on CUDA, off on the CPU)")
    parser.add_argument("--sync-check-only", action="store_true", help="stop after the sync check (default: off)")
    parser.add_argument("--skip-sync-check", action="store_true", help="skip the host-sync check (default: run it)")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
