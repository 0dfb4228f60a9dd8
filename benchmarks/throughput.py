"""Training throughput, early-exit inference time and peak memory of `har` on one machine, in one process.

Training rows time the trainer's own step (`take_step`, what the epoch loop's serial executor takes) over a fixed
number of batches, fed either by the package's data path (uint8 images on the device, `TensorBatches` +
`BatchAugment`) or by the reference path of LDAM-DRW (PIL images, torchvision transforms, `DataLoader` workers, a
copy to the device every step); pack rows time the step of `train_pack` (`PackSteps` below: the pack's executor)
for K runs trained by each executor asked for (`fused`: one K-wide network; `serial`: each member's own step in
turn). All rows are built and warmed up first, then timed in rounds, taking turns. Each row is set against the
single eager, compiled and reference rows, the device's peak FLOP/s and a memory-bandwidth bound computed for the
network (`BOUND_MODEL`).
Inference rows time `forward_static` (the bare backbone) against `forward_early_exit` at exit thresholds s chosen
so that the MACs saving the counter predicts is near a few targets. It prints figures; it is not a timed test.

    python benchmarks/throughput.py                    # CIFAR-10-LT-100 from $HAR_DATA; CUDA when present
    python benchmarks/throughput.py --run runs/quick --set data.bundle=.carry/cifar10-lt100.npz.xz --device cuda \
        --compile --compile-mode reduce-overhead --packs 2 4 8 16 32 --share 4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import platform
import queue as queue_module
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from har.atomic import atomic_write_json, atomic_write_text
from har.config import RunConfig, load_config
from har.data import BatchAugment, TensorBatches, normalize
from har.data.build import RunData, Split, build_data
from har.engine.executors import EXECUTORS, pack_executor
from har.engine.member import fresh_member
from har.engine.membership import check_pack
from har.engine.run_state import EpochProgress, set_class_weights, take_step
from har.engine.step import build_step_loss
from har.evaluation.dynamic import NO_EXIT_THRESHOLD
from har.evaluation.early_exit import thresholds_for_savings
from har.evaluation.evaluate import collect_logits
from har.evaluation.flops import dynamic_cost, flops_table
from har.models import MultiExitNet
from har.models.exits import exit_by_threshold
from har.run.assembly import build_loss, build_model, build_optimizer, resolve_device
from har.run.checkpoint import load_checkpoint
from har.run.folder import CHECKPOINT, CONFIG

log = logging.getLogger("benchmark")

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training row: the method (config overrides) and how data and precision are handled."""

    name: str
    overrides: tuple[str, ...]
    fast_data: bool  # the package's path; False: LDAM-DRW's PIL + DataLoader path
    mixed: bool  # bf16 autocast + channels-last, as the trainer does by default on CUDA (on the CPU: CPU rows only)
    cuda_only: bool = False
    compiled: bool = False  # torch.compile (train.compile); only with --compile: compiling takes minutes
    cpu: bool = False  # a CPU row (--cpu-rows): its precision and memory format as given, also on the CPU
    channels_last: bool | None = None  # CPU rows: channels-last without autocast (None: as `mixed`)
    threads: int = 0  # CPU rows: the row's torch threads (0: --threads)

    def mixed_on(self, device: torch.device) -> bool:
        """Whether this row runs in bf16 autocast on `device`: on CUDA when mixed, on the CPU for CPU rows only."""
        return self.mixed and (device.type == "cuda" or self.cpu)

    def channels_last_on(self, device: torch.device) -> bool:
        return self.mixed_on(device) if self.channels_last is None else self.channels_last


HAR_CE = ("loss.name=ce", "loss.har=true", "loss.train_threshold=0.9", "model.layout=CEBEBEBE")
VARIANTS = (
    Variant("har-fast", HAR_CE, fast_data=True, mixed=True),
    Variant("har-fast-fp32", HAR_CE, fast_data=True, mixed=False, cuda_only=True),
    Variant("har-fast-compiled", HAR_CE, fast_data=True, mixed=True, compiled=True),
    Variant("har-reference", HAR_CE, fast_data=False, mixed=False),
    Variant("ce-bare-fast", ("loss.name=ce", "loss.har=false", "model.layout=CBBBE"), fast_data=True, mixed=True),
)
# --cpu-rows: the trainer's HAR(CE) step on the package's data path in each precision, memory format, compile mode and
# thread count a 2-core CPU offers; the first is the baseline the others are set against (x fp32 1 thread), and
# CPU_SHARED runs a row in 2 processes at once (one core each, as the reference set trains).
CPU_VARIANTS = (
    Variant("cpu-fp32-1t", HAR_CE, fast_data=True, mixed=False, cpu=True, channels_last=False, threads=1),
    Variant("cpu-fp32-2t", HAR_CE, fast_data=True, mixed=False, cpu=True, channels_last=False, threads=2),
    Variant("cpu-fp32-cl-1t", HAR_CE, fast_data=True, mixed=False, cpu=True, channels_last=True, threads=1),
    Variant("cpu-fp32-cl-2t", HAR_CE, fast_data=True, mixed=False, cpu=True, channels_last=True, threads=2),
    Variant("cpu-bf16-1t", HAR_CE, fast_data=True, mixed=True, cpu=True, threads=1),
    Variant("cpu-bf16-2t", HAR_CE, fast_data=True, mixed=True, cpu=True, threads=2),
    Variant("cpu-fp32-cl-compiled-2t", HAR_CE, fast_data=True, mixed=False, cpu=True, channels_last=True, threads=2,
            compiled=True),
    Variant("cpu-bf16-compiled-2t", HAR_CE, fast_data=True, mixed=True, cpu=True, threads=2, compiled=True),
)
CPU_SHARED = ("cpu-fp32-1t", "cpu-bf16-1t")
# Peak rates of known GPUs (dense, NVIDIA's data sheets), by torch.cuda.get_device_name(): memory bandwidth, and
# tensor-core TFLOP/s in bf16 (the mixed rows) and TF32 (the fp32 rows: cuDNN convolutions run TF32 by default).
KNOWN_PEAKS = {"NVIDIA H200": {"gbps": 4800.0, "tflops_mixed": 989.0, "tflops_fp32": 494.0},
               "NVIDIA H100 80GB HBM3": {"gbps": 3350.0, "tflops_mixed": 989.0, "tflops_fp32": 494.0}}
# Optimiser-side traffic per parameter and step, fp32: weights read in forward and in backward, gradient written,
# SGD with momentum reads weight, gradient and momentum and writes weight and momentum.
PARAMETER_ACCESSES = 8
BOUND_MODEL = (
    "bandwidth bound: images/s = peak bytes/s / bytes per training image; bytes per image = 2 x the bytes of every "
    "leaf module's output in one forward (each written in forward, read once in backward; in the row's dtypes, "
    "measured) + 8 x 4 bytes x parameters / batch (fp32 weights read in forward and backward, gradient written, "
    "SGD momentum: weight, gradient and momentum read, weight and momentum written). A lower bound on the traffic "
    "(no input reads, no activation gradients, perfect reuse), so an upper bound on images/s. 'unfused': every "
    "leaf module reads its inputs and writes its output in forward, and in backward reads its output gradient and "
    "saved input and writes its input gradient (3 x inputs + 2 x outputs), what eager kernels without fusion move")
FLOP_MODEL = ("training FLOPs per image = 3 x 2 x MACs of the forward with every exit head (har.evaluation.flops; "
              "backward about twice the forward; batch norm, ReLU and the loss not counted)")


def synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: a clock read without this would time the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak tensor memory on CUDA since the last reset; on the CPU the process's peak RSS (monotone, process-wide)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def memory_in_use_mib(device: torch.device) -> float | None:
    """Tensor memory allocated on CUDA; on the CPU the process's current RSS (None where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20 if statm.exists() else None


class PILImages(Dataset):
    """LDAM-DRW's data path (torchvision's CIFAR datasets): each example becomes a PIL image, then is transformed."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Tensor]):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def device_batches(data: RunData, cfg: RunConfig, device: torch.device) -> TensorBatches:
    """The package's path: the training set sits on the device as uint8, batches are gathered and augmented there."""
    mean, std = cfg.data.normalization()
    return TensorBatches(torch.from_numpy(data.train.images).to(device),
                         torch.from_numpy(data.train.labels).to(device), cfg.train.batch_size, shuffle=True,
                         augment=BatchAugment(mean, std), mean=mean, std=std, drop_last=True)


def endless(batches: TensorBatches, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Epoch after epoch of `batches`, drawn from `generator`."""
    while True:
        yield from batches.epoch(generator)


def reference_stream(data: RunData, cfg: RunConfig, device: torch.device, workers: int,
                     generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """LDAM-DRW's path: per-image PIL transforms in DataLoader workers, then a host-to-device copy every step."""
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(*cfg.data.normalization())])
    loader = DataLoader(PILImages(data.train.images, data.train.labels, transform), batch_size=cfg.train.batch_size,
                        shuffle=True, num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0, generator=generator)
    while True:
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@dataclasses.dataclass
class Prepared:
    """A training row ready to time: a function running n of its steps, its release, what one step trains."""

    run: Callable[[int], None]
    close: Callable[[], None]
    model: torch.nn.Module  # one run's model (a pack member's): what the cost per image is computed on
    mixed: bool
    images_per_step: int


def prepare_training(variant: Variant, cfg: RunConfig, data: RunData, device: torch.device,
                     args: argparse.Namespace) -> Prepared:
    """The trainer's step (forward, HAR loss, backward, SGD step) of one run, to be run a given number of times."""
    mixed = variant.mixed_on(device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.num_classes).to(device)
    if variant.channels_last_on(device):
        model = model.to(memory_format=torch.channels_last)
    har_loss = build_loss(cfg, data.class_counts).to(device)
    t = cfg.train
    optimizer = build_optimizer(cfg, model)
    if variant.fast_data:
        generator = torch.Generator(device=device).manual_seed(t.seed)
        stream = endless(device_batches(data, cfg, device), generator)
    else:
        generator = torch.Generator().manual_seed(t.seed)
        stream = reference_stream(data, cfg, device, args.workers, generator)

    compiled = dataclasses.replace(t, compile=args.compile_mode if variant.compiled else "off")
    step_loss = build_step_loss(model, har_loss, model.num_exits, dataclasses.replace(cfg, train=compiled), mixed)

    def run(steps: int) -> None:
        step_loss.train()
        progress = EpochProgress.begin(torch.empty(0, dtype=torch.long, device=device), model.num_exits)
        for step in range(steps):
            images, labels = next(stream)
            take_step(step_loss, optimizer, progress, cfg, images, labels, 0, step)

    # close() stops the DataLoader workers
    return Prepared(run, stream.close, model, mixed, cfg.train.batch_size)


class PackSteps:
    """K fresh runs of one shape as one pack, stepped on batches the caller draws: per step exactly what
    `train_pack` computes (its executor's `train_step`: forward, each member's loss, backward, SGD step, epoch
    sums), at the first epoch's learning rate and class weights, with no run folder, checkpoint or epoch end."""

    def __init__(self, cfgs: Sequence[RunConfig], data: RunData, device: torch.device) -> None:
        placeholders = [(cfg, Path(f"pack-member-{k}")) for k, cfg in enumerate(cfgs)]  # named in errors only
        check_pack(placeholders)
        self.members = [fresh_member(cfg, out, data, device, alone=False) for cfg, out in placeholders]
        for m in self.members:
            set_class_weights(m.har_loss, m.reweight, 0, m.cfg, m.model.num_classes)
            m.progress = EpochProgress.begin(torch.empty(0, dtype=torch.long, device=device), m.model.num_exits,
                                             device)
        self.group = pack_executor(self.members, cfgs[0], device)
        self.group.load()
        self.group.train()
        self.steps = 0

    def __call__(self, drawn: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """One step of every member on its batch `drawn[k]`; their losses (on the device)."""
        losses = self.group.train_step(drawn, 0, self.steps)
        self.steps += 1
        return losses


def pack_configs(k: int, executor: str, cfg_for: Callable[[list[str]], RunConfig], device: torch.device,
                 args: argparse.Namespace) -> list[RunConfig]:
    """K HAR(CE) members of `har-fast`'s shape and precision that differ in seed (0 .. K-1), as a grid's seeds do,
    trained by `executor`; compiled with --compile on CUDA."""
    mixed = device.type == "cuda"
    compiled = args.compile_mode if args.compile and mixed else "off"
    return [cfg_for([*HAR_CE, f"train.seed={seed}", f"train.compile={compiled}", f"train.amp={mixed}",
                     f"train.channels_last={mixed}", f"train.pack_executor={executor}"]) for seed in range(k)]


def prepare_pack(cfgs: Sequence[RunConfig], data: RunData, device: torch.device) -> Prepared:
    """A pack's step as `train_pack` takes it (`PackSteps`), each member on its own stream of the on-device data
    (one copy of the images, one generator per member, seeded by its seed)."""
    pack = PackSteps(cfgs, data, device)
    batches = device_batches(data, cfgs[0], device)
    streams = [endless(batches, torch.Generator(device=device).manual_seed(c.train.seed)) for c in cfgs]

    def run(steps: int) -> None:
        for _ in range(steps):
            pack([next(stream) for stream in streams])

    return Prepared(run, lambda: None, pack.members[0].model, bool(cfgs[0].train.amp),
                    len(cfgs) * cfgs[0].train.batch_size)


def describe(variant: Variant, cfg: RunConfig, device: torch.device, args: argparse.Namespace) -> dict:
    """What a training row ran: model, loss, data path and precision."""
    mixed, channels_last = variant.mixed_on(device), variant.channels_last_on(device)
    return {"variant": variant.name, "layout": cfg.model.layout, "loss": cfg.loss.name, "har": cfg.loss.har,
            "data_path": "uint8 on device" if variant.fast_data else f"PIL + DataLoader ({args.workers} workers)",
            "precision": ("bf16 autocast" if mixed else "fp32") + (", channels-last" if channels_last else "")
            + (", compiled" if variant.compiled else ""), "steps": args.steps, "batch_size": cfg.train.batch_size,
            "threads": variant.threads or args.threads or torch.get_num_threads()}


def describe_pack(cfgs: Sequence[RunConfig], args: argparse.Namespace) -> dict:
    """What a pack row ran: K members of one model and loss, their precision."""
    cfg = cfgs[0]
    compiled = cfg.train.compile != "off"
    return {"variant": f"har-pack{len(cfgs)}-{cfg.train.pack_executor}" + ("-compiled" if compiled else ""),
            "layout": cfg.model.layout, "executor": cfg.train.pack_executor,
            "loss": cfg.loss.name, "har": cfg.loss.har, "members": len(cfgs),
            "data_path": f"uint8 on device, {len(cfgs)} streams",
            "precision": ("bf16 autocast, channels-last" if cfg.train.amp else "fp32")
            + (", compiled" if compiled else ""), "steps": args.steps, "batch_size": cfg.train.batch_size}


def training_cost(model: torch.nn.Module, mixed: bool, device: torch.device, batch_size: int) -> dict:
    """Per training image: MACs (every exit head included) and the bytes of the bound models (`BOUND_MODEL`),
    the activations' from one forward of a copy of `model` in the row's precision with hooks on every leaf."""
    macs = flops_table(copy.deepcopy(model).cpu().float())["exits"][-1]["cumulative_macs"]
    probe = copy.deepcopy(model).train()
    sizes = {"outputs": 0, "unfused": 0}

    def nbytes(values: Any) -> int:
        values = values if isinstance(values, (tuple, list)) else (values,)
        return sum(v.numel() * v.element_size() for v in values if isinstance(v, Tensor))

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        sizes["outputs"] += nbytes(output)
        sizes["unfused"] += 3 * nbytes(inputs) + 2 * nbytes(output)

    leaves = [m for m in probe.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    images = 2  # batch norm in training mode needs more than one value per channel
    x = torch.zeros(images, 3, 32, 32, device=device)
    if mixed:
        x = x.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            probe(x)
    finally:
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = PARAMETER_ACCESSES * 4 * params / batch_size
    return {"train_macs": macs, "params": params, "bytes_min": 2 * sizes["outputs"] / images + weights,
            "bytes_unfused": sizes["unfused"] / images + weights}


@dataclasses.dataclass
class Timed:
    """A training row during the interleaved timing."""

    info: dict
    prepared: Prepared
    cost: dict
    memory_mib: float | None
    seconds: float = 0.0
    steps: int = 0
    block_rates: list[float] = dataclasses.field(default_factory=list)


def build_row(info: dict, prepare: Callable[[], Prepared], device: torch.device, args: argparse.Namespace) -> Timed:
    """Build a row and run its warm-up (compiling, for compiled rows); its memory: what it added to the device's
    allocated memory at its peak (CUDA), or to the process's RSS (CPU), while it was built and warmed up."""
    log.info("training: building and warming up %s", info["variant"])
    if "threads" in info:
        torch.set_num_threads(info["threads"])
    reset_peak_memory(device)
    before = memory_in_use_mib(device)
    prepared = prepare()
    prepared.run(args.warmup)
    synchronize(device)
    after = peak_memory_mib(device) if device.type == "cuda" else memory_in_use_mib(device)
    memory = None if before is None or after is None else after - before
    cost = training_cost(prepared.model, prepared.mixed, device, info["batch_size"])
    return Timed(info, prepared, cost, memory)


def blocks(steps: int, rounds: int) -> list[int]:
    """`steps` split into at most `rounds` near-equal blocks."""
    rounds = max(1, min(rounds, steps))
    return [steps // rounds + (i < steps % rounds) for i in range(rounds)]


def time_interleaved(rows: Sequence[Timed], device: torch.device, args: argparse.Namespace) -> None:
    """Every row's `--steps` timed steps in `--rounds` blocks, the rows taking turns block by block, so a change in
    the load of a shared machine hits them all alike."""
    for round_index, block in enumerate(blocks(args.steps, args.rounds)):
        log.info("training: timed round %d (%d steps per row)", round_index + 1, block)
        for row in rows:
            if "threads" in row.info:  # CPU rows differ in threads; torch's setting is process-wide
                torch.set_num_threads(row.info["threads"])
            synchronize(device)
            began = time.perf_counter()
            row.prepared.run(block)
            synchronize(device)
            seconds = time.perf_counter() - began
            row.seconds += seconds
            row.steps += block
            row.block_rates.append(block * row.prepared.images_per_step / seconds)


def finish(row: Timed) -> dict:
    row.prepared.close()  # stops the DataLoader workers
    images = row.steps * row.prepared.images_per_step  # drop_last: every batch is full
    return {**row.info, "steps": row.steps, "seconds": row.seconds, "images_per_s": images / row.seconds,
            "block_images_per_s": row.block_rates, "peak_memory_mib": row.memory_mib, "cost": row.cost,
            "mixed": row.prepared.mixed}


def shared_worker(variant: Variant, cfg: RunConfig, args: argparse.Namespace, go: Any, queue: Any) -> None:
    """One of the processes of a shared row: warm up, say so, wait for the common start, train, report."""
    try:
        if variant.threads or args.threads:
            torch.set_num_threads(variant.threads or args.threads)
        device = resolve_device(args.device)
        prepared = prepare_training(variant, cfg, build_data(cfg.data), device, args)
        prepared.run(args.warmup)
        synchronize(device)
        queue.put(("ready", None))
        go.wait()
        prepared.run(args.steps)
        synchronize(device)
        prepared.close()
        queue.put(("done", peak_memory_mib(device)))
    except BaseException as error:
        queue.put(("failed", f"{type(error).__name__}: {error}"))
        raise


def time_shared(variant: Variant, cfg: RunConfig, device: torch.device, args: argparse.Namespace,
                processes: int) -> dict:
    """Images per second of `processes` processes training at once on one device, each a run of its own (as runs
    of a grid can share a GPU that one small network cannot fill): all their images over the time from the common
    start to the last one's end. Each process builds its data and warms up (compiles) before the start."""
    mp = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    go, queue = mp.Event(), mp.Queue()
    procs = [mp.Process(target=shared_worker, args=(variant, cfg, args, go, queue)) for _ in range(processes)]
    for proc in procs:
        proc.start()

    def collect(kind: str) -> list[Any]:
        """One `kind` message from every process; a failed or dead one ends the benchmark with its reason."""
        values = []
        while len(values) < len(procs):
            try:
                got, value = queue.get(timeout=5)
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise SystemExit(f"a process of the shared row {variant.name} died "
                                     f"(exit codes {[p.exitcode for p in procs]})") from None
                continue
            if got != kind:
                raise SystemExit(f"a process of the shared row {variant.name} failed: {value}")
            values.append(value)
        return values

    try:
        collect("ready")
        began = time.perf_counter()
        go.set()
        peaks = collect("done")
        seconds = time.perf_counter() - began
    except BaseException:  # the others may be waiting for a start that will not come
        for proc in procs:
            proc.kill()
        raise
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    images = processes * args.steps * cfg.train.batch_size
    return {**describe(variant, cfg, device, args), "variant": f"{variant.name} x{processes}",
            "processes": processes, "seconds": seconds, "images_per_s": images / seconds,
            "peak_memory_mib": max(peaks), "mixed": variant.mixed_on(device)}


def load_model(args: argparse.Namespace, cfg: RunConfig, data: RunData) -> tuple[MultiExitNet, str]:
    """The run's final weights, or an untrained HAR model (its exit pattern is not representative, its timing is).

    `load_run`'s config-hash and completeness checks are skipped: timing needs only weights that fit the model.
    """
    if args.run is None:
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg, data.num_classes), "untrained (exit pattern not representative; timing only)"
    run_cfg = load_config(args.run / CONFIG)
    if run_cfg.data.dataset != cfg.data.dataset:
        raise SystemExit(f"{args.run} was trained on {run_cfg.data.dataset} but the benchmark data are "
                         f"{cfg.data.dataset}; pass --config with the run's dataset")
    model = build_model(run_cfg, data.num_classes)
    model.load_state_dict(load_checkpoint(args.run / CHECKPOINT)["model"])
    return model, f"{args.run} ({CHECKPOINT})"


@torch.no_grad()
def seconds_per_image(forwards: Sequence[Callable[[Tensor], object]], batches: Sequence[Tensor], repeats: int,
                      device: torch.device) -> list[float]:
    """Median wall time per image of each forward over `repeats` passes, after one untimed pass.

    The forwards take turns within every pass, so a change in the load of a shared machine hits them all alike.
    """
    times: list[list[float]] = [[] for _ in forwards]
    for _ in range(repeats + 1):
        for forward, spent in zip(forwards, times):
            synchronize(device)
            began = time.perf_counter()
            for batch in batches:
                forward(batch)
            synchronize(device)
            spent.append(time.perf_counter() - began)
    return [statistics.median(spent[1:]) / sum(len(b) for b in batches) for spent in times]


def time_inference(model: MultiExitNet, cfg: RunConfig, data: RunData, device: torch.device,
                   args: argparse.Namespace) -> dict:
    """Wall time per image of static and early-exit inference, beside the MACs saving the counter predicts."""
    model = model.to(device).eval()
    images = data.test.images[:args.eval_images]
    table = flops_table(model)
    logits = list(torch.from_numpy(collect_logits(model, Split(images, data.test.labels[:args.eval_images]), cfg,
                                                  device)))
    batches = normalize(torch.from_numpy(images).to(device), *cfg.data.normalization()).split(args.eval_batch)
    chosen = thresholds_for_savings(logits, table, args.target_savings)
    # one row per s, however many targets chose it
    thresholds = list(dict.fromkeys([*chosen.values(), NO_EXIT_THRESHOLD]))
    forwards = [model.forward_static, *(functools.partial(model.forward_early_exit, exit_threshold=s)
                                        for s in thresholds)]
    static, *dynamic = seconds_per_image(forwards, batches, args.repeats, device)
    rows = []
    for s, seconds in zip(thresholds, dynamic):
        exits = torch.cat([model.forward_early_exit(x, s)[1] for x in batches]).cpu()
        rows.append({"target_savings": [t for t, chosen_s in chosen.items() if chosen_s == s], "exit_threshold": s,
                     "predicted_saving": dynamic_cost(exit_by_threshold(logits, s)[1], table)["saving"],
                     "real_run_macs_saving": dynamic_cost(exits, table)["saving"],
                     "seconds_per_image": seconds, "wall_time_saving": 1 - seconds / static,
                     "exit_fractions": (torch.bincount(exits, minlength=model.num_exits) / len(exits)).tolist()})
    return {"images": len(images), "batch_size": args.eval_batch, "repeats": args.repeats,
            "static_seconds_per_image": static, "backbone_macs": table["backbone_macs"],
            "unreachable_targets": [t for t in args.target_savings if t not in chosen], "rows": rows}


def machine() -> dict:
    """What the figures depend on, so that a results file says where it came from."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {"platform": platform.platform(), "cpu": cpu.group(1) if cpu else platform.processor(),
            "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def speed_of(result: dict, variant: str) -> float | None:
    return next((r["images_per_s"] for r in result["training"] if r["variant"] == variant), None)


def device_peaks(device: torch.device, args: argparse.Namespace) -> dict[str, float | None]:
    """Peak memory bandwidth (GB/s) and TFLOP/s (mixed and fp32 rows): the flags, else those of a known GPU."""
    known = KNOWN_PEAKS.get(torch.cuda.get_device_name(device), {}) if device.type == "cuda" else {}
    return {"gbps": args.peak_gbps or known.get("gbps"), "tflops_mixed": args.peak_tflops or known.get("tflops_mixed"),
            "tflops_fp32": args.peak_tflops_fp32 or known.get("tflops_fp32")}


def add_ratios(training: list[dict], peaks: dict[str, float | None]) -> None:
    """Each row's speed against the single eager, compiled and reference rows, its achieved TFLOP/s, its bandwidth
    bounds (images/s) and the shares of the peaks; None where a row or a peak is missing."""
    speed = {r["variant"]: r["images_per_s"] for r in training}
    for r in training:
        for name, base in (("x_fast", "har-fast"), ("x_compiled", "har-fast-compiled"),
                           ("x_reference", "har-reference"), ("x_fp32_1t", "cpu-fp32-1t")):
            r[name] = r["images_per_s"] / speed[base] if base in speed else None
        cost = r["cost"]
        r["tflops"] = r["images_per_s"] * 6 * cost["train_macs"] / 1e12
        peak = peaks["tflops_mixed" if r["mixed"] else "tflops_fp32"]
        r["share_peak_flops"] = r["tflops"] / peak if peak else None
        gbps = peaks["gbps"]
        for model in ("min", "unfused"):
            bound = gbps * 1e9 / cost[f"bytes_{model}"] if gbps else None
            r[f"bound_{model}_images_per_s"] = bound
            r[f"share_bound_{model}"] = r["images_per_s"] / bound if bound else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(result: dict) -> str:
    """The results as the tables printed and written beside the JSON."""
    m, inf, peaks = result["machine"], result["inference"], result["peaks"]
    memory = ("peak GPU memory allocated (MiB)" if result["device"] == "cuda"
              else "RSS added by the row (MiB)")
    lines = ["# har throughput benchmark", "",
             f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, GPU {m['gpu'] or 'none'}; "
             f"{m['platform']}; torch {m['torch']} ({m['torch_threads']} threads); load average "
             f"{m['load_average'][0]:.2f} at the start; {m['date']}",
             f"- command: `{result['command']}`",
             f"- data: {result['dataset']}, {result['train_images']} long-tailed training images; device "
             f"{result['device']}",
             "- peaks: " + ", ".join(f"{name} {value:g}" if value else f"{name} -" for name, value in peaks.items()),
             "",
             f"## Training: batch {result['batch_size']} per run, {result['steps']} timed steps after "
             f"{result['warmup']} warm-up steps, in {result['rounds']} interleaved rounds", "",
             f"| variant | layout | loss | data path | precision | threads | images/s | x har-fast | x compiled "
             f"| x reference | x fp32 1 thread | TFLOP/s | % peak FLOP/s | % bandwidth bound (min / unfused) "
             f"| {memory} |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["training"]:
        loss = f"{r['loss']} + HAR" if r["har"] else r["loss"]
        mib = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        threads = r.get("threads", "-") if "processes" not in r else f"{r['processes']} x {r.get('threads', '-')}"
        lines.append(f"| {r['variant']} | {r['layout']} | {loss} | {r['data_path']} | {r['precision']} | {threads} | "
                     f"{r['images_per_s']:.1f} | {_ratio(r['x_fast'])} | {_ratio(r['x_compiled'])} | "
                     f"{_ratio(r['x_reference'])} | {_ratio(r.get('x_fp32_1t'))} | {r['tflops']:.3g} | "
                     f"{_share(r['share_peak_flops'])} | "
                     f"{_share(r['share_bound_min'])} / {_share(r['share_bound_unfused'])} | {mib} |")
    speedup = result["speedup_fast_over_reference"]
    lines += ["", f"Speed-up of har-fast over har-reference: {'-' if speedup is None else f'{speedup:.2f}x'}", "",
              "A pack row (har-packK-EXECUTOR) is K runs of har-fast's model and loss (seeds 0 .. K-1) trained by "
              "`PackSteps`, the step of `train_pack`, with that executor (fused: one K-wide network; "
              "serial: each member's own step in turn); its images/s counts all K members' "
              "images. Rows take turns round by round in one process, on the same on-device data (each run and "
              "member its own generator)."]
    for r in result["training"]:
        if "processes" in r:
            lines += ["", f"{r['variant']}: {r['processes']} processes, each a run of its own, trained at once on the "
                          f"device after the interleaved rows; images/s is all their images over the time from their "
                          f"common start to the last one's end. Peak memory: the largest process's "
                          f"({'CUDA max allocated' if result['device'] == 'cuda' else 'peak RSS'})."]
    bounds = {(r["precision"].split(",")[0], r["layout"]): r for r in result["training"]}
    lines += ["", f"FLOPs: {FLOP_MODEL}.", "", f"Memory traffic: {BOUND_MODEL}.", "",
              "| model, precision | MACs per image | MB per image (min / unfused) | bound images/s (min / unfused) |",
              "| --- | ---: | ---: | ---: |"]
    for (precision, layout), r in bounds.items():
        c = r["cost"]
        bound = ("-" if r["bound_min_images_per_s"] is None else
                 f"{r['bound_min_images_per_s']:,.0f} / {r['bound_unfused_images_per_s']:,.0f}")
        lines.append(f"| {layout}, {precision} | {c['train_macs'] / 1e6:.1f} M | {c['bytes_min'] / 1e6:.2f} / "
                     f"{c['bytes_unfused'] / 1e6:.2f} | {bound} |")
    if result["device"] != "cuda":
        lines += ["", "Memory on the CPU: the process's resident set after the row's warm-up minus before it was "
                      "built (its model, optimiser, data copy and what the allocator kept); the allocator may reuse "
                      "memory freed by earlier rows, so it is no peak."]
    lines += ["", f"## Dynamic inference: {inf['images']} test images, batch {inf['batch_size']}, fp32, "
                  f"median of {inf['repeats']}", "",
              f"Model: {result['model']}.", "",
              f"Static (`forward_static`, {inf['backbone_macs'] / 1e6:.1f} M MACs): "
              f"{1e6 * inf['static_seconds_per_image']:.1f} µs per image.", "",
              "| target savings | s | predicted MACs saving | wall-time saving | µs per image | exit fractions |",
              "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in inf["rows"]:
        target = ", ".join(f"{100 * t:.0f}%" for t in r["target_savings"]) or "-"
        fractions = " ".join(f"{f:.2f}" for f in r["exit_fractions"])
        lines.append(f"| {target} | {r['exit_threshold']:.4g} | {100 * r['predicted_saving']:+.1f}% | "
                     f"{100 * r['wall_time_saving']:+.1f}% | {1e6 * r['seconds_per_image']:.1f} | {fractions} |")
    if inf["unreachable_targets"]:
        lines += ["", "Not reachable (even s = 0 saves less): "
                  + ", ".join(f"{100 * t:.0f}%" for t in inf["unreachable_targets"])]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    host = machine()  # before the work: the load average says what else the machine was doing
    fixed = [*args.set, f"data.train_fraction={args.train_fraction}", "data.eval_fraction=1",
             f"train.batch_size={args.batch_size}", f"eval.batch_size={args.eval_batch}"]

    def cfg_for(overrides: list[str]) -> RunConfig:
        return load_config(args.config, [*fixed, *overrides])

    variants = CPU_VARIANTS if args.cpu_rows else VARIANTS
    configs = {v.name: cfg_for(list(v.overrides)) for v in variants}
    data = build_data(next(iter(configs.values())).data)
    if len(data.train) < args.batch_size:
        raise SystemExit(f"{len(data.train)} training images are fewer than one batch of {args.batch_size}")
    rows = []
    for variant in variants:
        if variant.cuda_only and device.type != "cuda" or variant.compiled and not args.compile:
            continue
        cfg = configs[variant.name]
        rows.append(build_row(describe(variant, cfg, device, args),
                              functools.partial(prepare_training, variant, cfg, data, device, args), device, args))
    for k, executor in itertools.product(args.packs, args.pack_executors):
        cfgs = pack_configs(k, executor, cfg_for, device, args)
        rows.append(build_row(describe_pack(cfgs, args), functools.partial(prepare_pack, cfgs, data, device),
                              device, args))
    time_interleaved(rows, device, args)
    training = [finish(row) for row in rows]
    shared_rows = ([(name, 2) for name in CPU_SHARED] if args.cpu_rows else
                   [("har-fast-compiled" if args.compile else "har-fast", processes) for processes in args.share])
    for name, processes in shared_rows:
        shared = next(v for v in variants if v.name == name)
        log.info("training: %s in %d processes at once", shared.name, processes)
        row = time_shared(shared, configs[shared.name], device, args, processes)
        training.append({**row, "cost": next(r["cost"] for r in training if r["variant"] == shared.name)})
    peaks = device_peaks(device, args)
    add_ratios(training, peaks)
    speed = {r["variant"]: r["images_per_s"] for r in training}
    log.info("dynamic inference")
    cfg = next(iter(configs.values()))
    model, about = load_model(args, cfg, data)
    result = {"command": shlex.join(["python", *sys.argv]), "machine": host, "device": device.type,
              "config": args.config and str(args.config), "overrides": args.set,
              "dataset": f"{cfg.data.dataset}-LT, imbalance ratio {cfg.data.ratio:g}",
              "train_images": len(data.train), "batch_size": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, "rounds": len(blocks(args.steps, args.rounds)), "peaks": peaks,
              "flop_model": FLOP_MODEL, "bound_model": BOUND_MODEL, "training": training,
              "speedup_fast_over_reference": (speed["har-fast"] / speed["har-reference"]
                                              if {"har-fast", "har-reference"} <= set(speed) else None),
              "model": about, "inference": time_inference(model, cfg, data, device, args)}
    text = markdown(result)
    print(text)
    kind = "cpu" if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower())
    out = args.out or REPO / "benchmarks" / "results" / kind
    atomic_write_text(out.with_name(out.name + ".md"), text)
    atomic_write_json(out.with_name(out.name + ".json"), result)
    log.info("written: %s.{md,json}", out)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data and device
    parser.add_argument("--config", type=Path, default=None,
                        help="run config whose data and train sections are used; each row sets its own loss and "
                             "layout (default: none, the package defaults: CIFAR-10-LT at imbalance 100)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. data.root=DIR or data.bundle=FILE (repeatable; default: "
                             "none, data from $HAR_DATA)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="share of every class of the long-tailed training subset (default: 1, the config's is "
                             "ignored)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's intra-op CPU threads; 1 is far steadier on a busy shared machine (default: 0, "
                             "torch's choice, one per core)")
    # training throughput
    parser.add_argument("--batch-size", type=int, default=128, help="training batch of each run (default: 128)")
    parser.add_argument("--compile", action="store_true",
                        help="add a torch.compile row and, on CUDA, compile the pack rows; the warm-up steps then "
                             "include the compile (default: off)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                        help="torch.compile mode of the compiled rows, e.g. reduce-overhead for CUDA graphs (default: "
                             "default)")
    parser.add_argument("--cpu-rows", action="store_true",
                        help="time the CPU rows instead (fp32 / bf16 autocast, NCHW / channels-last, 1 / 2 threads, "
                             "compiled with --compile, and the 1-thread fp32 and bf16 rows in 2 processes at once)")
    parser.add_argument("--packs", type=int, nargs="*", default=[],
                        help="pack sizes K: a row per K of K runs trained as one K-wide network, e.g. --packs 2 4 8 "
                             "16 32 (default: none)")
    parser.add_argument("--pack-executors", nargs="+", default=["fused"], choices=list(EXECUTORS),
                        help="train.pack_executor of the pack rows, a row per executor and K (default: fused)")
    parser.add_argument("--share", type=int, nargs="*", default=[],
                        help="process counts K: a row per K of K processes training at once on the device, each a "
                             "run of its own (har-fast, or har-fast-compiled with --compile) (default: none)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per row (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default: 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="blocks the timed steps are split into, the rows taking turns block by block (default: "
                             "3)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers of har-reference (default: min(4, logical cores))")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's memory bandwidth, GB/s (default: H200 4800, H100 SXM 3350; else none)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of the bf16 rows (default: 989 on an H200 or H100 SXM; else none)")
    parser.add_argument("--peak-tflops-fp32", type=float, default=None,
                        help="peak TFLOP/s of the fp32 rows (default: 494, TF32, on an H200 or H100 SXM; else none)")
    # dynamic inference
    parser.add_argument("--run", type=Path, default=None,
                        help="finished run folder whose last.pt is timed (default: none, an untrained model)")
    parser.add_argument("--eval-images", type=int, default=2000, help="first test images timed (default: 2000)")
    parser.add_argument("--eval-batch", type=int, default=500, help="inference batch (default: 500)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, median taken (default: 3)")
    parser.add_argument("--target-savings", type=float, nargs="+", default=[0.0, 0.10, 0.25, 0.40],
                        help="predicted MACs savings at which s is chosen (default: 0 0.10 0.25 0.40)")
    # output
    parser.add_argument("--out", type=Path, default=None,
                        help="results path without suffix, .md and .json written (default: "
                             "benchmarks/results/<cpu or GPU name>)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
