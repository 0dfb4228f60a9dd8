"""How the epoch loop's members take a step: each its own single-run step in turn (`Serial`: a single run, or a
pack on the CPU) or all as one K-wide network (`Fused`: a pack on a GPU). The loop (`har.engine.loop`) is the same
for both; only the step differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from har.config import RunConfig
from har.data.batches import eval_batches
from har.data.build import RunData
from har.engine.bf16 import bf16_convolutions
from har.engine.distributed import Distributed
from har.engine.member import Member
from har.engine.run_state import static_test_top1, take_step
from har.engine.step import StepLoss, StepOutput, build_step_loss, step_statistics
from har.errors import PackError
from har.losses import HARLoss
from har.methods.mixup import Mixing, draw_mixing
from har.models.packed import PackedNet
from har.run.assembly import build_optimizer, precision


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


class Executor(Protocol):
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


def pack_executor(members: Sequence[Member], cfg: RunConfig, device: torch.device) -> Executor:
    """The executor `train.pack_executor` names for `device`, over the pack members `members`."""
    amp, channels_last = precision(cfg.train, device)
    if resolve_executor(cfg.train.pack_executor, device) == "serial":
        if cfg.train.compile != "off":
            # Dynamo keeps one graph per distinct loss setting (loss, HAR on or off, Mixup, then once more when
            # t differs), all under StepLoss.forward; past `recompile_limit` (8) it would train the other members
            # eagerly, and a pack of 16 can hold more settings than that. `train_pack` restores the limit.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 2 * len(members))
        steps = [build_step_loss(m.model, m.har_loss, m.model.num_exits, m.cfg, amp) for m in members]
        return Serial(members, steps)
    return Fused(members, cfg, amp, channels_last)


class Serial:
    """Each member's own single-run step in turn: its `StepLoss` (compiled as `train.compile` says), loss,
    backward and SGD step on the member's own modules and optimiser (`take_step`), exactly as `har train` takes
    them. A stopped member is skipped. `ctx`: the processes a single run is spread over (a pack is one process)."""

    def __init__(self, members: Sequence[Member], steps: Sequence[StepLoss], ctx: Distributed | None = None) -> None:
        self.members, self.steps = list(members), list(steps)
        self.num_exits = self.members[0].model.num_exits
        self.ctx = ctx or Distributed()

    def train(self) -> None:
        for m, step in zip(self.members, self.steps, strict=True):
            (m.set_train_mode or step.train)()

    def load(self) -> None:
        pass  # the members' own modules are the ones trained

    def train_step(self, drawn: Sequence[tuple[Tensor, Tensor]], epoch: int, step: int) -> list[Tensor]:
        losses = []
        for m, step_loss, (images, labels) in zip(self.members, self.steps, drawn, strict=True):
            if m.error is not None:
                losses.append(torch.full((), float("nan"), device=labels.device))
                continue
            losses.append(take_step(step_loss, m.optimizer, m.progress, m.cfg, images, labels, epoch, step,
                                    self.ctx))
        return losses

    def store(self) -> None:
        pass

    def static_test_top1(self, data: RunData, cfg: RunConfig, device: torch.device) -> list[float]:
        return [static_test_top1(m.model, data, cfg, device) for m in self.members]


class Fused:
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


