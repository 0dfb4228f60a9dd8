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
  `config.yaml`, `metrics.jsonl` and `last.pt` (written through `har.run`), so `har train` resumes
  any member alone and `har evaluate` reads it unchanged. On the CPU in float64 a member ends with its single
  run's weights and metrics within rounding (tested).
- Every member is checkpointed after every epoch and, on SIGTERM / SIGUSR1, mid-epoch (exit 75). A resumed pack
  continues each member from its own checkpoint; members whose checkpoints are at different points (a kill
  between two members' saves) train apart until they are level again, then together.
- A member whose loss turns non-finite stops with the single run's error (logged and written to its folder's
  `train.error`; its `last.pt` keeps its last good state); the others go on, and the pack then fails naming it.

The epoch loop is the single run's (`har.engine.loop`); two executors compute a pack's step
(`train.pack_executor`; `auto` picks by device, as measured in docs/benchmarks.md): `fused` trains the members as
one K-wide network, `serial` takes each member's own single-run step (`har.engine.step.StepLoss`, compiled as
`train.compile` says) in turn. On a CPU, whose grouped-convolution kernels are slower than K separate ones, serial
computes what K single runs would in the same time; the pack still shares one process, one copy of the data and one
job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from har.config import RunConfig
from har.data.batches import train_batches
from har.data.build import RunData, build_data
from har.engine.executors import pack_executor, resolve_executor
from har.engine.loop import train_members
from har.engine.member import fresh_member, resume_member
from har.engine.membership import check_pack
from har.engine.numerics import deterministic_cpu, exact_fp32
from har.errors import RunError
from har.run.assembly import precision, resolve_device
from har.run.prepare import owned_run_dir

log = logging.getLogger(__name__)


class MembersStopped(RunError):
    """Some members of a pack stopped (a non-finite loss); the others finished.

    Attributes:
        errors: each stopped member's run folder and its error (also in the folder's `train.error`).
        histories: every member's metrics rows, in the pack's order (a stopped member's up to its last good epoch).
    """

    def __init__(self, message: str, errors: dict[Path, str], histories: list[list[dict]]) -> None:
        super().__init__(message)
        self.errors, self.histories = errors, histories


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
    with ExitStack() as held:
        for member_cfg, out in pairs:
            held.enter_context(owned_run_dir(member_cfg, out))
        held.enter_context(exact_fp32(device, precision(cfg.train, device)[0]))  # members share the precision
        held.enter_context(deterministic_cpu(device, cfg.train.deterministic))
        held.enter_context(_recompile_limit_restored())
        return _train_pack(pairs, data, device)


@contextmanager
def _recompile_limit_restored() -> Iterator[None]:
    """Dynamo's global recompile limit as it was before the pack (the serial executor raises it for the members)."""
    config = torch._dynamo.config
    limit = config.recompile_limit
    try:
        yield
    finally:
        config.recompile_limit = limit


def _train_pack(pairs: list[tuple[RunConfig, Path]], data: RunData | None, device: torch.device) -> list[list[dict]]:
    cfg = pairs[0][0]
    data = data or build_data(cfg.data)
    members = []
    for member_cfg, out in pairs:
        member = fresh_member(member_cfg, out, data, device, alone=False)
        resume_member(member, device)
        members.append(member)
    batches = train_batches(data.train, cfg.data, cfg.train.batch_size, device)  # one copy of the images for all
    log.info("pack of %d runs on %s (%s executor): %s", len(members), device,
             resolve_executor(cfg.train.pack_executor, device), ", ".join(str(m.out) for m in members))
    train_members(members, lambda group: pack_executor(group, cfg, device), batches, data, device)
    failed = [m for m in members if m.error is not None]
    if failed:
        raise MembersStopped(f"{len(failed)} of {len(members)} pack members stopped (the others finished): "
                             + "; ".join(f"{m.out}: {m.error}" for m in failed),
                             {m.out: m.error for m in failed}, [m.history for m in members])
    return [m.history for m in members]
