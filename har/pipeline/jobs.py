"""What each pipeline job does; the Snakemake scripts only unpack their arguments and call these."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import yaml

from har.atomic import atomic_write_json, atomic_write_text
from har.config import RunConfig, config_hash, dump_config, from_dict, stored_config_hash
from har.data.build import build_data, full_splits, write_bundle
from har.engine import pack, trainer
from har.errors import ConfigError, DataError, ResultError, RunError
from har.evaluation import evaluate
from har.pipeline import grid
from har.run import stage_one
from har.run.folder import CONFIG, EVAL_DIR, read_history
from har.run.lock import refuse_if_held


def setup_job(log_file: str | Path | None, threads: int | None = None) -> None:
    """Send a job's stderr and logging to its log file first, and give torch the job's threads."""
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(log_file, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.excepthook = named_error_hook
    if threads:
        import torch

        torch.set_num_threads(threads)


def named_error_hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """A job that stops on a user error (bad config, damaged data or results, a busy folder) ends its log with
    the error's name and message, which say the fix, instead of a traceback; anything else keeps its traceback."""
    if issubclass(kind, (ConfigError, DataError, RunError, ResultError)):
        print(f"har: {kind.__name__}: {exc}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, exc, tb)


def build_split(cfg: dict, dataset: str, ratio: float, bundle: str | Path | None, summary: str | Path) -> None:
    """Prepare one split once, then write its summary. CIFAR: cut the long-tailed split and write the bundle every
    run of the split reads instead of the dataset files. List datasets (no bundle): verify the published lists
    (git blob ids) and that every listed image exists, so no training job starts on missing data."""
    data_cfg = from_dict({"data": grid.split_data(cfg, dataset, ratio)}).data
    if data_cfg.is_list_dataset:
        full = build_data(dataclasses.replace(data_cfg, train_fraction=1.0, eval_fraction=1.0))
        counts = [int(c) for c in full.class_counts]
        facts = {"dataset": dataset, "ratio": max(counts) / min(counts)}  # n_max / n_min of the lists
    else:
        if bundle is None:
            raise ValueError(f"split {grid.split_name(dataset, ratio)}: a CIFAR split needs a bundle path")
        full = full_splits(data_cfg)
        write_bundle(full, data_cfg, bundle)
        facts = {"dataset": dataset, "ratio": ratio, "seed": data_cfg.seed, "val_per_class": data_cfg.val_per_class}
    atomic_write_json(Path(summary), {
        **facts, "classes": full.classes, "class_counts": full.class_counts, "groups": full.groups,
        "sizes": {name: len(full.split(name)) for name in ("train", "val", "test")},
        "val_counts": [int((full.val.labels == c).sum()) for c in range(full.num_classes)]})


def fed_threshold(cfg: dict, spec: grid.RunSpec, selection: dict) -> float:
    """The training threshold of a final run fed by a line search's choice (`select_t`'s record): the chosen t point
    in the run's own units, so that a choice of 2.0/C on ImageNet-LT trains CIFAR-10 at 2.0/10, as the paper reused
    its t."""
    return grid.t_value(cfg, spec.base_method, float(selection["t_point"]), grid.NUM_CLASSES[spec.dataset])


def train_run(cfg: dict, spec: grid.RunSpec, bundle: str | Path | None, selection: str | Path | None,
              marker: str | Path, processes: int = 1) -> None:
    """Train one grid run into its folder, then write the marker that tells Snakemake it is complete.

    CIFAR runs read their split's bundle; list datasets (`bundle` None) read the verified lists and images. A
    decoupled run's config names its stage-one run folder, which the workflow trains first. With `processes` > 1
    (a job given several GPUs) training runs under torchrun, one process per GPU of the job's node, from the
    resolved config written to `<run folder>/launch.yaml`.

    A folder left by another config, or a stage two of an earlier training of its stage one, is moved aside first
    (`set_aside_stale`): Snakemake reruns the job because the config or the stage one changed, and the job then
    trains the run again instead of refusing the folder or resuming a stale checkpoint.
    """
    threshold = fed_threshold(cfg, spec, json.loads(Path(selection).read_text())) if selection else None
    run_cfg = job_run_config(cfg, spec, bundle, threshold)
    set_aside_stale(run_cfg, Path(spec.run_dir))
    if processes > 1:
        launch = Path(spec.run_dir) / "launch.yaml"
        launch.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(launch, dump_config(run_cfg))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "har.cli", "train", "--config", str(launch), "--out", spec.run_dir]
        logging.getLogger(__name__).info("training with %d processes: %s", processes, " ".join(command))
        status = _torchrun(command)
        if status:
            raise SystemExit(status)  # the job fails; its retry resumes from the last checkpoint
        history = read_history(Path(spec.run_dir))
    else:
        history = trainer.train(run_cfg, spec.run_dir)
    atomic_write_json(Path(marker), train_marker(cfg, spec, history))


def job_run_config(cfg: dict, spec: grid.RunSpec, bundle: str | Path | None, threshold: float | None) -> RunConfig:
    """The run config a train job trains: the grid's, with the selected t (when the search feeds the run) and the
    split's bundle (CIFAR)."""
    values = grid.run_config(cfg, spec, threshold)
    if bundle is not None:
        values["data"]["bundle"] = str(bundle)
    return from_dict(values)


def train_marker(cfg: dict, spec: grid.RunSpec, history: list[dict]) -> dict:
    """What a run's `train.json` says (the evaluation waits on it): the run's record, its epochs, the last row."""
    return {"run": grid.describe(cfg, spec), "epochs": len(history), "final": history[-1] if history else None}


def train_pack_job(cfg: dict, members: list[grid.RunSpec], bundle: str | Path | None, selections: list[str],
                   marker: str | Path) -> dict:
    """Train the runs of one pack (`grid.packs`) in one process (`har.engine.pack.train_pack`), then write the
    pack's marker, which holds each member's `train.json` content (or the error it stopped with).

    Each member's config and stale folder are handled as `train_run` handles a single run's; `selections` are the
    files of the t selections the members wait on. A member whose loss turned non-finite stops alone: the job
    still writes the marker, with that member's error, so that the others' markers (`write_member_marker`) and
    evaluations go on, and the failed member's marker job fails naming it. Anything else that stops the pack
    (bad input, a stop signal: exit 75, the retry resumes every member) fails the job without a marker.
    """
    selected = load_selections(selections)
    pairs = []
    for spec in members:
        source = grid.fed_from(cfg, spec)
        chosen = selected.get(source, {}).get(spec.base_method)
        if source is not None and chosen is None:
            raise ValueError(f"{spec.run_dir}: its t comes from results/selection/{source}/{spec.base_method}"
                             f".json, which is not among the pack job's selections {selections}")
        threshold = fed_threshold(cfg, spec, chosen) if source is not None else None
        run_cfg = job_run_config(cfg, spec, bundle, threshold)
        set_aside_stale(run_cfg, Path(spec.run_dir))
        pairs.append((run_cfg, Path(spec.run_dir)))
    try:
        histories: list[list[dict] | None] = list(pack.train_pack(pairs))
        errors: list[str | None] = [None] * len(pairs)
    except pack.MembersStopped as stopped:  # anything else that stops the pack is the job's own failure
        errors = [stopped.errors.get(out) for _, out in pairs]
        histories = [None if error else history for error, history in zip(errors, stopped.histories, strict=True)]
        logging.getLogger(__name__).error("%d of %d pack members stopped; the others finished",
                                          len(stopped.errors), len(pairs))
    result = {"members": [{"run_dir": spec.run_dir, "error": error,
                           "train": None if error else train_marker(cfg, spec, history)}
                          for spec, error, history in zip(members, errors, histories, strict=True)]}
    atomic_write_json(Path(marker), result)
    return result


def write_member_marker(pack_marker: str | Path, run_dir: str, marker: str | Path) -> None:
    """Write a pack member's `train.json` from its pack's marker (the content `train_run` writes for a single
    run); a member that stopped in its pack is a RunError naming its error and how to train it again."""
    entry = next((m for m in json.loads(Path(pack_marker).read_text())["members"] if m["run_dir"] == run_dir), None)
    if entry is None:
        raise RunError(f"{pack_marker} has no member {run_dir}; delete {pack_marker} to train its pack again")
    if entry["error"]:
        raise RunError(f"{run_dir} stopped in its pack ({pack_marker}): {entry['error'].rstrip('.')}. "
                       f"After fixing its config (which trains its pack again), or to retry it as it is, delete "
                       f"{pack_marker}")
    atomic_write_json(Path(marker), entry["train"])
    logging.getLogger(__name__).info("%s trained in the pack of %s (whose job's log has its training)", run_dir,
                                     pack_marker)


def stale_reason(run_cfg: RunConfig, run_dir: Path) -> str | None:
    """Why the folder `run_dir` cannot be resumed as a run of `run_cfg` ("config", "stage-one"); None when it can
    (or does not exist). A stage two that has trained but records no stage one (an older har) counts as stale: the
    job only runs again when Snakemake saw its stage one or config change."""
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        return None
    try:
        stored = yaml.safe_load(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "config"  # unreadable: not a run of this config either
    if stored_config_hash(stored) != config_hash(run_cfg):
        return "config"
    if run_cfg.decouple.method != "none" and stage_one.has_started(run_dir):
        if stage_one.recorded_stage_one(run_dir) is None or stage_one.stage_one_change(run_cfg, run_dir):
            return "stage-one"
    return None


def set_aside_stale(run_cfg: RunConfig, run_dir: Path) -> Path | None:
    """Move a stale run folder to `<run_dir>.stale-<reason>-<UTC time>` beside it; return the new path, or None.

    Moved, not deleted: a paper-scale run costs GPU days, and a reverted edit can move it back. The new name
    matches no pattern of the workflow (run folders end in `seed<N>`), so nothing reads it again.
    """
    reason = stale_reason(run_cfg, run_dir)
    if reason is None:
        return None

    refuse_if_held(run_dir, "moving the stale folder aside")  # a trainer still running there keeps its folder
    aside = run_dir.with_name(f"{run_dir.name}.stale-{reason}-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}")
    os.replace(run_dir, aside)
    logging.getLogger(__name__).warning("%s holds a run of another %s: moved to %s, training it again", run_dir,
                                        "config" if reason == "config" else "stage one", aside)
    return aside


def _torchrun(command: list[str]) -> int:
    """Run torchrun; SLURM's SIGUSR1 warning (or SIGTERM) reaches it as SIGTERM, which it passes to its workers.

    The workers then save a mid-epoch checkpoint and stop (har.engine.signals). torchrun itself would die on
    SIGUSR1 without telling them, so it starts with SIGUSR1 ignored (its workers install their own handler).
    """
    forwarded = (signal.SIGUSR1, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in forwarded}
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by torchrun
    try:
        proc = subprocess.Popen(command)
        for sig in forwarded:
            signal.signal(sig, lambda *_: proc.send_signal(signal.SIGTERM))
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def evaluate_run(spec: grid.RunSpec, target_savings: list[float] | None = None) -> None:
    """Static and dynamic evaluation of a trained grid run (writes eval/val.json and eval/test.json), with s also
    chosen at each of `target_savings` (None: the run's `eval.target_savings`)."""
    evaluate.evaluate_run(spec.run_dir, target_savings=target_savings)


def select_t(cfg: dict, split: str, method: str, runs: list[grid.RunSpec], out: str | Path) -> dict:
    """Choose t for a method on a split from its line-search runs by static top-1 (the backbone's own classifier),
    averaged over the search seeds; ties: the smallest t.

    ImageNet-LT (`grid.t_chosen_on`: val), as the paper's Table I: t is chosen on the validation list, and the test
    split only reports (`test_top1_at_chosen`). Elsewhere (Table I's CIFAR stand-in) on the test split, cross-fitted
    as s is: t chosen on half A is scored on half B and vice versa (`t_points_by_half`, `crossfit_top1`: what a t
    found by the search achieves on images it was not chosen on); the t that trains the final runs when
    `t_search.feed_final` is true is the best on the whole test split (`t_point`), so those runs then report on
    images their t was chosen on.
    """
    chosen_on = grid.t_chosen_on(runs[0].dataset)
    reports: dict[float, list[dict]] = {}
    for spec in runs:
        reports.setdefault(spec.t_point, []).append({part: json.loads((Path(spec.run_dir) / EVAL_DIR / f"{part}.json")
                                                                      .read_text()) for part in {chosen_on, "test"}})
    points = sorted(reports)

    def mean(score) -> dict[float, float]:
        return {t: sum(score(r) for r in reports[t]) / len(reports[t]) for t in points}

    def best(scores: dict[float, float]) -> float:
        return max(points, key=lambda t: scores[t])  # the first maximum of the sorted points: the smallest t

    test = mean(lambda r: r["test"]["static"]["top1"])
    scores = mean(lambda r: r[chosen_on]["static"]["top1"])
    chosen = best(scores)
    result = {"split": split, "method": method, "t_point": chosen,
              "train_threshold": grid.t_value(cfg, method, chosen, grid.NUM_CLASSES[runs[0].dataset]),
              "test_top1_by_t_point": {f"{t:g}": test[t] for t in points}, "chosen_on": chosen_on}
    if chosen_on == "val":
        result.update(val_top1_by_t_point={f"{t:g}": scores[t] for t in points}, test_top1_at_chosen=test[chosen],
                      protocol="val")
    else:
        halves = [mean(lambda r, h=h: r["test"]["halves"]["static_top1"][h]) for h in (0, 1)]
        on_a, on_b = best(halves[0]), best(halves[1])
        size_a, size_b = reports[points[0]][0]["test"]["halves"]["sizes"]
        result.update(t_points_by_half=[on_a, on_b],
                      crossfit_top1=(size_b * halves[1][on_a] + size_a * halves[0][on_b]) / (size_a + size_b),
                      protocol="crossfit-test-halves")
    result.update(seeds=sorted({s.seed for s in runs}), feeds_final_runs=grid.feeds_final(cfg))
    atomic_write_json(Path(out), result)
    return result


def load_selections(files: list[str]) -> dict[str, dict[str, dict]]:
    """split -> method -> the line search's choice of t, from `select_t`'s files."""
    selected: dict[str, dict[str, dict]] = {}
    for path in files:
        result = json.loads(Path(path).read_text())
        selected.setdefault(result["split"], {})[result["method"]] = result
    return selected
