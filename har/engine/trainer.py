"""One training run: config in, run folder out (resolved config, per-epoch metrics, checkpoint).

The run folder holds `config.yaml` and `config.sha256` (the resolved config and the hash of what decides
the result), `metrics.jsonl` (one JSON line per epoch) and `last.pt` (model, optimiser, schedule, epoch and
RNG states, rewritten atomically after every epoch). Starting `train` again on the same folder with the
same config resumes after the last complete epoch; another config is refused with the difference. The
final model is the last epoch's: nothing is selected on the test set.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from har.atomic import atomic_write_text
from har.config import RunConfig, config_diff, config_hash, dump_config, to_dict
from har.data.augment import BatchAugment
from har.data.build import RunData, build_data
from har.data.loader import TensorBatches
from har.engine.checkpoint import RunError, atomic_save, load_checkpoint
from har.engine.schedule import lr_factor
from har.losses import HARLoss, ReweightSchedule, build_exit_loss, exit_statistics
from har.models import MultiExitNet, create_model

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
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


def prepare_run_dir(cfg: RunConfig, out: Path) -> None:
    """Write the resolved config and its hash, or check they match the folder's."""
    out.mkdir(parents=True, exist_ok=True)
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
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_metrics(path: Path, before_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] < before_epoch]


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
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, t.warmup_epochs, t.lr_milestones, t.lr_decay))

    start = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if ckpt.get("config_sha256") != config_hash(cfg):
            raise RunError(f"{ckpt_path} was written by another config; delete it or choose another --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start = ckpt["epoch"] + 1
        log.info("resuming %s after epoch %d of %d", out, start, t.epochs)
    history = _read_metrics(out / METRICS, start)

    n = len(data.train)
    batches = TensorBatches(torch.from_numpy(data.train.images).to(device),
                            torch.from_numpy(data.train.labels).to(device), t.batch_size, shuffle=True,
                            augment=BatchAugment(cfg.data.mean, cfg.data.std), mean=cfg.data.mean,
                            std=cfg.data.std, drop_last=n % t.batch_size == 1)  # BatchNorm fails on 1 example
    interactive = sys.stderr.isatty()
    for epoch in range(start, t.epochs):
        weights = reweight.weights(epoch)
        har_loss.exit_loss.set_weight(None if weights is None else weights.to(device))
        row = _train_epoch(step_model, har_loss, optimizer, batches, _epoch_generator(t.seed, epoch, device),
                           epoch, cfg, interactive, amp)
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["reweighted"] = weights is not None
        scheduler.step()
        history.append(row)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": _rng_state(),
                     "config_sha256": config_hash(cfg), "config": to_dict(cfg)}, ckpt_path)
        atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))
        log.info("epoch %d/%d  loss %.4f  train acc %.4f  exit fractions %s  (%.1f s)", epoch + 1, t.epochs,
                 row["loss"], row["train_top1"], [round(f, 3) for f in row["exit_fraction"]], row["seconds"])
    return history


def _train_epoch(model: MultiExitNet, har_loss: HARLoss, optimizer: torch.optim.Optimizer,
                 batches: TensorBatches, generator: torch.Generator, epoch: int, cfg: RunConfig,
                 interactive: bool, amp: bool) -> dict:
    """One pass over the training data; statistics stay on the device until the end of the epoch.

    Nothing in a step reads a value back to the host (except the optional progress line), so the GPU is
    never left waiting on Python.
    """
    model.train()
    device = next(model.parameters()).device
    k = model.num_exits
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    exit_counts = torch.zeros(k, device=device)
    exit_loss_sums = torch.zeros(k, device=device)
    seen = 0
    began = time.perf_counter()
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
               disable=not interactive)
    for step, (images, labels) in enumerate(batches.epoch(generator)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
        logits = [out.float() for out in outputs]  # the losses run in float32
        parts = har_loss.components(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += parts.per_example.sum()
            norm_sum += parts.normaliser.sum()
            correct += (logits[-1].argmax(1) == labels).sum()
            counts, sums = exit_statistics(parts, k)
            exit_counts += counts
            exit_loss_sums += sums
        seen += len(labels)
        bar.update()
        if not interactive and (step + 1) % cfg.train.log_every == 0:
            log.info("epoch %d step %d/%d loss %.4f", epoch + 1, step + 1, len(batches), parts.loss.item())
    bar.close()
    loss = (loss_sum / norm_sum).item()
    if not math.isfinite(loss):
        raise RunError(f"non-finite training loss ({loss}) in epoch {epoch} (0-based); the checkpoint of the "
                       f"previous epoch is kept. Lower train.lr or check the data.")
    counts = exit_counts.cpu()
    return {
        "epoch": epoch,
        "loss": loss,
        "train_top1": correct.item() / seen,
        "exit_fraction": (counts / seen).tolist(),
        "exit_loss": [s / c if c else None for s, c in zip(exit_loss_sums.cpu().tolist(), counts.tolist())],
        "seconds": time.perf_counter() - began,
    }
