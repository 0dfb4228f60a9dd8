"""The reference runs as the project ships them: finished runs, and the checkpoints of unfinished ones.

`results/reference/` holds `runs/<split>/<method>/seed<k>/` for every finished run (resolved config and hash,
`metrics.jsonl`, `machine.jsonl`, `train.json`, `eval/*.json|npz` and `last.pt` reduced to the trained weights) and
`checkpoints/<split>/<method>/seed<k>/` for every run still training (its whole `last.pt`: weights, optimiser,
schedule, RNG states, mid-epoch progress; with its config, metrics and machine records). A set outlives the machine it
started on: `save` copies a working folder's runs here (to be committed), `restore` brings the checkpoints into a new
working folder, where training resumes exactly where it stopped. Only `runs/` is ever read as a result. It stands on
the pipeline (grid, split bundles) and on reporting (the rebuilt tables and figures), so it sits above both, beside
the CLI.

    python -m har.reference save --from ../har-reference/code      # what trained there, into results/
    python -m har.reference restore --into ../har-reference/code   # checkpoints the folder lacks
    python -m har.reference rebuild    # results/reference/tables and figures/reference from runs/
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from snakemake.utils import validate

from har.atomic import atomic_write, atomic_write_text
from har.errors import ResultError, RunError
from har.evaluation.evaluate import evaluate_from_cache
from har.pipeline import grid
from har.pipeline.jobs import build_split
from har.published import load_published
from har.reporting.figures import plot_figures
from har.reporting.report import build_tables
from har.reporting.results import load_results
from har.run.checkpoint import atomic_save
from har.run.folder import CHECKPOINT, CONFIG_HASH, EVAL_DIR, MACHINE, METRICS, PREVIOUS, TRAIN_RECORD
from har.run.folder import CONFIG as RUN_CONFIG

log = logging.getLogger(__name__)

REFERENCE = Path("results/reference")
CONFIG = Path("config/reference.yaml")
FIGURES = Path("figures/reference")
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
RUNS, CHECKPOINTS = "runs", "checkpoints"
RUN_FILES = (RUN_CONFIG, CONFIG_HASH, METRICS, MACHINE)  # beside the checkpoint, in both kinds of folder
FINISHED_FILES = (TRAIN_RECORD,)  # the pipeline's marker, with eval/ (whole)
WEIGHTS_KEYS = ("model", "epoch", "config_sha256", "config")  # what a finished run's last.pt keeps


@dataclass(frozen=True)
class RunState:
    """A run folder's progress: the last finished epoch of its checkpoint (-1: none) out of its epochs."""

    epoch: int
    epochs: int
    evaluated: bool

    @property
    def finished(self) -> bool:
        return self.epoch + 1 >= self.epochs and self.evaluated


def run_state(run_dir: Path) -> RunState:
    """A run folder's progress, from its checkpoint and resolved config."""
    cfg = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    epochs = int(cfg["train"]["epochs"])
    ckpt = run_dir / CHECKPOINT
    epoch = int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"]) if ckpt.exists() else -1
    evaluated = (run_dir / EVAL_DIR / "test.json").exists() and (run_dir / TRAIN_RECORD).exists()
    return RunState(epoch, epochs, evaluated)


def run_folders(root: Path) -> list[Path]:
    """Run folders (`<split>/<method>/seed<k>`, holding a config.yaml) under `root`, sorted."""
    return sorted(p.parent for p in root.glob(f"*/*/seed*/{RUN_CONFIG}")) if root.exists() else []


def save(work: Path, reference: Path = REFERENCE) -> list[str]:
    """Copy the runs of a working folder (`<work>/results/runs`) into `reference`: finished ones to `runs/` with
    their weights only, the others' whole checkpoints to `checkpoints/`. Returns one line per run saved."""
    lines = []
    source_root = work / "results" / "runs"
    for src in run_folders(source_root):
        rel = src.relative_to(source_root)
        state = run_state(src)
        if state.epoch < 0:
            continue
        if state.finished:
            dest = reference / RUNS / rel
            if _same_finished_run(src, dest):  # saved before: its reports may have been re-evaluated since
                lines.append(f"{rel}: finished, already saved in {dest}")
                continue
            _copy_files(src, dest, RUN_FILES + FINISHED_FILES)
            shutil.copytree(src / EVAL_DIR, dest / EVAL_DIR, dirs_exist_ok=True)
            ckpt = torch.load(src / CHECKPOINT, map_location="cpu", weights_only=False)
            atomic_save({k: ckpt[k] for k in WEIGHTS_KEYS}, dest / CHECKPOINT)
            _remove(reference / CHECKPOINTS, rel)  # its checkpoint is no longer needed
            lines.append(f"{rel}: finished, weights and evaluation in {dest}")
        else:
            dest = reference / CHECKPOINTS / rel
            _copy_run(src, dest)
            copied = run_state(dest)  # the run may be training on: what it reached when the copy read it
            lines.append(f"{rel}: epoch {copied.epoch + 1} of {copied.epochs}, checkpoint in {dest}")
    return lines


def _same_finished_run(src: Path, dest: Path) -> bool:
    """Whether `dest` already holds the finished run `src` (same config hash): a finished run does not change, and
    `rebuild` re-evaluates the saved copy's reports from its cache with the current code, which a second copy from
    the training clone would undo."""
    marker, digest = dest / TRAIN_RECORD, dest / CONFIG_HASH
    return marker.exists() and digest.exists() and digest.read_text() == (src / CONFIG_HASH).read_text()


def restore(work: Path, reference: Path = REFERENCE) -> list[str]:
    """Bring each saved checkpoint into the working folder where that run is missing or behind it, so that training
    there resumes from the newest point any machine reached. Returns one line per run restored."""
    lines = []
    source_root = reference / CHECKPOINTS
    for src in run_folders(source_root):
        rel = src.relative_to(source_root)
        dest = work / "results" / "runs" / rel
        saved = run_state(src).epoch
        here = run_state(dest).epoch if (dest / RUN_CONFIG).exists() else -1
        if here >= saved:
            continue
        hashes = [(d / CONFIG_HASH).read_text() for d in (src, dest) if (d / CONFIG_HASH).exists()]
        if len(set(hashes)) > 1:
            raise RunError(f"{dest} holds a run of another config than the checkpoint in {src}; move it aside first")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / PREVIOUS).unlink(missing_ok=True)  # older than the checkpoint brought in
        _copy_run(src, dest)
        lines.append(f"{rel}: restored at epoch {saved + 1} (was {here + 1})")
    return lines


def rebuild(config: Path = CONFIG, reference: Path = REFERENCE, tables: Path = REFERENCE / "tables",
            figures: Path = FIGURES, splits: Path = Path("results/splits")) -> list[str]:
    """Tables, fidelity report and figures of the finished runs under `reference/runs`, through the pipeline's own
    aggregation (`build_tables`, `plot_figures`) on the records `config` gives them; runs not there yet are left
    out (each table line says its n). A folder there holding an unfinished run is refused by name. Every run's
    `eval/*.json` is first recomputed from its cached outputs (`evaluate_from_cache`), so runs evaluated by an older
    `har` are reported under the current rules. Fig. 7 reads the split's test images from its bundle, cut from the
    data root once (as the pipeline's split job does)."""
    cfg = yaml.safe_load(Path(config).read_text())
    validate(cfg, schema=str(SCHEMA))  # fills the schema's defaults, as the Snakefile's validation does
    grid.check_config(cfg)
    root = reference / RUNS
    for folder in run_folders(root):
        state = run_state(folder)
        if not state.finished:
            raise ResultError(f"{folder} holds an unfinished run (epoch {state.epoch + 1} of {state.epochs}, "
                              f"evaluated: {state.evaluated}); only finished runs belong in {root}: move it to "
                              f"{reference / CHECKPOINTS} (python -m har.reference save does)")
    records, missing = [], []
    for spec in grid.final_runs(cfg):
        folder = root / Path(spec.run_dir).relative_to("results/runs")
        if (folder / RUN_CONFIG).exists():
            evaluate_from_cache(folder, grid.target_savings(cfg, spec))
            records.append(dict(grid.describe(cfg, spec), run_dir=str(folder)))
        else:
            missing.append(spec.run_dir)
    if not records:
        raise ResultError(f"no finished run under {root} matches {config}; train them first (make reference-start)")
    bundles = {}
    for dataset, ratio in grid.splits(cfg):
        split = grid.split_name(dataset, ratio)
        bundle = splits / split / "data.npz"
        if not bundle.exists():
            build_split(cfg, dataset, ratio, bundle, splits / split / "split.json")
        bundles[split] = str(bundle)
    build_tables(load_results(records, "."), cfg, {}, load_published(), tables)
    paths = plot_figures(records, ".", cfg, figures, bundles)
    return ([f"{len(records)} finished runs; not there yet: {', '.join(missing) or 'none'}",
             f"tables in {tables}", f"{len(paths)} figure files in {figures}"])


def _remove(root: Path, rel: Path) -> None:
    """Delete the folder `root / rel` and the parents up to `root` that it leaves empty."""
    shutil.rmtree(root / rel, ignore_errors=True)
    for parent in (root / rel).parents:
        if parent == root.parent or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def _copy_run(src: Path, dest: Path) -> None:
    """Copy an unfinished run's checkpoint and the files beside it (`RUN_FILES`) so that the copy's metrics rows
    always reach its checkpoint's epoch.

    The checkpoint is read first (the trainer replaces it by a rename, so one read is one whole checkpoint), the
    files are copied next (as new as it, or newer when an epoch ends meanwhile) and the checkpoint is written last,
    atomically. Resuming drops the rows past a checkpoint, so neither a run training on during the copy nor a copy
    killed half way leaves a checkpoint without the rows of its epochs.
    """
    checkpoint = (src / CHECKPOINT).read_bytes()
    _copy_files(src, dest, RUN_FILES)
    atomic_write(dest / CHECKPOINT, lambda handle: handle.write(checkpoint))


def _copy_files(src: Path, dest: Path, names: tuple[str, ...]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).exists():
            atomic_write_text(dest / name, (src / name).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("save", help="copy a working folder's runs into results/reference")
    p.add_argument("--from", dest="work", type=Path, required=True, help="the working folder (holding results/runs)")
    p = sub.add_parser("restore", help="bring saved checkpoints into a working folder")
    p.add_argument("--into", dest="work", type=Path, required=True, help="the working folder")
    p = sub.add_parser("rebuild", help="tables and figures of the finished runs")
    p.add_argument("--config", type=Path, default=CONFIG, help=f"default: {CONFIG}")
    for p in sub.choices.values():
        p.add_argument("--reference", type=Path, default=REFERENCE, help=f"default: {REFERENCE}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "rebuild":  # its first line counts the finished runs
        print("\n".join(rebuild(args.config, args.reference, args.reference / "tables")))
        return 0
    lines = (save if args.command == "save" else restore)(args.work, args.reference)
    print("\n".join(lines) if lines else "nothing to do")
    print(json.dumps({"command": args.command, "runs": len(lines)}))  # one line per run saved or restored
    return 0


if __name__ == "__main__":
    sys.exit(main())
