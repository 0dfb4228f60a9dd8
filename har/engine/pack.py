"""Packs: K CIFAR runs of one shape trained together in one process, each exactly as if alone.

A ResNet-32 at batch 128 leaves a modern GPU nearly idle (launch-bound, about 1% of its arithmetic); K runs
computed as one K-wide network (`har.models.packed.PackedNet`: grouped convolutions, batch norm over K x C
channels) fill it with K times the work per launch. Packing is an execution detail, outside the config hash like
`train.compile`:

- Members share the shape of the computation (`pack_shape`: data, model, batch size, epochs, optimiser and
  schedule, device settings) and may differ in everything else that a run config says (`MEMBER_FIELDS`): seed,
  exit loss and its class weights, HAR and its t, DRW, input Mixup.
- Each member keeps its single run's semantics: its own initialisation (seeded as `har train` seeds it), data
  order, augmentation and Mixup draws, class weights and schedule, and its own run folder with the same
  `config.yaml`, `metrics.jsonl` and `last.pt` (written through `har.engine.run_state`), so `har train` resumes
  any member alone and `har evaluate` reads it unchanged. On the CPU in float64 a member ends with its single
  run's weights and metrics within rounding (tested).
- Every member is checkpointed after every epoch and, on SIGTERM / SIGUSR1, mid-epoch (exit 75). A resumed pack
  continues each member from its own checkpoint; members whose checkpoints are at different points (a kill
  between two members' saves) train apart until they are level again, then together.
- A member whose loss turns non-finite stops with the single run's error (logged and written to its folder's
  `train.error`; its `last.pt` keeps its last good state); the others go on, and the pack then fails naming it.

Two executors compute a pack's step (`train.pack_executor`; `auto` picks by device, as measured in
docs/benchmarks.md): `fused` (`_Fused`) trains the members as one K-wide network, `serial` (`_Serial`) takes each
member's own single-run step (`har.engine.step.StepLoss`, compiled as `train.compile` says) in turn. On a CPU, whose
grouped-convolution kernels are slower than K separate ones, serial computes what K single runs would in the same
time; the pack still shares one process, one copy of the data and one job.

`PackSteps` builds fresh members as one pack without run folders and takes the same steps (`train_step`),
for benchmarks that time a pack's step.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from har.atomic import atomic_write_text
from har.config import ConfigError, RunConfig, config_diff, to_dict
from har.data.batches import eval_batches, train_batches
from har.data.build import RunData, build_data
from har.data.loader import TensorBatches
from har.engine.assembly import (
    CHECKPOINT,
    PREVIOUS,
    build_loss,
    build_model,
    build_optimizer,
    build_reweight,
    build_scheduler,
    build_step_loss,
    precision,
    resolve_device,
)
from har.engine.bf16 import bf16_convolutions
from har.engine.checkpoint import RunError, atomic_save
from har.engine.distributed import Distributed
from har.engine.run_state import (
    EpochProgress,
    checkpoint_state,
    epoch_generator,
    epoch_row,
    nonfinite_error,
    owned_run_dir,
    read_history,
    record_machine,
    records_test,
    restore,
    rng_state,
    set_class_weights,
    static_test_top1,
    take_step,
    write_history,
)
from har.engine.signals import EXIT_TEMPFAIL, StopRequest, TrainingInterrupted, stop_requests
from har.engine.step import StepOutput, step_statistics
from har.losses import HARLoss, ReweightSchedule
from har.methods.mixup import Mixing, draw_mixing
from har.models import MultiExitNet
from har.models.packed import PackedNet, PackError

log = logging.getLogger(__name__)

ERROR_FILE = "train.error"  # a member stopped inside a pack: its error, for whoever reads the folder
# Fields in which the members of one pack may differ (a whole section when None); all others make the shape.
MEMBER_FIELDS: dict[str, tuple[str, ...] | None] = {
    "loss": None, "train": ("seed", "mixup", "mixup_alpha"),
    "eval": ("exit_thresholds", "target_savings", "histogram_bins"),
}


class MembersStopped(RunError):
    """Some members of a pack stopped (a non-finite loss); the others finished.

    Attributes:
        errors: each stopped member's run folder and its error (also in the folder's `train.error`).
        histories: every member's metrics rows, in the pack's order (a stopped member's up to its last good epoch).
    """

    def __init__(self, message: str, errors: dict[Path, str], histories: list[list[dict]]) -> None:
        super().__init__(message)
        self.errors, self.histories = errors, histories


def pack_shape(cfg: RunConfig) -> dict[str, Any]:
    """What the members of a pack must share: the config without `MEMBER_FIELDS`, with the resolved classifier
    kind (the exits' layers) and `train.compile` (one way of computing all)."""
    values = to_dict(cfg)
    for section, names in MEMBER_FIELDS.items():
        if names is None:
            values.pop(section)
        else:
            for name in names:
                values[section].pop(name)
    values["model"]["classifier"] = cfg.classifier
    return values


def pack_refusal(cfg: RunConfig) -> str | None:
    """Why a run cannot be a pack member (None when it can): it must train a CIFAR split from scratch with no
    Manifold Mixup (whose mixing layer is drawn per member and step)."""
    if cfg.decouple.method != "none":
        return f"decouple.method {cfg.decouple.method!r}: a decoupled stage two trains alone from its stage one"
    if cfg.data.is_list_dataset:
        return f"data.dataset {cfg.data.dataset!r}: list datasets train alone (one run fills a GPU, or several)"
    if cfg.train.mixup == "manifold":
        return "train.mixup 'manifold': each member would mix at its own layer"
    return None


def check_pack(members: Sequence[tuple[RunConfig, Path]]) -> None:
    """Refuse, naming the member and the field, runs that cannot be trained as one pack."""
    if not members:
        raise ConfigError("a pack needs at least one member")
    outs = [Path(out).resolve() for _, out in members]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"two pack members share a run folder: {sorted({str(o) for o in outs if outs.count(o) > 1})}")
    first = pack_shape(members[0][0])
    for cfg, out in members:
        reason = pack_refusal(cfg)
        if reason is not None:
            raise ConfigError(f"{out} cannot train in a pack: {reason}; train it alone with har train")
        diff = config_diff(first, pack_shape(cfg))
        if diff:
            raise ConfigError(f"{out} has another shape than {members[0][1]} and cannot share its pack (members may "
                              f"differ only in {_member_fields()}):\n  " + "\n  ".join(diff))


def _member_fields() -> str:
    return ", ".join(s if n is None else ", ".join(f"{s}.{f}" for f in n) for s, n in MEMBER_FIELDS.items())


@dataclass
class Member:
    """One run of a pack: its own modules (the single run's, holding its state between epochs) and progress."""

    cfg: RunConfig
    out: Path
    model: MultiExitNet
    har_loss: HARLoss
    reweight: ReweightSchedule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: dict[str, Any]  # the RNG state its single run would save (drawn once, at initialisation)
    start: int  # next epoch to train
    partial: dict | None
    history: list[dict]
    error: str | None = None
    progress: EpochProgress | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    batches: Any = field(default=None, repr=False)  # this epoch's batch iterator

    @property
    def done(self) -> bool:
        return self.error is not None or self.start >= self.cfg.train.epochs

    def save(self, epoch_done: int, progress: dict | None = None) -> None:
        atomic_save(checkpoint_state(self.cfg, self.model, self.optimizer, self.scheduler, epoch_done, progress,
                                     self.rng), self.out / CHECKPOINT, keep_previous=self.out / PREVIOUS)


class PackStep(nn.Module):
    """Forward of the K-wide network and each member's HAR loss and statistics, as one module to compile."""

    def __init__(self, packed: PackedNet, har_losses: Sequence[HARLoss], mixups: Sequence[str], amp: bool) -> None:
        super().__init__()
        self.packed, self.har_losses = packed, nn.ModuleList(har_losses)
        self.mixups, self.amp = list(mixups), amp

    def forward(self, images: list[Tensor], labels: list[Tensor], mixings: list[Mixing | None]) -> list[StepOutput]:
        images = [m(x) if m is not None and kind == "input" else x
                  for x, m, kind in zip(images, mixings, self.mixups, strict=True)]
        stacked = torch.stack(images)
        with torch.autocast(stacked.device.type, dtype=torch.bfloat16, enabled=self.amp), \
                bf16_convolutions(stacked.device, self.amp):
            outputs = self.packed(stacked)
        return [step_statistics(loss, [out[k] for out in outputs], labels[k], mixings[k], self.packed.num_exits)
                for k, loss in enumerate(self.har_losses)]


EXECUTORS = ("fused", "serial")


def resolve_executor(name: str, device: torch.device) -> str:
    """`train.pack_executor` for `device`: auto is fused on CUDA and serial elsewhere (on the CPU the fused
    network's grouped convolutions are slower than separate ones: docs/benchmarks.md, Packs)."""
    if name == "auto":
        return "fused" if device.type == "cuda" else "serial"
    return name  # the config's validation admits only auto and EXECUTORS


class _Executor(Protocol):
    """How one set of members (kept while the set trains together) takes its steps."""

    members: list[Member]
    num_exits: int

    def train(self) -> None:
        """Put every member's modules in training mode."""

    def load(self) -> None:
        """Take up the members' state (weights, momentum, learning rate) before an epoch."""

    def train_step(self, drawn: Sequence[tuple[Tensor, Tensor]], epoch: int, step: int) -> list[Tensor]:
        """One step of every member on its batch `drawn[k]`; each member's loss, kept on the device."""

    def store(self) -> None:
        """Hand the state back to each member's own modules (which its checkpoint saves)."""

    def static_test_top1(self, data: RunData, cfg: RunConfig, device: torch.device) -> list[float]:
        """Each member's static test top-1 in eval mode (the single run's `static_test_top1`)."""


def _executor(members: Sequence[Member], cfg: RunConfig, device: torch.device) -> _Executor:
    amp, channels_last = precision(cfg.train, device)
    if resolve_executor(cfg.train.pack_executor, device) == "serial":
        return _Serial(members, cfg, amp)
    return _Fused(members, cfg, amp, channels_last)


class _Serial:
    """Each member's own single-run step in turn: the trainer's `StepLoss` (compiled as `train.compile` says),
    loss, backward and SGD step on the member's own modules and optimiser, exactly as `har train` takes them. A
    stopped member is skipped."""

    def __init__(self, members: Sequence[Member], cfg: RunConfig, amp: bool) -> None:
        self.members = list(members)
        self.num_exits = self.members[0].model.num_exits
        if cfg.train.compile != "off":
            # Dynamo keeps one graph per distinct loss setting (loss, HAR on or off, Mixup, then once more when
            # t differs), all under StepLoss.forward; past `recompile_limit` (8) it would train the other members
            # eagerly, and a pack of 16 can hold more settings than that.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 2 * len(self.members))
        self.steps = [build_step_loss(m.model, m.har_loss, self.num_exits, m.cfg, amp) for m in self.members]

    def train(self) -> None:
        for step in self.steps:
            step.train()

    def load(self) -> None:
        pass  # the members' own modules are the ones trained

    def train_step(self, drawn: Sequence[tuple[Tensor, Tensor]], epoch: int, step: int) -> list[Tensor]:
        losses = []
        for m, step_loss, (images, labels) in zip(self.members, self.steps, drawn, strict=True):
            if m.error is not None:
                losses.append(torch.full((), float("nan"), device=labels.device))
                continue
            losses.append(take_step(step_loss, m.optimizer, m.progress, m.cfg, images, labels, epoch, step))
        return losses

    def store(self) -> None:
        pass

    def static_test_top1(self, data: RunData, cfg: RunConfig, device: torch.device) -> list[float]:
        return [static_test_top1(m.model, data, cfg, device) for m in self.members]


class _Fused:
    """The K-wide network, its optimiser and step for one set of members (kept while the set trains together)."""

    def __init__(self, members: Sequence[Member], cfg: RunConfig, amp: bool, channels_last: bool) -> None:
        self.members = list(members)
        self.packed = PackedNet([m.model for m in members])
        self.num_exits = self.packed.num_exits
        if channels_last:
            self.packed = self.packed.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.packed)
        self.fused_params = [p for p in self.packed.parameters() if p.requires_grad]
        step = PackStep(self.packed, [m.har_loss for m in members], [m.cfg.train.mixup for m in members], amp)
        mode = cfg.train.compile
        self.step = step if mode == "off" else torch.compile(step, mode=mode)

    def train(self) -> None:
        self.packed.train()

    def _member_params(self, member: Member) -> list[Tensor]:
        return [p for p in member.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def load(self) -> None:
        """Each member's weights, momentum and learning rate into the pack (in place)."""
        self.packed.load_members([m.model for m in self.members])
        lrs = {m.optimizer.param_groups[0]["lr"] for m in self.members}
        if len(lrs) != 1:
            raise PackError(f"the members' learning rates differ ({sorted(lrs)})")
        for group in self.optimizer.param_groups:
            group["lr"] = lrs.pop() if lrs else group["lr"]
        buffers = [[m.optimizer.state.get(p, {}).get("momentum_buffer") for p in self._member_params(m)]
                   for m in self.members]
        for i, fused in enumerate(self.fused_params):
            parts = [b[i] for b in buffers]
            if all(p is None for p in parts):
                self.optimizer.state.pop(fused, None)
            elif any(p is None for p in parts):
                raise PackError("some members have momentum and others none: they have not trained the same steps")
            else:
                state = self.optimizer.state[fused]
                stacked = torch.stack([p.reshape(-1) for p in parts]).view_as(fused)
                if "momentum_buffer" in state:
                    state["momentum_buffer"].copy_(stacked)
                else:
                    state["momentum_buffer"] = stacked.clone()

    def train_step(self, drawn: Sequence[tuple[Tensor, Tensor]], epoch: int, step: int) -> list[Tensor]:
        """One step of every member on its batch `drawn[k]` (forward, losses, backward, SGD step, the member's
        epoch sums); each member's loss, kept on the device. A stopped member rides along, out of the loss."""
        members = self.members
        mixings = [None if m.cfg.train.mixup == "off" else
                   draw_mixing(m.cfg.train.mixup_alpha, m.cfg.train.seed, epoch, step, len(labels), labels.device)
                   for m, (_, labels) in zip(members, drawn, strict=True)]
        outs = self.step([x for x, _ in drawn], [y for _, y in drawn], mixings)
        losses = [out.loss_sum / out.normaliser for out in outs]
        self.optimizer.zero_grad(set_to_none=True)
        live = [loss for m, loss in zip(members, losses, strict=True) if m.error is None]
        if live:
            torch.stack(live).sum().backward()  # members share no weight: each gets its own loss's gradient
            self.optimizer.step()
        for m, out, loss, (_, labels) in zip(members, outs, losses, drawn, strict=True):
            m.progress.add(out, loss, step, len(labels))
        return losses

    @torch.no_grad()
    def store(self) -> None:
        """The pack's weights and momentum back into each member's own modules (which its checkpoint saves)."""
        self.packed.store_members([m.model for m in self.members])
        for k, m in enumerate(self.members):
            for fused, own in zip(self.fused_params, self._member_params(m), strict=True):
                buffer = self.optimizer.state.get(fused, {}).get("momentum_buffer")
                if buffer is not None:
                    m.optimizer.state[own]["momentum_buffer"] = self.packed.member_view(buffer, k, own).clone()

    @torch.no_grad()
    def static_test_top1(self, data: RunData, cfg: RunConfig, device: torch.device) -> list[float]:
        """Each member's static test top-1 in eval mode (the single run's `static_test_top1`), in one pass."""
        self.packed.eval()
        labels = torch.from_numpy(data.test.labels).to(device)
        predictions = torch.cat([self.packed.forward_static(images).argmax(2)
                                 for images in eval_batches(data.test, cfg.data, cfg.eval.batch_size, device)], 1)
        return (predictions == labels).float().mean(1).tolist()


def train_pack(members: Sequence[tuple[RunConfig, str | Path]], data: RunData | None = None) -> list[list[dict]]:
    """Train (or resume) the runs `members` (config, run folder) as one pack; return each one's metrics rows.

    Raises:
        ConfigError: runs that cannot share a pack (`check_pack`).
        MembersStopped: after the others have finished, when some member stopped (its error in its folder).
    """
    pairs = [(cfg, Path(out)) for cfg, out in members]
    check_pack(pairs)
    cfg = pairs[0][0]
    device = resolve_device(cfg.train.device)
    with ExitStack() as folders:
        for member_cfg, out in pairs:
            folders.enter_context(owned_run_dir(member_cfg, out, Distributed()))
        return _train_pack(pairs, data, device)


def _fresh(cfg: RunConfig, out: Path, data: RunData, device: torch.device) -> Member:
    """A member as `har train` initialises it (same seeding of its initialisation), before any checkpoint."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.num_classes)
    rng = rng_state()  # the single run draws nothing from the global generators after its initialisation
    model = model.to(device)
    if precision(cfg.train, device)[1]:  # as the single run lays out its model (the serial executor trains it)
        model = model.to(memory_format=torch.channels_last)
    har_loss = build_loss(cfg, data.class_counts).to(device)
    reweight = build_reweight(cfg, data.class_counts)
    optimizer = build_optimizer(cfg, model)
    return Member(cfg, out, model, har_loss, reweight, optimizer, build_scheduler(cfg, optimizer), rng, 0, None, [])


def _assemble(cfg: RunConfig, out: Path, data: RunData, device: torch.device) -> Member:
    """A member as `har train` would start or resume it."""
    (out / ERROR_FILE).unlink(missing_ok=True)
    member = _fresh(cfg, out, data, device)
    member.start, member.partial, rng = restore(cfg, out, member.model, member.optimizer, member.scheduler, device)
    record_machine(cfg, out, device, member.start)
    member.rng = member.rng if rng is None else rng
    member.history = read_history(out, member.start)
    return member


class PackSteps:
    """K fresh runs of one shape as one pack, stepped on batches the caller draws: per step exactly what
    `train_pack` computes (the executor's `train_step`: forward, each member's loss, backward, SGD step, epoch sums), at
    the first epoch's learning rate and class weights, with no run folder, checkpoint or epoch end. For
    benchmarks, which time a pack's step against a single run's."""

    def __init__(self, cfgs: Sequence[RunConfig], data: RunData, device: torch.device) -> None:
        placeholders = [(cfg, Path(f"pack-member-{k}")) for k, cfg in enumerate(cfgs)]  # named in errors only
        check_pack(placeholders)
        self.members = [_fresh(cfg, out, data, device) for cfg, out in placeholders]
        for m in self.members:
            set_class_weights(m.har_loss, m.reweight, 0, m.cfg, m.model.num_classes)
            m.progress = EpochProgress.begin(torch.empty(0, dtype=torch.long, device=device), m.model.num_exits,
                                             device)
        self.group = _executor(self.members, cfgs[0], device)
        self.group.load()
        self.group.train()
        self.steps = 0

    def __call__(self, drawn: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """One step of every member on its batch `drawn[k]`; their losses (on the device)."""
        losses = self.group.train_step(drawn, 0, self.steps)
        self.steps += 1
        return losses


def _train_pack(pairs: list[tuple[RunConfig, Path]], data: RunData | None, device: torch.device) -> list[list[dict]]:
    cfg = pairs[0][0]
    t = cfg.train
    if t.deterministic and device.type != "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = data or build_data(cfg.data)
    members = [_assemble(member_cfg, out, data, device) for member_cfg, out in pairs]
    batches = train_batches(data.train, cfg.data, t.batch_size, device)  # one copy of the images for all
    groups: dict[tuple[int, ...], _Executor] = {}
    interactive = sys.stderr.isatty()
    log.info("pack of %d runs on %s (%s executor): %s", len(members), device,
             resolve_executor(t.pack_executor, device), ", ".join(str(m.out) for m in members))
    with stop_requests() as stop:
        while not all(m.done for m in members):
            epoch = min(m.start for m in members if not m.done)
            due = [m for m in members if not m.done and m.start == epoch]
            steps = sorted({0 if m.partial is None else m.partial["step"] for m in due})
            for first_step in steps:  # apart only after a kill between two members' checkpoints
                ids = tuple(i for i, m in enumerate(members) if m in due
                            and (0 if m.partial is None else m.partial["step"]) == first_step)
                if ids not in groups:
                    groups[ids] = _executor([members[i] for i in ids], cfg, device)
                _train_epoch(groups[ids], batches, data, epoch, device, interactive, stop)
            if stop.signum is not None and not all(m.done for m in members):
                _stopped(stop, members, f"the end of epoch {epoch} (0-based)")
    failed = [m for m in members if m.error is not None]
    if failed:
        raise MembersStopped(f"{len(failed)} of {len(members)} pack members stopped (the others finished): "
                             + "; ".join(f"{m.out}: {m.error}" for m in failed),
                             {m.out: m.error for m in failed}, [m.history for m in members])
    return [m.history for m in members]


def _begin(member: Member, batches: TensorBatches, epoch: int, num_exits: int, device: torch.device) -> None:
    """Start (or continue) a member's epoch: its class weights, data order, augmentation generator, sums."""
    t = member.cfg.train
    set_class_weights(member.har_loss, member.reweight, epoch, member.cfg, member.model.num_classes)
    member.generator = epoch_generator(t.seed, epoch, batches.generator_device)
    if member.partial is not None:
        member.progress = EpochProgress.resume(member.partial, member.generator)
        member.partial = None
    else:
        member.progress = EpochProgress.begin(batches.order(member.generator), num_exits, device)
    member.batches = batches.epoch(member.generator, member.progress.order, member.progress.step)


def _train_epoch(group: _Executor, batches: TensorBatches, data: RunData, epoch: int, device: torch.device,
                 interactive: bool, stop: StopRequest) -> None:
    """The rest of `epoch` for the members of `group`, then their metrics rows and checkpoints."""
    members, cfg = group.members, group.members[0].cfg
    t = cfg.train
    for m in members:
        _begin(m, batches, epoch, group.num_exits, device)
    group.load()
    group.train()
    first = members[0].progress.step
    began = time.perf_counter() - members[0].progress.seconds
    bar = tqdm(total=len(batches), initial=first, desc=f"pack epoch {epoch + 1}/{t.epochs}", leave=False,
               disable=not interactive)
    for step in range(first, len(batches)):
        losses = group.train_step([next(m.batches) for m in members], epoch, step)
        bar.update()
        if (step + 1) % t.log_every == 0:
            _check_finite(members, epoch, len(batches))
            if not interactive:
                log.info("pack epoch %d step %d/%d loss %s", epoch + 1, step + 1, len(batches),
                         " ".join("-" if m.error else f"{loss.item():.4f}" for m, loss in zip(members, losses)))
        if stop.signum is not None and step + 1 < len(batches):
            bar.close()
            _check_finite(members, epoch, len(batches))  # never save a diverged member over a good state
            seconds = time.perf_counter() - began
            group.store()
            for m in members:
                if m.error is None:
                    m.progress.seconds = seconds
                    m.save(epoch - 1, {"epoch": epoch, **m.progress.state_dict(m.generator)})
            _stopped(stop, members, f"epoch {epoch} (0-based) at step {step + 1} of {len(batches)}")
    bar.close()
    _check_finite(members, epoch, len(batches))
    group.store()
    seconds = time.perf_counter() - began
    test_top1 = group.static_test_top1(data, cfg, device) if records_test(cfg, epoch) else None
    for k, m in enumerate(members):
        m.start = epoch + 1
        if m.error is not None:
            continue
        row = epoch_row(epoch, m.progress.sums, m.progress.seen, seconds)
        row["lr"] = m.optimizer.param_groups[0]["lr"]
        row["reweighted"] = m.reweight.weights(epoch) is not None
        if test_top1 is not None:
            row["test_top1"] = test_top1[k]
        with warnings.catch_warnings():  # the member's own optimiser never steps: the pack's does, in its place
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            m.scheduler.step()
        m.history.append(row)
        write_history(m.out, m.history)
        m.save(epoch)
    live = [m for m in members if m.error is None]
    if live:
        log.info("pack epoch %d/%d  (%.1f s)  loss %s  train acc %s", epoch + 1, t.epochs, seconds,
                 [round(m.history[-1]["loss"], 4) for m in live], [round(m.history[-1]["train_top1"], 4) for m in live])


def _check_finite(members: Sequence[Member], epoch: int, steps: int) -> None:
    """Stop each member whose loss turned non-finite (one read-back for all); the others go on."""
    bad = torch.stack([m.progress.sums["first_bad_step"] for m in members]).tolist()
    for m, step in zip(members, bad, strict=True):
        if step >= 0 and m.error is None:
            m.error = str(nonfinite_error(epoch, step, steps))
            log.error("%s: %s", m.out, m.error)
            atomic_write_text(m.out / ERROR_FILE, m.error + "\n")


def _stopped(stop: StopRequest, members: Sequence[Member], where: str) -> NoReturn:
    message = (f"{stop.name} received: saved the pack's {len(members)} checkpoints at {where}; run the same "
               f"command again to resume (exit status {EXIT_TEMPFAIL})")
    log.warning("%s", message)
    raise TrainingInterrupted(message)
