"""The state of a run folder that every trainer shares: its config files, lock, metrics rows, checkpoint contents,
and the per-epoch class weights, random streams and running sums that make a resumed run continue exactly.

The single-run trainer and the pack trainer both write folders through here, so a pack member's folder is a
single run's (../shared/DESIGN.md: "many runs, one assembly").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from har.atomic import atomic_write_text
from har.config import RunConfig, config_diff, config_hash, dump_config, stored_config_hash, to_dict
from har.data.batches import eval_batches
from har.data.build import RunData
from har.engine.assembly import precision
from har.engine.checkpoint import resume_checkpoint
from har.engine.distributed import Distributed
from har.engine.hardware import machine_record, read_machines
from har.engine.lock import folder_lock
from har.engine.step import StepLoss, StepOutput
from har.errors import ConfigError, DataError, RunError
from har.losses import HARLoss, ReweightSchedule
from har.methods.mixup import draw_mixing
from har.models import MultiExitNet
from har.run.folder import CHECKPOINT, MACHINE, METRICS, PREVIOUS

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: RunConfig, out: Path) -> bool:
    """Write the resolved config and its hash, or check they match the folder's; remove the temporaries of a
    job killed while writing (the caller holds the folder's lock). True when this call wrote a new config.yaml.

    Files already holding what would be written are left untouched, so a finished run in a read-only folder
    can be asked again (and a folder's files keep their dates).
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "config.sha256", METRICS, CHECKPOINT, PREVIOUS, MACHINE):
        for stale in out.glob(f".{name}.*.tmp"):  # har.atomic.atomic_write's temporary names
            log.info("removing %s, left by a job killed while writing %s", stale, name)
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:  # a read-only folder: harmless, nothing reads temporaries
                log.warning("could not remove %s (%s)", stale, exc.strerror)
    digest = config_hash(cfg)
    cfg_path = out / "config.yaml"
    try:
        old_text = cfg_path.read_text() if cfg_path.exists() else None
        old = None if old_text is None else yaml.safe_load(old_text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunError(f"{cfg_path} is unreadable ({exc}); delete {out} or choose another --out") from exc
    if old is not None and stored_config_hash(old) != digest:
        diff = "\n  ".join(config_diff(old, to_dict(cfg))) if isinstance(old, dict) else ""
        diff = diff or "(none in the values: the folder's config.yaml is not a valid config for this version)"
        raise RunError(f"{out} holds a run of another config; choose another --out or delete the folder. "
                       f"Differences (folder -> asked):\n  {diff}")
    _write_if_changed(cfg_path, dump_config(cfg), old_text)
    _write_if_changed(out / "config.sha256", digest + "\n")
    return old_text is None


def _write_if_changed(path: Path, text: str, current: str | None = None) -> None:
    """Replace `path` with `text` unless it holds it already (`current`: its text, when already read)."""
    if current is None and path.exists():
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None  # rewritten below
    if current != text:
        atomic_write_text(path, text)


@contextmanager
def owned_run_dir(cfg: RunConfig, out: Path, ctx: Distributed) -> Iterator[None]:
    """Rank 0 locks the run folder for the whole run and prepares it; a refused input (a named error before the
    first checkpoint) leaves no folder or config.yaml behind that this call created, so the corrected command
    then runs on the same --out.

    A folder this process may not write (no lock file could be created) is used unlocked when its run is
    finished (nothing is written); otherwise it is refused before any training.
    """
    if not ctx.is_main:
        yield
        return
    existed, undone = out.exists(), False
    try:
        with folder_lock(out, "train", "run folder (--out)", read_only_ok=True) as lock:
            if not lock.held:
                _refuse_unfinished_read_only(cfg, out, lock.read_only)
            created = prepare_run_dir(cfg, out)
            try:
                yield
            except (ConfigError, DataError, RunError):
                undone = created and not (out / CHECKPOINT).exists() and not (out / PREVIOUS).exists()
                if undone:
                    for name in ("config.yaml", "config.sha256", METRICS):
                        (out / name).unlink(missing_ok=True)
                    log.info("removed the config this run wrote in %s: it stopped before its first checkpoint", out)
                raise
    finally:
        if undone and not existed:
            with suppress(OSError):  # only when empty: a file someone else put there stays
                out.rmdir()


def _refuse_unfinished_read_only(cfg: RunConfig, out: Path, why: str) -> None:
    """A folder that cannot be written can only be read: a finished run passes, anything else is refused."""
    ckpt = resume_checkpoint(out / CHECKPOINT, out / PREVIOUS)
    done = 0 if ckpt is None else ckpt["epoch"] + 1
    if ckpt is None or ckpt.get("partial") is not None or done < cfg.train.epochs:
        raise RunError(f"{out} cannot be written ({why}) and its run is not finished ({done} of {cfg.train.epochs} "
                       f"epochs): make the folder writable, or choose another --out")




def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Data order and augmentation of an epoch depend only on (seed, epoch), so a resumed run sees the same."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """RNG states must be CPU tensors; a checkpoint loaded with map_location=cuda holds them on the GPU."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def read_history(out: Path, before_epoch: int | None = None) -> list[dict]:
    """The metrics rows of a run folder (those before `before_epoch` when given; none when there is no file)."""
    path = out / METRICS
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if before_epoch is None or r["epoch"] < before_epoch]


def write_history(out: Path, history: list[dict]) -> None:
    """Rewrite the folder's metrics rows (before the epoch's checkpoint: rows past it are dropped on resume)."""
    atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))


def restore(cfg: RunConfig, out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler,
            device: torch.device) -> tuple[int, dict | None, dict[str, Any] | None]:
    """Load the folder's newest readable checkpoint into the run's modules: (the next epoch, the mid-epoch progress,
    the saved RNG states), or (0, None, None) for a fresh run. A checkpoint of another config is refused."""
    ckpt = resume_checkpoint(out / CHECKPOINT, out / PREVIOUS, map_location=device)
    if ckpt is None:
        return 0, None, None
    if stored_config_hash(ckpt.get("config")) != config_hash(cfg):
        raise RunError(f"{out / CHECKPOINT} was written by another config; delete it or choose another --out")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    start, partial = ckpt["epoch"] + 1, ckpt.get("partial")
    where = f"at step {partial['step']} of" if partial else "before"
    log.info("resuming %s %s epoch %d (0-based) of %d", out, where, start, cfg.train.epochs)
    return start, partial, ckpt["rng"]


def record_machine(cfg: RunConfig, out: Path, device: torch.device, start: int) -> None:
    """Append this start's machine to the folder's `machine.jsonl`; refuse to go on in another precision or memory
    format than the run began with (left unset in the config, they may resolve differently on another machine).
    A finished run trains nothing more, and its folder (perhaps read-only) is left as it is."""
    if start >= cfg.train.epochs:
        return
    amp, channels_last = precision(cfg.train, device)
    record = machine_record(device, amp, channels_last, cfg.train.compile, start)
    earlier = read_machines(out)
    for before in earlier[:1] if start > 0 else []:
        if (before["precision"], before["channels_last"]) != (record["precision"], record["channels_last"]):
            raise RunError(f"{out} began training in {before['precision']} (channels-last {before['channels_last']})"
                           f" on {before['device_name']}, but would go on in {record['precision']} (channels-last "
                           f"{record['channels_last']}) here; set train.amp and train.channels_last to the run's "
                           f"values explicitly, or start a new run folder")
    lines = [json.dumps(r) for r in (earlier if start > 0 else [])] + [json.dumps(record)]
    atomic_write_text(out / MACHINE, "\n".join(lines) + "\n")


def set_class_weights(har_loss: HARLoss, reweight: ReweightSchedule, epoch: int, cfg: RunConfig,
                      num_classes: int) -> Tensor | None:
    """Give the exit loss the class weights of `epoch` and return them (None: unweighted). A compiled step trains
    with unit weights before DRW instead: the same values, and DRW then needs no recompile."""
    weights = reweight.weights(epoch)
    unit = weights is None and cfg.train.compile != "off"
    har_loss.exit_loss.set_weight(torch.ones(num_classes) if unit else weights)
    return weights


@dataclass
class EpochProgress:
    """How far an epoch got: its data order, the steps done and the running sums (device tensors).

    A mid-epoch checkpoint holds it with the epoch generator's state, so that the rest of the epoch draws,
    trains and sums exactly as an uninterrupted run would. `sums["first_bad_step"]` is the first step with a
    non-finite loss (-1: none), recorded on the device so that no step waits for a read-back.
    """

    order: Tensor
    sums: dict[str, Tensor]
    step: int = 0  # steps done
    seen: int = 0  # examples trained on
    seconds: float = 0.0  # time spent on the epoch by earlier attempts

    @classmethod
    def begin(cls, order: Tensor, num_exits: int, device: torch.device | None = None) -> EpochProgress:
        dev = order.device if device is None else device
        return cls(order, {"loss": torch.zeros((), device=dev), "normaliser": torch.zeros((), device=dev),
                           "correct": torch.zeros((), device=dev, dtype=torch.long),
                           "exit_counts": torch.zeros(num_exits, device=dev),
                           "exit_loss": torch.zeros(num_exits, device=dev),
                           "first_bad_step": torch.full((), -1, device=dev, dtype=torch.long)})

    def add(self, out: StepOutput, loss: Tensor, step: int, examples: int) -> None:
        """Add one step's statistics (`loss`: the step's normalised loss, checked for being finite)."""
        sums = self.sums
        with torch.no_grad():
            sums["loss"] += out.loss_sum.detach()
            sums["normaliser"] += out.normaliser
            sums["correct"] += out.correct
            sums["exit_counts"] += out.exit_counts
            sums["exit_loss"] += out.exit_loss
            sums["first_bad_step"].masked_fill_((sums["first_bad_step"] < 0) & ~loss.isfinite(), step)
        self.step, self.seen = step + 1, self.seen + examples

    def state_dict(self, generator: torch.Generator) -> dict[str, Any]:
        return {"order": self.order, "sums": self.sums, "step": self.step, "seen": self.seen,
                "seconds": self.seconds, "generator": generator.get_state()}

    @classmethod
    def resume(cls, state: dict[str, Any], generator: torch.Generator) -> EpochProgress:
        """Continue from `state_dict`; sets `generator` to its state after the last step done."""
        generator.set_state(state["generator"].cpu())
        return cls(state["order"], state["sums"], state["step"], state["seen"], state["seconds"])




def records_test(cfg: RunConfig, epoch: int) -> bool:
    """Whether this epoch's metrics row records test top-1 (`eval.record_test_from`; None: from the first lr
    milestone on CIFAR, never on the list datasets, whose 50,000-image test pass per epoch would cost GPU time
    for a protocol (LDAM-DRW's best epoch) that only the CIFAR rows follow)."""
    start = cfg.eval.record_test_from
    if start is None:
        start = None if cfg.data.is_list_dataset else min(cfg.train.lr_milestones, default=None)
    return start is not None and start >= 0 and epoch >= start


def take_step(step_loss: StepLoss, optimizer: torch.optim.Optimizer, progress: EpochProgress, cfg: RunConfig,
              images: Tensor, labels: Tensor, epoch: int, step: int, ctx: Distributed | None = None) -> Tensor:
    """One training step of a run (its Mixup draw, forward and loss, backward, SGD step, the epoch's sums); the
    loss, on the device. The single run and the pack's serial executor both take it, so a serial member steps
    exactly as its single run. Each process's loss is its examples' share of the global batch's loss (the
    normaliser summed over all processes), so DistributedDataParallel's gradient average is the one-process one."""
    ctx = ctx or Distributed()
    t = cfg.train
    mixing = None if t.mixup == "off" else draw_mixing(t.mixup_alpha, t.seed, epoch, step, len(labels), images.device)
    out = step_loss(images, labels, mixing)
    loss = out.loss_sum * ctx.world / ctx.all_reduce(out.normaliser)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    progress.add(out, loss, step, len(labels))
    return loss


@torch.no_grad()
def static_test_top1(model: MultiExitNet, data: RunData, cfg: RunConfig, device: torch.device) -> float:
    """Static test top-1 (the backbone's own classifier) in eval mode, for the LDAM-DRW protocol's best epoch.

    Uses no random numbers (no augmentation, no dropout), so a resumed run stays bit-identical; every process of
    a distributed run computes it on the whole test split, which keeps them in step without a collective.
    The next epoch puts the model back in training mode.
    """
    model.eval()
    labels = torch.from_numpy(data.test.labels).to(device)
    predictions = torch.cat([model.forward_static(images).argmax(1)
                             for images in eval_batches(data.test, cfg.data, cfg.eval.batch_size, device)])
    return (predictions == labels).float().mean().item()


def checkpoint_state(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, epoch_done: int, progress: dict | None,
                     rng: dict[str, Any]) -> dict[str, Any]:
    """What `last.pt` holds: model, optimiser, schedule, the last finished epoch, a mid-epoch progress (or None),
    the RNG states and the config with its hash."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch_done, "partial": progress, "rng": rng, "config_sha256": config_hash(cfg),
            "config": to_dict(cfg)}


def epoch_row(epoch: int, sums: dict[str, Tensor], seen: int, seconds: float) -> dict:
    """An epoch's metrics row from its running sums (loss, train top-1, exit fractions and per-exit loss)."""
    counts = sums["exit_counts"].cpu()
    return {
        "epoch": epoch,
        "loss": (sums["loss"] / sums["normaliser"]).item(),
        "train_top1": sums["correct"].item() / seen,
        "exit_fraction": (counts / seen).tolist(),
        "exit_loss": [s / c if c else None for s, c in zip(sums["exit_loss"].cpu().tolist(), counts.tolist())],
        "seconds": seconds,
    }


def nonfinite_error(epoch: int, step: int, steps: int) -> RunError:
    """The error of a run whose loss turned non-finite (no checkpoint of the diverged model is written)."""
    return RunError(f"non-finite training loss at epoch {epoch}, step {step} (both 0-based; {steps} steps per "
                    f"epoch); no checkpoint of the diverged model was written, {CHECKPOINT} keeps the last good "
                    f"state. Lower train.lr, or look for NaN / inf in the data")
