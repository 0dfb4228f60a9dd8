"""Table II check on one GPU: CE+DRW, HAR(CE)+DRW, LDAM+DRW and HAR(LDAM)+DRW on CIFAR-10-LT at imbalance 100,
3 seeds each (12 runs of 200 epochs), trained as packs, evaluated, and printed beside the paper's Table II.

Sized for one H100 or H200 within 10 minutes, start-up and compiling included, on a machine with no network: the
data come from a bundle written here by `har export-data` and carried along. The runs are the pipeline's own
(`har.pipeline.grid.run_config` from `config.yaml`: fixed t = 0.9 and 2.0 / C, fp32, the paper's schedule), so
they are the runs behind the pipeline's Table II cells. Members of one shape share a pack (`har.engine.pack`);
bare baselines and HAR models differ in layout, CE and LDAM in classifier, so the 12 runs make 4 packs of 3, each
trained in its own process, all at once on the device; each process then evaluates its runs
(`evaluate_run`, s chosen at the paper's savings as the pipeline's evaluation jobs choose it). The report is the
pipeline's: Table II and the fidelity report (ours mean ± std over seeds against the paper under its verdict rule,
and HAR minus its baseline, seed by seed), then the wall times.

    har export-data --config config/runs/cifar10_lt100_har_ldam_drw.yaml --out .carry/cifar10-lt100.npz.xz
    python benchmarks/gpu_check.py --bundle .carry/cifar10-lt100.npz.xz --out OUT --deadline 560

On CUDA the packs use `train.compile: reduce-overhead` (CUDA graphs) unless `--compile` says otherwise; a pack
whose process fails while compiled is started once more eagerly (it resumes from its last checkpoint), and the
output says so. At `--deadline` the packs are stopped (SIGTERM: each saves a mid-epoch checkpoint) and the report
says how far they got; the same command resumes them. On the CPU (`--device cpu`, with `--epochs 1` and small
`data.train_fraction` / `data.eval_fraction`) it is a smoke test of the script, whose numbers judge nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE_CONFIG = REPO / "config.yaml"
METHODS = ("ce_drw", "har_ce_drw", "ldam_drw", "har_ldam_drw")  # Table II's HAR rows and their baselines
DATASET, RATIO = "cifar10", 100.0
STOPPED = 75  # a pack stopped by a signal after saving its checkpoints (har.engine.signals.EXIT_TEMPFAIL)


def check_config(args: argparse.Namespace) -> dict:
    """`config.yaml` cut to CIFAR-10-LT-100, Table II, the methods and seeds asked for; labelled not the paper's
    setting when the schedule or any field is changed."""
    from har.errors import ConfigError
    from har.pipeline import grid

    cfg = yaml.safe_load(PIPELINE_CONFIG.read_text())
    grid.check_config(cfg)
    unknown = [m for m in args.methods if m not in cfg["methods"]]
    if unknown:
        raise ConfigError(f"--methods: {unknown} are not methods of {PIPELINE_CONFIG}")
    cfg["datasets"] = [{"name": DATASET, "ratios": [RATIO], "tables": ["II"]}]
    cfg["methods"] = {m: cfg["methods"][m] for m in args.methods}
    cfg["seeds"] = list(args.seeds)
    cfg.pop("layouts", None)  # Table V is not checked here
    changes = ([f"{args.epochs} epochs"] if args.epochs is not None else []) + list(args.set)
    if changes:
        cfg["label"] = f"GPU check with {', '.join(changes)} (not the paper's setting)"
    return cfg


def shorten(values: dict, epochs: int) -> None:
    """The schedule of `values` scaled to `epochs`: DRW's start, the lr milestones and the warm-up in proportion."""
    t = values["train"]
    full = t["epochs"]
    t["lr_milestones"] = [m * epochs // full for m in t["lr_milestones"]]
    t["warmup_epochs"] = t["warmup_epochs"] * epochs // full
    values["loss"]["drw_epoch"] = values["loss"]["drw_epoch"] * epochs // full
    t["epochs"] = epochs


@dataclass
class Pack:
    """One pack: its members (grid specs, run configs) and its process."""

    index: int
    members: list[tuple[Any, Any]]  # (grid.RunSpec, RunConfig)
    file: Path
    log: Path
    proc: subprocess.Popen | None = None
    launched: float = 0.0
    ended: float | None = None
    eager_retry: bool = False


def plan(cfg: dict, args: argparse.Namespace, out: Path, compile_mode: str) -> list[Pack]:
    """Every run of the check, grouped into packs by `pack_shape`, each pack's member file written."""
    from har.config import dump_config, from_dict, set_override
    from har.engine.membership import pack_shape
    from har.pipeline import grid

    groups: dict[str, list[tuple[Any, Any]]] = {}
    for method in args.methods:
        for seed in args.seeds:
            spec = grid.RunSpec(DATASET, RATIO, method, seed)
            values = grid.run_config(cfg, spec)
            if args.bundle:
                values["data"]["bundle"] = str(Path(args.bundle).resolve())
            values["train"].update(device=args.device, compile=compile_mode)
            if args.epochs is not None:
                shorten(values, args.epochs)
            for assignment in args.set:
                set_override(values, assignment)
            run_cfg = from_dict(values)
            groups.setdefault(json.dumps(pack_shape(run_cfg), sort_keys=True), []).append((spec, run_cfg))
    packs = []
    folder = out / "packs"
    folder.mkdir(parents=True, exist_ok=True)
    for index, members in enumerate(groups.values()):
        entries = []
        for spec, run_cfg in members:
            config = folder / f"{spec.method}-seed{spec.seed}.yaml"
            config.write_text(dump_config(run_cfg))
            entries.append({"config": str(config), "run_dir": str(out / spec.run_dir),
                            "target_savings": grid.target_savings(cfg, spec)})
        file = folder / f"pack{index}.json"
        file.write_text(json.dumps({"members": entries, "device": args.device, "threads": args.threads}, indent=1))
        packs.append(Pack(index, members, file, folder / f"pack{index}.log"))
    return packs


def launch(pack: Pack, eager: bool = False) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(pack.file)]
    if eager:
        command.append("--eager")
    log = open(pack.log, "a")  # noqa: SIM115 - closed with the process
    pack.proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    pack.launched, pack.ended, pack.eager_retry = time.time(), None, eager


def run_packs(packs: list[Pack], args: argparse.Namespace, began: float, compiled: bool) -> bool:
    """Run the packs, at most `--processes` at a time; True when the deadline stopped them."""
    waiting, running = list(packs), []
    stopped = False
    while waiting or running:
        while waiting and len(running) < (args.processes or len(packs)) and not stopped:
            pack = waiting.pop(0)
            launch(pack)
            running.append(pack)
        if not stopped and args.deadline and time.time() - began > args.deadline:
            print(f"deadline of {args.deadline:g} s reached: stopping {len(running)} pack(s); they save their "
                  f"checkpoints, and the same command resumes them", flush=True)
            for pack in running:
                pack.proc.send_signal(signal.SIGTERM)
            stopped, waiting = True, []
        for pack in list(running):
            code = pack.proc.poll()
            if code is None:
                continue
            running.remove(pack)
            pack.ended = time.time()
            if code not in (0, STOPPED) and compiled and not pack.eager_retry and not stopped:
                print(f"pack {pack.index} failed compiled (exit {code}; see {pack.log}); starting it again eagerly "
                      f"(it resumes from its checkpoints)", flush=True)
                launch(pack, eager=True)
                running.append(pack)
        time.sleep(0.5)
    return stopped


def worker(pack_file: Path, eager: bool) -> int:
    """One pack's process: train its members together, then evaluate each; its timings beside the pack file."""
    started = time.time()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from har.config import load_config
    from har.data.build import build_data
    from har.engine.pack import train_pack
    from har.engine.signals import TrainingInterrupted
    from har.evaluation.evaluate import evaluate_run
    from har.run.folder import read_history

    spec = json.loads(pack_file.read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    overrides = ["train.compile=off"] if eager else []
    members = [(load_config(m["config"], overrides), Path(m["run_dir"])) for m in spec["members"]]
    data = build_data(members[0][0].data)
    data_ready = time.time()
    done_before = len(read_history(members[0][1]))  # epochs an earlier attempt trained
    try:
        histories = train_pack(members, data)
    except TrainingInterrupted:
        return STOPPED
    trained = time.time()
    for entry in spec["members"]:
        evaluate_run(entry["run_dir"], device=spec["device"], data=data, target_savings=entry["target_savings"])
    timing = {"started": started, "data_ready": data_ready, "trained": trained, "evaluated": time.time(),
              "epoch_seconds": [row["seconds"] for row in histories[0][done_before:]], "eager": eager,
              "train_images": len(data.train)}
    pack_file.with_suffix(".timing.json").write_text(json.dumps(timing, indent=1))
    return 0


def compile_estimate(epoch_seconds: list[float]) -> float | None:
    """Compiling's share of the first epoch: its time minus the median of the others (None: one epoch only)."""
    if len(epoch_seconds) < 2:
        return None
    return max(0.0, epoch_seconds[0] - statistics.median(epoch_seconds[1:]))


def report(packs: list[Pack], cfg: dict, out: Path, began: float, device_name: str) -> dict:
    """The wall times, Table II and the fidelity report of the finished runs."""
    from har.pipeline import grid
    from har.published import load_published
    from har.reporting.fidelity import write_fidelity
    from har.reporting.render import to_markdown
    from har.reporting.results import load_results
    from har.reporting.tables import make_tables

    timings, finished = [], []
    print("\n| pack | runs | exit | start-up s | compile s (est.) | training s | evaluation s | epoch s (median) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for pack in packs:
        names = ", ".join(f"{spec.method}/{spec.seed}" for spec, _ in pack.members)
        code = pack.proc.returncode if pack.proc else None
        path = pack.file.with_suffix(".timing.json")
        if code != 0 or not path.exists():
            print(f"| {pack.index} | {names} | {code} | - | - | - | - | - |")
            continue
        t = json.loads(path.read_text())
        epochs = t["epoch_seconds"]
        compiling = compile_estimate(epochs)
        row = {"pack": pack.index, "runs": names, "eager_retry": pack.eager_retry,
               "startup_s": t["data_ready"] - pack.launched, "compile_s": compiling,
               "training_s": t["trained"] - t["data_ready"], "evaluation_s": t["evaluated"] - t["trained"],
               "median_epoch_s": statistics.median(epochs) if epochs else None, "epochs_trained": len(epochs),
               "images": len(pack.members) * len(epochs) * t["train_images"], "data_ready": t["data_ready"],
               "trained": t["trained"]}
        timings.append(row)
        finished += [spec for spec, _ in pack.members]
        median = "-" if row["median_epoch_s"] is None else f"{row['median_epoch_s']:.2f}"
        print(f"| {pack.index} | {names}{' (eager retry)' if pack.eager_retry else ''} | 0 | {row['startup_s']:.0f} | "
              f"{'-' if compiling is None else f'{compiling:.0f}'} | {row['training_s']:.0f} | "
              f"{row['evaluation_s']:.0f} | {median} |")
    total = time.time() - began
    result: dict[str, Any] = {"device": device_name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "label": cfg["label"], "packs": timings, "wall_s": total}
    images = sum(r["images"] for r in timings)
    if images:
        window = max(r["trained"] for r in timings) - min(r["data_ready"] for r in timings)
        result["training_images_per_s"] = images / window
        print(f"\ntraining throughput over all packs: {result['training_images_per_s']:,.0f} images/s (the images of "
              f"every epoch the members trained in this call, over the time from the first pack's data being ready "
              f"to the last pack's end of training: compiling and per-epoch test passes included)")
    if finished:
        df = load_results([grid.describe(cfg, spec) for spec in finished], out)
        tables = make_tables(df, cfg, {}, load_published())
        print("\n" + to_markdown(next(t for t in tables if t.id == "II")))
        write_fidelity(tables, df, cfg, load_published(), out)
        print((out / "fidelity.md").read_text())
        result["runs"] = json.loads(df.to_json(orient="records"))
    print(f"wall time: {total:.0f} s from start to this report on {device_name} ({result['date']}); {len(finished)} "
          f"of {sum(len(p.members) for p in packs)} runs finished", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return result


def main(args: argparse.Namespace) -> int:
    began = time.time()
    if args.worker:
        return worker(Path(args.worker), args.eager)
    if not args.out:
        raise SystemExit("--out is required")
    import torch

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (smoke test)"
    compile_mode = args.compile or ("reduce-overhead" if args.device == "cuda" else "off")
    cfg = check_config(args)
    packs = plan(cfg, args, out, compile_mode)
    print(f"device: {device_name}  torch {torch.__version__}; {sum(len(p.members) for p in packs)} runs in "
          f"{len(packs)} packs ({', '.join(str(len(p.members)) for p in packs)} members), train.compile="
          f"{compile_mode}; config: {cfg['label']}", flush=True)
    stopped = run_packs(packs, args, began, compile_mode != "off")
    result = report(packs, cfg, out, began, device_name)
    complete = len(result.get("runs", [])) == sum(len(p.members) for p in packs)
    return 0 if complete else (STOPPED if stopped else 1)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None,
                        help="data bundle from `har export-data` (CIFAR-10-LT-100); default: none, the data from "
                             "$HAR_DATA")
    parser.add_argument("--out", default=None, help="folder for the run folders, pack logs, fidelity report and "
                                                    "gpu_check.json (required)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help=f"methods of config.yaml to train (default: {' '.join(METHODS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="a shortened schedule: DRW, lr milestones and warm-up scaled in proportion (default: "
                             "none, the paper's 200 epochs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every run, e.g. data.train_fraction=0.02 (default: none)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu only for a smoke test of this script (default: cuda)")
    parser.add_argument("--compile", choices=["off", "default", "reduce-overhead"],
                        help="train.compile of the packs (default: reduce-overhead on CUDA, off on the CPU)")
    parser.add_argument("--processes", type=int, default=0,
                        help="packs training at once, each in its own process (default: 0, all)")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds after the start at which running packs are stopped with their checkpoints "
                             "saved (default: 0, none)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads per pack process (default: 0, torch's choice)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one pack's process
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
