"""The epoch loop, written once for a single run and for packs: the step is the only part that varies
(`har.engine.executors`: each member's single-run step in turn, or one K-wide network).

Per epoch and member it sets the class weights, draws (or resumes) the data order, takes the steps, checks for
a non-finite loss, and on a stop signal saves a mid-epoch checkpoint and ends with exit status 75; at the end of an
epoch it writes the metrics row (with test top-1 where `records_test` asks), steps the lr schedule, and writes the
history and the checkpoint. A member whose loss turns non-finite stops (its error in `Member.error` and its folder's
`train.error`, its `last.pt` the last good state); the others go on. Members whose checkpoints stand at different
points (a kill between two members' saves) train apart until they are level, then together.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch
from torch import Tensor
from tqdm import tqdm

from har.atomic import atomic_write_text
from har.data.build import RunData
from har.data.loader import ImageBatches, TensorBatches
from har.engine.distributed import Distributed
from har.engine.executors import Executor
from har.engine.member import Member
from har.engine.run_state import (
    EpochProgress,
    epoch_generator,
    epoch_row,
    nonfinite_error,
    records_test,
    set_class_weights,
)
from har.engine.signals import EXIT_TEMPFAIL, StopRequest, TrainingInterrupted, stop_requests
from har.run.folder import CHECKPOINT, TRAIN_ERROR, write_history

log = logging.getLogger(__name__)

SINGLE = Distributed()  # one process
Batches = TensorBatches | ImageBatches


def train_members(members: Sequence[Member], executor_for: Callable[[list[Member]], Executor], batches: Batches,
                  data: RunData, device: torch.device, ctx: Distributed = SINGLE) -> None:
    """Train every member to its last epoch (or until it stops on a non-finite loss).

    `executor_for` builds the executor of a set of members that train together (kept while the set does); `ctx`:
    the processes a single run is spread over (every process runs this loop; rank 0 writes the folders).

    Raises:
        TrainingInterrupted: on SIGTERM / SIGUSR1, once every live member's checkpoint is written.
    """
    groups: dict[tuple[int, ...], Executor] = {}
    interactive = sys.stderr.isatty() and ctx.is_main
    with stop_requests() as stop:
        while not all(m.done for m in members):
            epoch = min(m.start for m in members if not m.done)
            due = {i: _first_step(m) for i, m in enumerate(members) if not m.done and m.start == epoch}
            for first in sorted(set(due.values())):  # apart only after a kill between two members' checkpoints
                ids = tuple(i for i, step in due.items() if step == first)
                if ids not in groups:
                    groups[ids] = executor_for([members[i] for i in ids])
                train_epoch(groups[ids], batches, data, epoch, device, interactive, stop, ctx)
            if _agreed_stop(stop, ctx) and not all(m.done for m in members):
                _stopped(stop, members, f"the end of epoch {epoch} (0-based)")


def train_epoch(group: Executor, batches: Batches, data: RunData, epoch: int, device: torch.device,
                interactive: bool, stop: StopRequest, ctx: Distributed = SINGLE) -> None:
    """The rest of `epoch` for the members of `group`, then their metrics rows and checkpoints.

    Statistics stay on the device until the end of the epoch: nothing in a step reads a value back to the host
    except the check and progress log every `train.log_every` steps, so a GPU is never left waiting on Python. A
    distributed run agrees on stopping only at those steps (a collective); one process checks every step.
    """
    members, cfg = group.members, group.members[0].cfg
    t = cfg.train
    for m in members:
        _begin(m, batches, epoch, group.num_exits, device)
    group.load()
    group.train()
    first = members[0].progress.step
    began = time.perf_counter() - members[0].progress.seconds
    label = "epoch" if len(members) == 1 else "pack epoch"
    bar = tqdm(total=len(batches), initial=first, desc=f"{label} {epoch + 1}/{t.epochs}", leave=False,
               disable=not interactive)
    for step in range(first, len(batches)):
        losses = group.train_step([next(m.batches) for m in members], epoch, step)
        bar.update()
        at_log = (step + 1) % t.log_every == 0
        if at_log:
            if not _check_finite(members, epoch, len(batches), ctx):
                break  # every member stopped: nothing left to train this epoch
            if not interactive and ctx.is_main:
                log.info("%s %d step %d/%d loss %s", label, epoch + 1, step + 1, len(batches),
                         " ".join("-" if m.error else f"{loss.item():.4f}" for m, loss in zip(members, losses)))
        if (at_log or not ctx.enabled) and _agreed_stop(stop, ctx) and step + 1 < len(batches):
            bar.close()
            if not _check_finite(members, epoch, len(batches), ctx):  # never save a diverged state over a good one
                return
            group.store()
            seconds = time.perf_counter() - began
            for m in members:
                if m.error is None:
                    m.progress.seconds = seconds
                    state = {"epoch": epoch, **m.progress.state_dict(m.generator)}
                    if ctx.enabled:  # one checkpoint for all: rank 0 keeps the sums of every process
                        state["sums"], state["seen"] = _reduce_sums(m.progress.sums, ctx), ctx.all_reduce_int(
                            m.progress.seen)
                    if ctx.is_main:
                        m.save(epoch - 1, state)
            _stopped(stop, members, f"epoch {epoch} (0-based) at step {step + 1} of {len(batches)}")
    bar.close()
    live = _check_finite(members, epoch, len(batches), ctx)
    group.store()
    seconds = time.perf_counter() - began
    test_top1 = group.static_test_top1(data, cfg, device) if live and records_test(cfg, epoch) else None
    for k, m in enumerate(members):
        m.start = epoch + 1
        if m.error is not None:
            continue
        row = epoch_row(epoch, _reduce_sums(m.progress.sums, ctx), ctx.all_reduce_int(m.progress.seen), seconds)
        row["lr"] = m.optimizer.param_groups[0]["lr"]
        row["reweighted"] = m.reweight.weights(epoch) is not None
        if test_top1 is not None:
            row["test_top1"] = test_top1[k]
        with warnings.catch_warnings():  # a fused pack steps its own optimiser in place of the member's
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            m.scheduler.step()
        m.history.append(row)
        if ctx.is_main:  # metrics first: rows past the checkpoint's epoch are dropped on resume, computed again
            write_history(m.out, m.history)
            m.save(epoch)
    _log_epoch(members, epoch, t.epochs, seconds, ctx)


def _first_step(member: Member) -> int:
    return 0 if member.partial is None else member.partial["step"]


def _begin(member: Member, batches: Batches, epoch: int, num_exits: int, device: torch.device) -> None:
    """Start (or continue) a member's epoch: its class weights, data order, augmentation generator, sums."""
    t = member.cfg.train
    set_class_weights(member.har_loss, member.reweight, epoch, member.cfg, member.model.num_classes)
    member.generator = epoch_generator(t.seed, epoch, batches.generator_device)
    if member.partial is not None:
        member.progress = EpochProgress.resume(member.partial, member.generator)
        member.partial = None
    else:
        order = (member.draw_order or batches.order)(member.generator)
        classes = member.model.num_classes
        per_class = classes if classes <= t.record_per_class_up_to else 0
        member.progress = EpochProgress.begin(order, num_exits, device, per_class)
    member.batches = batches.epoch(member.generator, member.progress.order, member.progress.step)


def _log_epoch(members: Sequence[Member], epoch: int, epochs: int, seconds: float, ctx: Distributed) -> None:
    live = [m for m in members if m.error is None]
    if not live or not ctx.is_main:
        return
    if len(members) == 1:
        row = live[0].history[-1]
        log.info("epoch %d/%d  loss %.4f  train acc %.4f  exit fractions %s  (%.1f s)", epoch + 1, epochs,
                 row["loss"], row["train_top1"], [round(f, 3) for f in row["exit_fraction"]], seconds)
    else:
        log.info("pack epoch %d/%d  (%.1f s)  loss %s  train acc %s", epoch + 1, epochs, seconds,
                 [round(m.history[-1]["loss"], 4) for m in live], [round(m.history[-1]["train_top1"], 4) for m in live])


def _check_finite(members: Sequence[Member], epoch: int, steps: int, ctx: Distributed) -> bool:
    """Stop each member whose loss turned non-finite (one read-back for all); whether any member is still live."""
    bad = ctx.all_reduce(torch.stack([m.progress.sums["first_bad_step"] for m in members]), "max").tolist()
    for m, step in zip(members, bad, strict=True):
        if step >= 0 and m.error is None:
            m.error = str(nonfinite_error(epoch, step, steps))
            if ctx.is_main:
                log.error("%s: %s", m.out, m.error)
                atomic_write_text(m.out / TRAIN_ERROR, m.error + "\n")
    return any(m.error is None for m in members)


def _reduce_sums(sums: dict[str, Tensor], ctx: Distributed) -> dict[str, Tensor]:
    """An epoch's running sums over all processes (the first non-finite step: the latest any process saw)."""
    return {k: ctx.all_reduce(v, "max" if k == "first_bad_step" else "sum") for k, v in sums.items()}


def _agreed_stop(stop: StopRequest, ctx: Distributed) -> bool:
    """Whether to stop now; a distributed run stops only when every process agrees on it (a collective)."""
    return bool(ctx.all_reduce_int(int(stop.signum is not None), "max"))


def _stopped(stop: StopRequest, members: Sequence[Member], where: str) -> NoReturn:
    """Report a signal stop once the checkpoints are written, and end with the retry status."""
    saved = str(members[0].out / CHECKPOINT) if len(members) == 1 else f"the pack's {len(members)} checkpoints"
    message = (f"{stop.name} received: saved {saved} at {where}; run the same command again to resume "
               f"(exit status {EXIT_TEMPFAIL})")
    log.warning("%s", message)
    raise TrainingInterrupted(message)
