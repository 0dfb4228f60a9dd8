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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from har.atomic import atomic_write_text
from har.config import RunConfig, config_diff, config_hash, dump_config, to_dict
from har.data.augment import BatchAugment
from har.data.build import RunData, build_data
from har.data.loader import TensorBatches
from har.engine.checkpoint import RunError, atomic_save, resume_checkpoint
from har.engine.schedule import lr_factor
from har.engine.signals import EXIT_TEMPFAIL, StopRequest, TrainingInterrupted, stop_requests
from har.losses import HARLoss, ReweightSchedule, build_exit_loss, exit_statistics
from har.models import MultiExitNet, create_model

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
PREVIOUS = "prev.pt"
METRICS = "metrics.jsonl"


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


def build_model(cfg: RunConfig, num_classes: int) -> MultiExitNet:
    """The multi-exit network a config describes."""
    return create_model(cfg.model.name, num_classes=num_classes, layout=cfg.model.layout,
                        classifier=cfg.classifier, exit_channels=cfg.model.exit_channels,
                        exit_stride=cfg.model.exit_stride)


def build_loss(cfg: RunConfig, class_counts: list[int]) -> HARLoss:
    """The per-exit loss wrapped by HAR (threshold None: every exit trained on every example)."""
    exit_loss = build_exit_loss(cfg.loss.name, class_counts, focal_gamma=cfg.loss.focal_gamma,
                                ldam_max_margin=cfg.loss.ldam_max_margin, ldam_scale=cfg.loss.ldam_scale)
    return HARLoss(exit_loss, cfg.loss.train_threshold if cfg.loss.har else None)


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with the config's lr, momentum and weight decay (LDAM-DRW's optimiser)."""
    t = cfg.train
    return torch.optim.SGD(model.parameters(), lr=t.scaled_lr, momentum=t.momentum, weight_decay=t.weight_decay)


def prepare_run_dir(cfg: RunConfig, out: Path) -> None:
    """Write the resolved config and its hash, or check they match the folder's; remove the temporaries of a
    job killed while writing (only one job trains a folder at a time)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "config.sha256", METRICS, CHECKPOINT, PREVIOUS):
        for stale in out.glob(f".{name}.*.tmp"):  # har.atomic.atomic_write's temporary names
            log.info("removing %s, left by a job killed while writing %s", stale, name)
            stale.unlink(missing_ok=True)
    digest = config_hash(cfg)
    hash_path = out / "config.sha256"
    if hash_path.exists() and hash_path.read_text().strip() != digest:
        old = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").exists() else {}
        diff = "\n  ".join(config_diff(old, to_dict(cfg))) or "(config.yaml missing)"
        raise RunError(f"{out} holds a run of another config; choose another --out or delete the folder. "
                       f"Differences (folder -> asked):\n  {diff}")
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    atomic_write_text(hash_path, digest + "\n")


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Data order and augmentation of an epoch depend only on (seed, epoch), so a resumed run sees the same."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """RNG states must be CPU tensors; a checkpoint loaded with map_location=cuda holds them on the GPU."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _read_metrics(path: Path, before_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] < before_epoch]


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
    def begin(cls, order: Tensor, num_exits: int) -> EpochProgress:
        dev = order.device
        return cls(order, {"loss": torch.zeros((), device=dev), "normaliser": torch.zeros((), device=dev),
                           "correct": torch.zeros((), device=dev, dtype=torch.long),
                           "exit_counts": torch.zeros(num_exits, device=dev),
                           "exit_loss": torch.zeros(num_exits, device=dev),
                           "first_bad_step": torch.full((), -1, device=dev, dtype=torch.long)})

    def state_dict(self, generator: torch.Generator) -> dict[str, Any]:
        return {"order": self.order, "sums": self.sums, "step": self.step, "seen": self.seen,
                "seconds": self.seconds, "generator": generator.get_state()}

    @classmethod
    def resume(cls, state: dict[str, Any], generator: torch.Generator) -> EpochProgress:
        """Continue from `state_dict`; sets `generator` to its state after the last step done."""
        generator.set_state(state["generator"].cpu())
        return cls(state["order"], state["sums"], state["step"], state["seen"], state["seconds"])


def train(cfg: RunConfig, out: str | Path, data: RunData | None = None) -> list[dict]:
    """Train (or resume) one run into the folder `out`; return the per-epoch metrics.

    Args:
        cfg: the validated run config.
        out: the run folder.
        data: already built splits (the config's data section is used to build them when None).
    """
    out = Path(out)
    prepare_run_dir(cfg, out)
    device = resolve_device(cfg.train.device)
    t = cfg.train
    on_cuda = device.type == "cuda"
    amp = on_cuda if t.amp is None else t.amp
    channels_last = on_cuda if t.channels_last is None else t.channels_last
    if t.deterministic and not on_cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(t.seed)
    data = data or build_data(cfg.data)
    model = build_model(cfg, data.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = model if t.compile == "off" else torch.compile(model, mode=t.compile)
    har_loss = build_loss(cfg, data.class_counts).to(device)
    reweight = ReweightSchedule(cfg.loss.reweight, data.class_counts, beta=cfg.loss.cb_beta,
                                drw_epoch=cfg.loss.drw_epoch)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, t.warmup_epochs, t.lr_milestones, t.lr_decay, t.schedule, t.epochs))

    start, partial = 0, None
    ckpt_path, prev_path = out / CHECKPOINT, out / PREVIOUS
    ckpt = resume_checkpoint(ckpt_path, prev_path, map_location=device)
    if ckpt is not None:
        if ckpt.get("config_sha256") != config_hash(cfg):
            raise RunError(f"{ckpt_path} was written by another config; delete it or choose another --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start, partial = ckpt["epoch"] + 1, ckpt.get("partial")
        where = f"at step {partial['step']} of" if partial else "before"
        log.info("resuming %s %s epoch %d (0-based) of %d", out, where, start, t.epochs)
    history = _read_metrics(out / METRICS, start)

    def save(epoch_done: int, progress: dict[str, Any] | None = None) -> None:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch_done, "partial": progress,
                     "rng": _rng_state(), "config_sha256": config_hash(cfg), "config": to_dict(cfg)},
                    ckpt_path, keep_previous=prev_path)

    n = len(data.train)
    batches = TensorBatches(torch.from_numpy(data.train.images).to(device),
                            torch.from_numpy(data.train.labels).to(device), t.batch_size, shuffle=True,
                            augment=BatchAugment(cfg.data.mean, cfg.data.std), mean=cfg.data.mean,
                            std=cfg.data.std, drop_last=n % t.batch_size == 1)  # BatchNorm fails on 1 example
    interactive = sys.stderr.isatty()
    with stop_requests() as stop:
        for epoch in range(start, t.epochs):
            weights = reweight.weights(epoch)
            har_loss.exit_loss.set_weight(None if weights is None else weights.to(device))
            generator = _epoch_generator(t.seed, epoch, device)
            if partial is not None:
                progress = EpochProgress.resume(partial, generator)
                partial = None
            else:
                progress = EpochProgress.begin(batches.order(generator), model.num_exits)
            row = _train_epoch(step_model, har_loss, optimizer, batches, generator, epoch, cfg, interactive, amp,
                               progress, stop)
            if row is None:  # stopped by a signal inside the epoch
                save(epoch - 1, {"epoch": epoch, **progress.state_dict(generator)})
                _stopped(stop, ckpt_path, f"epoch {epoch} (0-based) at step {progress.step} of {len(batches)}")
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["reweighted"] = weights is not None
            scheduler.step()
            history.append(row)
            # metrics first: rows past the checkpoint's epoch are dropped on resume, and computed again
            atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))
            save(epoch)
            log.info("epoch %d/%d  loss %.4f  train acc %.4f  exit fractions %s  (%.1f s)", epoch + 1, t.epochs,
                     row["loss"], row["train_top1"], [round(f, 3) for f in row["exit_fraction"]], row["seconds"])
            if stop.signum is not None and epoch + 1 < t.epochs:
                _stopped(stop, ckpt_path, f"the end of epoch {epoch} (0-based)")
    return history


def _stopped(stop: StopRequest, ckpt_path: Path, where: str) -> NoReturn:
    """Report a signal stop once its checkpoint is written, and end the run with the retry status."""
    message = (f"{stop.name} received: saved {ckpt_path} at {where}; run the same command again to resume "
               f"(exit status {EXIT_TEMPFAIL})")
    log.warning("%s", message)
    raise TrainingInterrupted(message)


def _train_epoch(model: MultiExitNet, har_loss: HARLoss, optimizer: torch.optim.Optimizer,
                 batches: TensorBatches, generator: torch.Generator, epoch: int, cfg: RunConfig,
                 interactive: bool, amp: bool, progress: EpochProgress, stop: StopRequest) -> dict | None:
    """The rest of an epoch from `progress`: its metrics row, or None when `stop` fired before its last step.

    Statistics stay on the device until the end of the epoch: nothing in a step reads a value back to the
    host except the progress log every `log_every` steps, so the GPU is never left waiting on Python.
    """
    model.train()
    device = next(model.parameters()).device
    k = model.num_exits
    sums = progress.sums
    began = time.perf_counter() - progress.seconds
    bar = tqdm(total=len(batches), initial=progress.step, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
               leave=False, disable=not interactive)
    for step, (images, labels) in enumerate(batches.epoch(generator, progress.order, progress.step),
                                            progress.step):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
        logits = [out.float() for out in outputs]  # the losses run in float32
        parts = har_loss.components(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        optimizer.step()
        with torch.no_grad():
            sums["loss"] += parts.per_example.sum()
            sums["normaliser"] += parts.normaliser.sum()
            sums["correct"] += (logits[-1].argmax(1) == labels).sum()
            counts, exit_sums = exit_statistics(parts, k)
            sums["exit_counts"] += counts
            sums["exit_loss"] += exit_sums
            sums["first_bad_step"].masked_fill_((sums["first_bad_step"] < 0) & ~parts.loss.isfinite(), step)
        progress.step, progress.seen = step + 1, progress.seen + len(labels)
        bar.update()
        if (step + 1) % cfg.train.log_every == 0:
            _check_finite(progress, epoch, len(batches))
            if not interactive:
                log.info("epoch %d step %d/%d loss %.4f", epoch + 1, step + 1, len(batches), parts.loss.item())
        if stop.signum is not None and step + 1 < len(batches):
            bar.close()
            _check_finite(progress, epoch, len(batches))  # never save a diverged state over a good one
            progress.seconds = time.perf_counter() - began
            return None
    bar.close()
    _check_finite(progress, epoch, len(batches))
    counts = sums["exit_counts"].cpu()
    return {
        "epoch": epoch,
        "loss": (sums["loss"] / sums["normaliser"]).item(),
        "train_top1": sums["correct"].item() / progress.seen,
        "exit_fraction": (counts / progress.seen).tolist(),
        "exit_loss": [s / c if c else None for s, c in zip(sums["exit_loss"].cpu().tolist(), counts.tolist())],
        "seconds": time.perf_counter() - began,
    }


def _check_finite(progress: EpochProgress, epoch: int, steps: int) -> None:
    """Stop at the first non-finite loss, before a checkpoint of the diverged model is written (one read-back)."""
    bad = int(progress.sums["first_bad_step"])
    if bad >= 0:
        raise RunError(f"non-finite training loss at epoch {epoch}, step {bad} (both 0-based; {steps} steps per "
                       f"epoch); no checkpoint of the diverged model was written, {CHECKPOINT} keeps the last good "
                       f"state. Lower train.lr, or look for NaN / inf in the data")
