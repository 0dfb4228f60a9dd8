"""A run as the epoch loop trains it: its own modules, schedule, history and progress, assembled from its config
and run folder as `har train` starts or resumes it. A single run is one member; a pack is several.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from har.config import RunConfig
from har.data.build import RunData
from har.engine.run_state import EpochProgress, rng_state
from har.losses import HARLoss, ReweightSchedule
from har.models import MultiExitNet
from har.run.assembly import (
    build_loss,
    build_model,
    build_optimizer,
    build_reweight,
    build_scheduler,
    precision,
    record_machine,
)
from har.run.checkpoint import atomic_save, checkpoint_state, restore
from har.run.folder import CHECKPOINT, PREVIOUS, TRAIN_ERROR, read_history, snapshot_path


@dataclass
class Member:
    """One run in the loop: its modules (holding its state between epochs), where it stands, and its hooks.

    `rng` is the global RNG state its checkpoint saves: None for a run that trains alone (the live state at each
    save, since a step may draw from the global generators, as Manifold Mixup's layer choice does); a pack member
    keeps the state drawn at its initialisation, which is what its single run would hold (a packed method draws
    nothing from the global generators after it).
    """

    cfg: RunConfig
    out: Path
    model: MultiExitNet
    har_loss: HARLoss
    reweight: ReweightSchedule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: dict[str, Any] | None
    start: int = 0  # next epoch to train
    partial: dict | None = None  # a mid-epoch checkpoint's progress, consumed when its epoch begins
    history: list[dict] = field(default_factory=list)
    error: str | None = None  # set when its loss turned non-finite: it trains no further
    draw_order: Callable[[torch.Generator], Tensor] | None = None  # an epoch's example order (default: shuffled)
    set_train_mode: Callable[[], Any] | None = None  # default: the step module's `train()`
    progress: EpochProgress | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    batches: Any = field(default=None, repr=False)  # this epoch's batch iterator

    @property
    def done(self) -> bool:
        return self.error is not None or self.start >= self.cfg.train.epochs

    def save(self, epoch_done: int, progress: dict | None = None) -> None:
        """Checkpoint the run after `epoch_done` (with `progress`: part way through the next epoch), and keep a copy
        when `train.keep_epochs` names that epoch."""
        rng = rng_state() if self.rng is None else self.rng
        state = checkpoint_state(self.cfg, self.model, self.optimizer, self.scheduler, epoch_done, progress, rng)
        atomic_save(state, self.out / CHECKPOINT, keep_previous=self.out / PREVIOUS)
        if progress is None and epoch_done + 1 in self.cfg.train.keep_epochs:
            snapshot = snapshot_path(self.out, epoch_done + 1)
            snapshot.parent.mkdir(exist_ok=True)
            atomic_save(state, snapshot)


def fresh_model(cfg: RunConfig, num_classes: int, device: torch.device,
                adapt: Callable[[MultiExitNet], None] | None = None) -> tuple[MultiExitNet, dict[str, Any]]:
    """The run's model as it starts, seeded and on `device`, with `adapt` applied there (a decoupled stage two loads
    stage one and freezes). Also returns the global RNG state right after the initialisation: what a pack member's
    checkpoints keep (see `Member`)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, num_classes)
    rng = rng_state()
    model = model.to(device)
    if adapt is not None:
        adapt(model)
    return model, rng


def fresh_member(cfg: RunConfig, out: Path, data: RunData, device: torch.device, alone: bool,
                 adapt: Callable[[MultiExitNet], None] | None = None) -> Member:
    """A run as `har train` initialises it, before any checkpoint: `fresh_model` in the precision's memory format,
    with its loss, class-weight schedule, optimiser and lr schedule. `adapt` changes the model on the device before
    the optimiser takes its parameters; `alone`: the run trains alone (its checkpoints save the live RNG state, see
    `Member`)."""
    model, rng = fresh_model(cfg, data.num_classes, device, adapt)
    if precision(cfg.train, device)[1]:
        model = model.to(memory_format=torch.channels_last)
    har_loss = build_loss(cfg, data.class_counts).to(device)
    optimizer = build_optimizer(cfg, model)
    return Member(cfg, out, model, har_loss, build_reweight(cfg, data.class_counts), optimizer,
                  build_scheduler(cfg, optimizer), None if alone else rng)


def resume_member(member: Member, device: torch.device, writes: bool = True) -> dict[str, Any] | None:
    """Take up the member's checkpoint (if any): its weights, optimiser and schedule, the epoch to start, a
    mid-epoch progress and the history up to it; clear a stale `train.error` and record the machine (`writes`:
    this process writes the folder). Returns the checkpoint's RNG state (None: a fresh run)."""
    out = member.out
    if writes:
        (out / TRAIN_ERROR).unlink(missing_ok=True)
    member.start, member.partial, rng = restore(member.cfg, out, member.model, member.optimizer, member.scheduler,
                                                device)
    if writes:
        record_machine(member.cfg, out, device, member.start)
    if rng is not None and member.rng is not None:
        member.rng = rng
    member.history = read_history(out, member.start)
    return rng
