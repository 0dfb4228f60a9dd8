"""One assembly of a run from its config: its device, model, loss, optimiser and schedule, and the record of the
machine it resolved them on (`machine.jsonl`); the engine builds its step from them (`har.engine.step`). The trainer
and the evaluation both build from here, so neither imports the other (../DESIGN.md: "many runs, one assembly").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from har.atomic import atomic_write_text
from har.config import RunConfig, TrainConfig
from har.errors import RunError
from har.losses import HARLoss, ReweightSchedule, build_exit_loss
from har.methods import decoupled
from har.models import MultiExitNet, create_model
from har.run import machine
from har.run.folder import MACHINE
from har.run.machine import machine_record, read_machines
from har.run.schedule import lr_factor


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` means CUDA when present; a distributed process (`local_rank` given) takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)


def build_model(cfg: RunConfig, num_classes: int) -> MultiExitNet:
    """The multi-exit network a config describes (with the final classifier a decoupled stage two trains)."""
    model = create_model(cfg.model.name, num_classes=num_classes, layout=cfg.model.layout,
                         classifier=cfg.classifier, exit_channels=cfg.model.exit_channels,
                         exit_stride=cfg.model.exit_stride)
    return decoupled.attach(cfg, model)


def build_loss(cfg: RunConfig, class_counts: list[int]) -> HARLoss:
    """The per-exit loss wrapped by HAR (threshold None: every exit trained on every example)."""
    exit_loss = build_exit_loss(cfg.loss.name, class_counts, focal_gamma=cfg.loss.focal_gamma,
                                ldam_max_margin=cfg.loss.ldam_max_margin, ldam_scale=cfg.loss.ldam_scale)
    return HARLoss(exit_loss, cfg.loss.train_threshold if cfg.loss.har else None)


def build_reweight(cfg: RunConfig, class_counts: list[int]) -> ReweightSchedule:
    """The class weights of each epoch (none, class-balanced, or DRW's switch to them)."""
    return ReweightSchedule(cfg.loss.reweight, class_counts, beta=cfg.loss.cb_beta, drw_epoch=cfg.loss.drw_epoch)


def precision(t: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """bf16 autocast and channels-last on `device`, where the config leaves them unset: autocast on for CUDA and for
    a CPU that computes bf16 natively (`machine.native_bf16`; 1.6x fp32 on one core of the Zen 4 AMD EPYC, 3.3x with
    two processes), off for other CPUs (there `har.engine.bf16` computes autocast's convolutions in float32, no
    faster than fp32); channels-last with autocast (the layout of oneDNN's and cuDNN's bf16 kernels; in fp32 on the
    AMD EPYC it measured 0.94-1.05x NCHW), so a CPU run in fp32 keeps NCHW (docs/benchmarks.md, "CPU rows"). The run
    folder's `machine.jsonl` records what they resolved to."""
    amp = (device.type == "cuda" or machine.native_bf16()) if t.amp is None else t.amp
    return amp, (amp if t.channels_last is None else t.channels_last)


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (LDAM-DRW's optimiser) over the parameters that train, with the lr scaled to the global batch."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=t.scaled_lr, momentum=t.momentum, weight_decay=t.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-epoch lr factor of `train` (warm-up, then step decays or cosine), stepped once per epoch."""
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, t.warmup_epochs, t.lr_milestones, t.lr_decay, t.schedule, t.epochs))


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
