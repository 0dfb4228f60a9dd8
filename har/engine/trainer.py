"""One training run: config in, run folder out (resolved config, per-epoch metrics, checkpoints).

The run folder holds `config.yaml` and `config.sha256` (the resolved config and the hash of what decides
the result), `metrics.jsonl` (one JSON line per epoch), `last.pt` (model, optimiser, schedule, epoch and
RNG states, rewritten atomically after every epoch) and `prev.pt` (the checkpoint `last.pt` replaced, the
fallback when `last.pt` cannot be read). Starting `train` again on the same folder with the same config
resumes from the newest readable checkpoint; another config is refused with the difference. SIGTERM or
SIGUSR1 stop training after the current step with a mid-epoch checkpoint and exit status 75 (see
`har.engine.signals`); a resumed run ends with the same weights and metrics as an uninterrupted one on the
CPU. The final model is the last epoch's: nothing is selected on the test set.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from har.atomic import atomic_write_text
from har.config import RunConfig, config_hash, to_dict
from har.data.batches import eval_batches, train_batches
from har.data.build import RunData, build_data
from har.data.loader import ImageBatches, TensorBatches
from har.engine.distributed import Distributed, from_environment, process_group
from har.engine.hardware import exact_fp32
from har.engine.run_state import (
    EpochProgress,
    epoch_generator,
    epoch_row,
    nonfinite_error,
    records_test,
    rng_state,
    set_class_weights,
    set_rng_state,
    static_test_top1,
    take_step,
)
from har.engine.signals import EXIT_TEMPFAIL, StopRequest, TrainingInterrupted, stop_requests
from har.engine.step import StepLoss
from har.errors import RunError
from har.methods import decoupled
from har.models import MultiExitNet
from har.run.assembly import (
    build_loss,
    build_model,
    build_optimizer,
    build_reweight,
    build_scheduler,
    build_step_loss,
    precision,
    record_machine,
    resolve_device,
)
from har.run.checkpoint import atomic_save, checkpoint_state, restore
from har.run.folder import CHECKPOINT, METRICS, PREVIOUS, read_history, write_history
from har.run.prepare import owned_run_dir

log = logging.getLogger(__name__)

SINGLE = Distributed()  # a run of one process


def train(cfg: RunConfig, out: str | Path, data: RunData | None = None) -> list[dict]:
    """Train (or resume) one run into the folder `out`; return the per-epoch metrics.

    Started by torchrun, every process calls this with the same arguments: each trains on its share of every
    global batch, and only rank 0 writes the folder.

    Args:
        cfg: the validated run config.
        out: the run folder.
        data: already built splits (the config's data section is used to build them when None).
    """
    ctx = from_environment()
    device = resolve_device(cfg.train.device, ctx)
    with (process_group(ctx, device), owned_run_dir(cfg, Path(out), ctx),
          exact_fp32(device, precision(cfg.train, device)[0])):
        return _train(cfg, Path(out), data, ctx, device)


def _train(cfg: RunConfig, out: Path, data: RunData | None, ctx: Distributed, device: torch.device) -> list[dict]:
    ctx.barrier()  # rank 0 has locked and prepared the folder
    t = cfg.train
    on_cuda = device.type == "cuda"
    amp, channels_last = precision(t, device)
    if t.deterministic and not on_cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(t.seed)
    data = data or build_data(cfg.data)
    model = build_model(cfg, data.num_classes).to(device)
    stage_two = cfg.decouple.method != "none"
    if stage_two:
        decoupled.load_stage_one(cfg, model, device, out if ctx.is_main else None)  # only rank 0 writes the folder
        decoupled.trainable_parameters(cfg, model)
        if cfg.decouple.method == "tau_norm":
            return _tau_norm(cfg, out, model, data, device, ctx)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped: torch.nn.Module = model
    if ctx.enabled:
        if t.sync_batchnorm:
            if not on_cuda:
                raise RunError("train.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU kernel); turn it off")
            wrapped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if on_cuda else None)
    har_loss = build_loss(cfg, data.class_counts).to(device)
    step_loss = build_step_loss(wrapped, har_loss, model.num_exits, cfg, amp, distributed=ctx.enabled)
    reweight = build_reweight(cfg, data.class_counts)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)

    ckpt_path, prev_path = out / CHECKPOINT, out / PREVIOUS
    start, partial, rng = restore(cfg, out, model, optimizer, scheduler, device)
    if ctx.is_main:
        record_machine(cfg, out, device, start)
    if rng is not None:
        set_rng_state(rng)
    if partial is not None and not ctx.is_main:  # rank 0's checkpoint holds the sums of every process
        partial = {**partial, "sums": {k: torch.zeros_like(v) if k != "first_bad_step" else v
                                       for k, v in partial["sums"].items()}, "seen": 0}
    history = read_history(out, start)

    def save(epoch_done: int, progress: dict[str, Any] | None = None) -> None:
        if ctx.is_main:
            atomic_save(checkpoint_state(cfg, model, optimizer, scheduler, epoch_done, progress, rng_state()),
                        ckpt_path, keep_previous=prev_path)

    batches = train_batches(data.train, cfg.data, t.batch_size, device, ctx.rank, ctx.world)
    balanced_labels = torch.from_numpy(data.train.labels).to(batches.generator_device) if stage_two else None
    mode = (lambda: decoupled.train_mode(model)) if stage_two else None
    interactive = sys.stderr.isatty() and ctx.is_main
    with stop_requests() as stop:
        for epoch in range(start, t.epochs):
            weights = set_class_weights(har_loss, reweight, epoch, cfg, data.num_classes)
            generator = epoch_generator(t.seed, epoch, batches.generator_device)
            if partial is not None:
                progress = EpochProgress.resume(partial, generator)
                partial = None
            else:
                order = (decoupled.class_balanced_order(balanced_labels, generator) if stage_two
                         else batches.order(generator))
                progress = EpochProgress.begin(order, model.num_exits, device)
            row = _train_epoch(step_loss, optimizer, batches, generator, epoch, cfg, interactive, progress, stop,
                               ctx, mode)
            if row is None:  # stopped by a signal inside the epoch
                state = progress.state_dict(generator)
                if ctx.enabled:  # one checkpoint for all: rank 0 keeps the sums of every process
                    state["sums"] = _reduce_sums(progress.sums, ctx)
                    state["seen"] = ctx.all_reduce_int(progress.seen)
                save(epoch - 1, {"epoch": epoch, **state})
                _stopped(stop, ckpt_path, f"epoch {epoch} (0-based) at step {progress.step} of {len(batches)}")
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["reweighted"] = weights is not None
            if records_test(cfg, epoch):
                row["test_top1"] = static_test_top1(model, data, cfg, device)
            scheduler.step()
            history.append(row)
            if ctx.is_main:  # metrics first: rows past the checkpoint's epoch are dropped on resume, computed again
                write_history(out, history)
            save(epoch)
            if ctx.is_main:
                log.info("epoch %d/%d  loss %.4f  train acc %.4f  exit fractions %s  (%.1f s)", epoch + 1, t.epochs,
                         row["loss"], row["train_top1"], [round(f, 3) for f in row["exit_fraction"]], row["seconds"])
            if _agreed_stop(stop, ctx) and epoch + 1 < t.epochs:
                _stopped(stop, ckpt_path, f"the end of epoch {epoch} (0-based)")
    ctx.barrier()  # nobody reads the folder before rank 0 has written it
    return history


def _tau_norm(cfg: RunConfig, out: Path, model: MultiExitNet, data: RunData, device: torch.device,
              ctx: Distributed) -> list[dict]:
    """tau-norm trains nothing: choose tau on the validation split, scale the classifier, save the model.

    Kang et al. sweep tau on the test features; choosing on val keeps the test images unseen. A val split without
    some class (CIFAR-LT's head class has no left-out image) biases the choice towards the other classes: the row
    names those classes (`val_classes_missing`) and the run warns; where the test split is cross-fitted
    (`selection.protocol`), the evaluation chooses tau again on the test halves from stage one's weight, which
    the checkpoint keeps (`decoupled.STAGE_ONE_WEIGHT`). Its checkpoint counts as a finished run of
    `train.epochs` epochs (the number is not used otherwise).
    """
    features = decoupled.pooled_features(model, eval_batches(data.val, cfg.data, cfg.eval.batch_size, device))
    labels = torch.from_numpy(data.val.labels).to(device)
    stage_one_weight = model.backbone.classifier.weight.detach().clone()
    choice = decoupled.choose_tau(features, labels, model.backbone.classifier, cfg.decouple.taus)
    decoupled.tau_normalize(model.backbone.classifier, choice["tau"])
    missing = sorted(set(range(data.num_classes)) - set(data.val.labels.tolist()))
    row = {"epoch": cfg.train.epochs - 1, **choice, "chosen_on": "val", "val_classes_missing": missing,
           "stage_one": cfg.decouple.stage_one}
    log.info("tau-norm: tau %g chosen on val (top-1 by tau: %s)", choice["tau"], choice["val_top1_by_tau"])
    if missing:
        log.warning("tau-norm: the validation split has no image of classes %s; tau was chosen without them",
                    missing)
    if ctx.is_main:
        atomic_write_text(out / METRICS, json.dumps(row) + "\n")
        atomic_save({"model": model.state_dict(), "epoch": cfg.train.epochs - 1, "partial": None,
                     "config_sha256": config_hash(cfg), "config": to_dict(cfg),
                     decoupled.STAGE_ONE_WEIGHT: stage_one_weight}, out / CHECKPOINT)
    ctx.barrier()
    return [row]


def _reduce_sums(sums: dict[str, Tensor], ctx: Distributed) -> dict[str, Tensor]:
    """An epoch's running sums over all processes (the first non-finite step: the latest any process saw)."""
    return {k: ctx.all_reduce(v, "max" if k == "first_bad_step" else "sum") for k, v in sums.items()}


def _agreed_stop(stop: StopRequest, ctx: Distributed) -> bool:
    """Whether to stop now; a distributed run stops only when every process agrees on it (a collective)."""
    return bool(ctx.all_reduce_int(int(stop.signum is not None), "max"))


def _stopped(stop: StopRequest, ckpt_path: Path, where: str) -> NoReturn:
    """Report a signal stop once its checkpoint is written, and end the run with the retry status."""
    message = (f"{stop.name} received: saved {ckpt_path} at {where}; run the same command again to resume "
               f"(exit status {EXIT_TEMPFAIL})")
    log.warning("%s", message)
    raise TrainingInterrupted(message)


def _train_epoch(step_loss: StepLoss, optimizer: torch.optim.Optimizer, batches: TensorBatches | ImageBatches,
                 generator: torch.Generator, epoch: int, cfg: RunConfig, interactive: bool, progress: EpochProgress,
                 stop: StopRequest, ctx: Distributed = SINGLE, mode: Callable[[], Any] | None = None) -> dict | None:
    """The rest of an epoch from `progress`: its metrics row, or None when `stop` fired before its last step.

    Statistics stay on the device until the end of the epoch: nothing in a step reads a value back to the
    host except the progress log every `log_every` steps, so the GPU is never left waiting on Python. Each
    process's loss is its examples' share of the global batch's loss (the normaliser is summed over all
    processes), so DistributedDataParallel's gradient average is the one-process gradient of that batch.
    `step_loss` is a `StepLoss`, compiled or not; `mode` puts the model in training mode (default: `train()`).
    """
    (mode or step_loss.train)()
    t = cfg.train
    sums = progress.sums
    began = time.perf_counter() - progress.seconds
    bar = tqdm(total=len(batches), initial=progress.step, desc=f"epoch {epoch + 1}/{t.epochs}",
               leave=False, disable=not interactive)
    for step, (images, labels) in enumerate(batches.epoch(generator, progress.order, progress.step),
                                            progress.step):
        loss = take_step(step_loss, optimizer, progress, cfg, images, labels, epoch, step, ctx)
        bar.update()
        at_log = (step + 1) % t.log_every == 0
        if at_log:
            _check_finite(progress, epoch, len(batches), ctx)
            if not interactive and ctx.is_main:
                log.info("epoch %d step %d/%d loss %.4f", epoch + 1, step + 1, len(batches), loss.item())
        # a distributed run agrees on stopping only at log steps (a collective); one process checks every step
        if (at_log or not ctx.enabled) and _agreed_stop(stop, ctx) and step + 1 < len(batches):
            bar.close()
            _check_finite(progress, epoch, len(batches), ctx)  # never save a diverged state over a good one
            progress.seconds = time.perf_counter() - began
            return None
    bar.close()
    _check_finite(progress, epoch, len(batches), ctx)
    sums = _reduce_sums(sums, ctx)
    seen = ctx.all_reduce_int(progress.seen)
    return epoch_row(epoch, sums, seen, time.perf_counter() - began)


def _check_finite(progress: EpochProgress, epoch: int, steps: int, ctx: Distributed = SINGLE) -> None:
    """Stop at the first non-finite loss, before a checkpoint of the diverged model is written (one read-back)."""
    bad = int(ctx.all_reduce(progress.sums["first_bad_step"], "max"))
    if bad >= 0:
        raise nonfinite_error(epoch, bad, steps)
