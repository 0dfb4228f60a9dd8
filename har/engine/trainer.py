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
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from har.atomic import atomic_write_text
from har.config import RunConfig, config_hash, to_dict
from har.data.batches import eval_batches, train_batches
from har.data.build import RunData, build_data
from har.engine.distributed import Distributed, from_environment, process_group
from har.engine.executors import Serial
from har.engine.loop import train_members
from har.engine.member import fresh_member, fresh_model, resume_member
from har.engine.numerics import deterministic_cpu, exact_fp32
from har.engine.run_state import set_rng_state
from har.engine.step import build_step_loss
from har.errors import RunError
from har.methods import decoupled
from har.models import MultiExitNet
from har.run.assembly import precision, resolve_device
from har.run.checkpoint import atomic_save
from har.run.folder import CHECKPOINT, METRICS
from har.run.prepare import owned_run_dir
from har.run.stage_one import load_stage_one

log = logging.getLogger(__name__)


def train(cfg: RunConfig, out: str | Path, data: RunData | None = None) -> list[dict]:
    """Train (or resume) one run into the folder `out`; return the per-epoch metrics.

    Started by torchrun, every process calls this with the same arguments: each trains on its share of every
    global batch, and only rank 0 writes the folder.

    Args:
        cfg: the validated run config.
        out: the run folder.
        data: already built splits (the config's data section is used to build them when None).

    Raises:
        RunError: the loss turned non-finite (the folder keeps the last good checkpoint), among others.
        TrainingInterrupted: stopped by SIGTERM / SIGUSR1 after saving a checkpoint (exit status 75).
    """
    ctx = from_environment()
    device = resolve_device(cfg.train.device, ctx.local_rank if ctx.enabled else None)
    with (process_group(ctx, device), owned_run_dir(cfg, Path(out), ctx.is_main),
          exact_fp32(device, precision(cfg.train, device)[0]), deterministic_cpu(device, cfg.train.deterministic)):
        return _train(cfg, Path(out), data, ctx, device)


def _train(cfg: RunConfig, out: Path, data: RunData | None, ctx: Distributed, device: torch.device) -> list[dict]:
    ctx.barrier()  # rank 0 has locked and prepared the folder
    t = cfg.train
    on_cuda = device.type == "cuda"
    data = data or build_data(cfg.data)
    stage_two = cfg.decouple.method != "none"
    if cfg.decouple.method == "tau_norm":
        model, _ = fresh_model(cfg, data.num_classes, device, _stage_two(cfg, out, device, ctx))
        return _tau_norm(cfg, out, model, data, device, ctx)
    member = fresh_member(cfg, out, data, device, alone=True,
                          adapt=_stage_two(cfg, out, device, ctx) if stage_two else None)
    model = member.model
    wrapped: torch.nn.Module = model
    if ctx.enabled:
        if t.sync_batchnorm:
            if not on_cuda:
                raise RunError("train.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU kernel); turn it off")
            wrapped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if on_cuda else None)
    step_loss = build_step_loss(wrapped, member.har_loss, model.num_exits, cfg, precision(t, device)[0],
                                distributed=ctx.enabled)
    rng = resume_member(member, device, writes=ctx.is_main)
    if rng is not None:
        set_rng_state(rng)
    if member.partial is not None and not ctx.is_main:  # rank 0's checkpoint holds the sums of every process
        partial = member.partial
        member.partial = {**partial, "sums": {k: torch.zeros_like(v) if k != "first_bad_step" else v
                                              for k, v in partial["sums"].items()}, "seen": 0}
    batches = train_batches(data.train, cfg.data, t.batch_size, device, ctx.rank, ctx.world)
    if stage_two:
        balanced_labels = torch.from_numpy(data.train.labels).to(batches.generator_device)
        member.draw_order = lambda generator: decoupled.class_balanced_order(balanced_labels, generator)
        member.set_train_mode = lambda: decoupled.train_mode(model)
    executor = Serial([member], [step_loss], ctx)
    train_members([member], lambda _: executor, batches, data, device, ctx)
    if member.error is not None:
        raise RunError(member.error)
    ctx.barrier()  # nobody reads the folder before rank 0 has written it
    return member.history


def _stage_two(cfg: RunConfig, out: Path, device: torch.device, ctx: Distributed) -> Callable[[MultiExitNet], None]:
    """A decoupled stage two's change to the fresh model: stage one's weights (tied to this folder by rank 0, the
    process that writes it), then only what the method trains left trainable."""
    def adapt(model: MultiExitNet) -> None:
        load_stage_one(cfg, model, device, out if ctx.is_main else None)
        decoupled.trainable_parameters(cfg, model)
    return adapt


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
