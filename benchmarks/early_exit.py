"""Early exit that saves time: batch-1 latency and chunked throughput against the static backbone.

For ResNet-32 (CIFAR, 32 x 32: a trained run with --run, else untrained weights) and ResNet-50 (224 x 224 on
generated images, untrained: there compute, not launches, dominates), at a few exit thresholds s chosen so that
the MACs saving the counter predicts spans a range, it times:

- per-image latency at batch 1: `BatchOneExecutor` (on CUDA one graph per stage, one host read per exit) against
  the bare backbone run the same way;
- throughput over the whole image set: `ChunkedExecutor` (stage by stage in large chunks, survivors compacted
  once per stage, chunks padded to a few bucket sizes; CUDA graphs per stage and bucket) against the bare
  backbone through the same executor; beside them today's path, `forward_static` and `forward_early_exit`
  (boolean-mask compaction at every exit), eager in batches of the chunk size.

It checks that the executors' exits and predictions equal the cached evaluation's (`exit_by_threshold` on the
full forward's logits) and counts the examples that differ. It prints figures; it is not a timed test. The CUDA
paths have not run on a GPU yet.

    python benchmarks/early_exit.py --set data.bundle=.carry/cifar10-lt100.npz.xz --run runs/quick   # CUDA if there
    python benchmarks/early_exit.py --device cpu --data generated --images 512 --resnet50-images 8 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pack_kernels import machine, synchronize
from torch import Tensor

from har.atomic import atomic_write_json, atomic_write_text
from har.config import load_config
from har.data import normalize
from har.data.build import build_data
from har.evaluation.dynamic import NO_EXIT_THRESHOLD
from har.evaluation.early_exit import (
    BUCKET_LEVELS,
    DEFAULT_CHUNK,
    BatchOneExecutor,
    ChunkedExecutor,
    default_buckets,
    exit_stages,
    static_stages,
    thresholds_for_savings,
)
from har.evaluation.flops import dynamic_cost, flops_table
from har.facts import DATASET_CLASSES
from har.models import create_model
from har.models.exits import batch_norm_from, exit_by_threshold
from har.run.assembly import build_model, resolve_device
from har.run.checkpoint import load_checkpoint
from har.run.folder import CHECKPOINT, CONFIG

log = logging.getLogger("early_exit")

REPO = Path(__file__).resolve().parents[1]
UNTRAINED = ("untrained, batch-norm statistics from the first images: the exits taken say nothing about a trained "
             "model; s is chosen on its confidences so that a range of exit patterns is timed")


def generated(count: int, side: int, device: torch.device, seed: int) -> Tensor:
    """Standard-normal images (already 'normalised'): what the model computes on them costs what real ones do."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, side, side, generator=generator).to(device)


def resnet32_case(args: argparse.Namespace, device: torch.device) -> dict:
    """The ResNet-32 model and images: a run's weights or untrained ones, CIFAR test images or generated ones."""
    overrides = [*args.set, "data.eval_fraction=1"]
    cfg = load_config(args.run / CONFIG if args.run else args.config, overrides)
    if args.data == "cifar":
        data = build_data(cfg.data)
        images = normalize(torch.from_numpy(data.test.images[:args.images]).to(device), *cfg.data.normalization())
        about_data, num_classes = f"{cfg.data.dataset} test split, first {len(images)} images", data.num_classes
    else:
        images = generated(args.images, 32, device, args.seed)
        about_data = f"{len(images)} generated images (standard normal), 32 x 32"
        num_classes = DATASET_CLASSES[cfg.data.dataset]  # the run's classifier, or the config's when untrained
    torch.manual_seed(args.seed)
    model = build_model(cfg, num_classes).to(device)
    if args.run:
        checkpoint = load_checkpoint(args.run / CHECKPOINT, map_location=device)
        model.load_state_dict(checkpoint["model"])
        # Named by what they are, not by where they lay (a scratch path gone tomorrow): the folder's last three
        # parts (the pipeline's dataset / method / seed), the epoch and the config hash.
        name = "/".join(args.run.resolve().parts[-3:])
        weights = (f"run {name!r} ({CHECKPOINT}: epoch {checkpoint['epoch']}, config sha256 "
                   f"{str(checkpoint.get('config_sha256', 'not recorded'))[:12]})")
    else:
        batch_norm_from(model, images[:args.chunk])
        weights = UNTRAINED
    return {"name": f"ResNet-32 ({model.layout})", "model": model.eval(), "images": images, "weights": weights,
            "data": about_data, "chunk": args.chunk, "latency_images": args.latency_images}


def resnet50_case(args: argparse.Namespace, device: torch.device) -> dict:
    """ResNet-50 with an exit before each block group, untrained, on generated images (1000 classes)."""
    images = generated(args.resnet50_images, args.resnet50_side, device, args.seed)
    torch.manual_seed(args.seed)
    model = batch_norm_from(create_model("resnet50", 1000).to(device), images[:args.resnet50_chunk])
    side = args.resnet50_side
    return {"name": f"ResNet-50 ({model.layout})", "model": model, "images": images, "weights": UNTRAINED,
            "data": f"{len(images)} generated images (standard normal), {side} x {side}",
            "chunk": args.resnet50_chunk, "latency_images": args.resnet50_latency_images}


def time_passes(passes: Sequence[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each pass over `repeats`, after one untimed pass (it captures the graphs); the passes take
    turns, so that a change in the load of a shared machine hits them alike."""
    spent: list[list[float]] = [[] for _ in passes]
    for _ in range(repeats + 1):
        for run, times in zip(passes, spent):
            synchronize(device)
            began = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - began)
    return [statistics.median(times[1:]) for times in spent]


def time_images(executors: Sequence[Callable[[Tensor], object]], images: Tensor, repeats: int,
                device: torch.device) -> list[list[float]]:
    """Seconds per image at batch 1 of each executor: every image, `repeats` times, after one untimed round.
    Each call ends with a host read of the exit's result, so its time is the image's latency."""
    spent: list[list[float]] = [[] for _ in executors]
    for round_ in range(repeats + 1):
        for run, times in zip(executors, spent):
            for i in range(len(images)):
                synchronize(device)
                began = time.perf_counter()
                run(images[i:i + 1])
                if round_:
                    times.append(time.perf_counter() - began)
    return spent


def differ(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor]) -> dict:
    """How many examples' exits and predictions differ from the cached evaluation's."""
    return {"exits": int((got[1].cpu() != want[1]).sum()), "predictions": int((got[0].cpu() != want[0]).sum()),
            "of": len(want[1])}


@torch.no_grad()
def measure(case: dict, args: argparse.Namespace, device: torch.device, graphs: bool) -> dict:
    """Static against early exit, at batch 1 and over the whole set, at each chosen s."""
    model, images, chunk = case["model"], case["images"], case["chunk"]
    table = flops_table(model, image_size=tuple(images.shape[1:]))
    batches = images.split(chunk)
    logits = [torch.cat(z) for z in zip(*(([out.float().cpu() for out in model(b)]) for b in batches))]
    chosen = thresholds_for_savings(logits, table, args.target_savings)
    thresholds = list(dict.fromkeys([*sorted(chosen.values()), NO_EXIT_THRESHOLD]))
    buckets = default_buckets(chunk, args.bucket_levels)
    static_chunked = ChunkedExecutor(static_stages(model), buckets, graphs)
    chunked = ChunkedExecutor(exit_stages(model), buckets, graphs)
    log.info("%s: throughput over %d images, s = %s", case["name"], len(images), thresholds)
    passes = [lambda: static_chunked(images, NO_EXIT_THRESHOLD),
              lambda: [model.forward_static(b) for b in batches]]
    for s in thresholds:
        passes += [lambda s=s: chunked(images, s), lambda s=s: [model.forward_early_exit(b, s) for b in batches]]
    static_s, static_eager_s, *dynamic_s = time_passes(passes, args.repeats, device)
    latency_set = images[:case["latency_images"]]
    log.info("%s: batch-1 latency over %d images", case["name"], len(latency_set))
    static_one, one = BatchOneExecutor(static_stages(model), graphs), BatchOneExecutor(exit_stages(model), graphs)
    latencies = time_images([lambda x: static_one(x, NO_EXIT_THRESHOLD),
                             *(lambda x, s=s: one(x, s) for s in thresholds)], latency_set, args.repeats, device)
    static_latency, *dynamic_latency = latencies
    count = len(images)
    rows = []
    for k, s in enumerate(thresholds):
        cached = exit_by_threshold(logits, s)
        got = chunked(images, s)
        padded = sum(p for _, p in chunked.stage_rows) / sum(r for r, _ in chunked.stage_rows) - 1
        batch_one = [one(latency_set[i:i + 1], s) for i in range(len(latency_set))]
        one_pred, one_exit = (torch.tensor(v, dtype=torch.long) for v in zip(*batch_one))
        seconds, eager_seconds = dynamic_s[2 * k], dynamic_s[2 * k + 1]
        latency = dynamic_latency[k]
        rows.append({
            "exit_threshold": s, "target_savings": [t for t, c in chosen.items() if c == s],
            "predicted_saving": dynamic_cost(cached[1], table)["saving"],
            "exit_fractions": (torch.bincount(got[1].cpu(), minlength=model.num_exits) / count).tolist(),
            "images_per_s": count / seconds, "time_saving": 1 - seconds / static_s,
            "masked_images_per_s": count / eager_seconds, "masked_time_saving": 1 - eager_seconds / static_eager_s,
            "padding_overhead": padded,
            "latency_ms_median": 1e3 * statistics.median(latency), "latency_ms_mean": 1e3 * statistics.mean(latency),
            "latency_saving": 1 - statistics.mean(latency) / statistics.mean(static_latency),
            "chunked_differs": differ(got, cached),
            "batch_one_differs": differ((one_pred, one_exit), tuple(t[:len(latency_set)] for t in cached))})
    return {"name": case["name"], "weights": case["weights"], "data": case["data"], "images": count,
            "latency_images": len(latency_set), "image_size": list(images.shape[1:]), "chunk": chunk,
            "buckets": list(buckets), "cuda_graphs": graphs, "backbone_macs": table["backbone_macs"],
            "unreachable_targets": [t for t in args.target_savings if t not in chosen],
            "static": {"images_per_s": count / static_s, "eager_images_per_s": count / static_eager_s,
                       "latency_ms_median": 1e3 * statistics.median(static_latency),
                       "latency_ms_mean": 1e3 * statistics.mean(static_latency)},
            "rows": rows}


def percent(value: float) -> str:
    return f"{100 * value:+.1f}%"


def markdown(result: dict) -> str:
    """The results as the tables printed and written beside the JSON."""
    m = result["machine"]
    lines = ["# har early exit: batch-1 latency and chunked throughput", "",
             f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, GPU {m['gpu'] or 'none'}; {m['platform']}; "
             f"torch {m['torch']} ({m['torch_threads']} threads); load average {m['load_average'][0]:.2f} at the "
             f"start; {m['date']}",
             f"- command: `{result['command']}`",
             f"- device {result['device']}, fp32; median of {result['repeats']} timed passes after one untimed pass "
             "(every variant takes its turn in each pass)"]
    for r in result["models"]:
        st = r["static"]
        lines += ["", f"## {r['name']}: {r['data']}", "",
                  f"Weights: {r['weights']}. Static backbone {r['backbone_macs'] / 1e6:.1f} M MACs per image. "
                  f"Throughput over all {r['images']} images, chunks of {r['chunk']} padded to buckets "
                  f"{', '.join(map(str, r['buckets']))}; batch-1 latency over the first {r['latency_images']} "
                  f"images; CUDA graphs: {'yes' if r['cuda_graphs'] else 'no'}"
                  + (f" (their capture failed: {r['graph_error']})" if "graph_error" in r else "") + ".", "",
                  "| regime | s | predicted MACs saving | fraction leaving at each exit | images/s, executor | "
                  "time saving | images/s, `forward_*` in batches | time saving | batch-1 ms, median | "
                  "batch-1 ms, mean | batch-1 time saving | differ from cache: chunked | batch 1 |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
                  f"| static backbone | - | - | - | {st['images_per_s']:.1f} | - | {st['eager_images_per_s']:.1f} | "
                  f"- | {st['latency_ms_median']:.3f} | {st['latency_ms_mean']:.3f} | - | - | - |"]
        for row in r["rows"]:
            fractions = " ".join(f"{f:.2f}" for f in row["exit_fractions"])
            c, b = row["chunked_differs"], row["batch_one_differs"]
            lines.append(
                f"| early exit | {row['exit_threshold']:.6g} | {percent(row['predicted_saving'])} | {fractions} | "
                f"{row['images_per_s']:.1f} | {percent(row['time_saving'])} | {row['masked_images_per_s']:.1f} | "
                f"{percent(row['masked_time_saving'])} | {row['latency_ms_median']:.3f} | {row['latency_ms_mean']:.3f} "
                f"| {percent(row['latency_saving'])} | {c['exits']} exits, {c['predictions']} predictions of {c['of']} "
                f"| {b['exits']}, {b['predictions']} of {b['of']} |")
        if r["unreachable_targets"]:
            lines += ["", "Not reachable (even s = 0 saves less): "
                      + ", ".join(f"{100 * t:.0f}%" for t in r["unreachable_targets"])]
    lines += ["", "Executor: `ChunkedExecutor` (static row: the bare backbone through it), stage by stage, survivors "
              "compacted once per stage. `forward_*`: `forward_static` / `forward_early_exit` (boolean mask at every "
              "exit) eagerly, in batches of the chunk. Time saving: 1 - time / static time in the same column; "
              "batch-1 from mean latencies (`BatchOneExecutor`, one host read per exit). s = 1.01: no early exit, "
              "every head paid for. Differ from cache: examples whose exit or prediction is not the one "
              "`exit_by_threshold` gives on the full forward's logits (rounding between batch sizes can move an "
              "example whose confidence is within rounding of s, or whose top two classes tie)."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    graphs = device.type == "cuda" if args.graphs is None else args.graphs
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    host = machine()  # before the work: the load average says what else the machine was doing
    builders = {"resnet32": resnet32_case, "resnet50": resnet50_case}
    models = []
    for name in args.models:
        case = builders[name](args, device)
        try:
            models.append(measure(case, args, device, graphs))
        except RuntimeError as exc:  # torch's capture errors: the eager figures still come back
            if not graphs:
                raise
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            log.warning("%s: CUDA graphs failed (%s); measuring it again without them", case["name"], error)
            models.append({**measure(case, args, device, False), "graph_error": error})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"command": shlex.join(["python", *sys.argv]), "machine": host, "device": device.type,
              "repeats": args.repeats, "models": models}
    text = markdown(result)
    print(text)
    kind = "cpu" if device.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower())
    out = args.out or REPO / "benchmarks" / "results" / f"{kind}-early-exit"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_name(out.name + ".md"), text)
    atomic_write_json(out.with_name(out.name + ".json"), result)
    log.info("written: %s.{md,json}", out)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's intra-op CPU threads; 1 is far steadier on a busy shared machine (default: 0, "
                             "torch's choice)")
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50"], choices=["resnet32", "resnet50"],
                        help="models timed (default: both)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA graphs per stage (and bucket) in both executors (default: on for CUDA; CUDA only)")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="let cuDNN pick its fastest kernel per shape, on CUDA (default: on)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, median taken (default: 3)")
    parser.add_argument("--target-savings", type=float, nargs="+", default=[0.10, 0.25, 0.40, 0.60],
                        help="predicted MACs savings at which s is chosen; s = 1.01 is always added "
                             "(default: 0.10 0.25 0.40 0.60)")
    parser.add_argument("--bucket-levels", type=int, default=BUCKET_LEVELS,
                        help=f"bucket sizes per stage: the chunk and its halvings (default: {BUCKET_LEVELS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of generated images and untrained weights "
                                                           "(default: 0)")
    # ResNet-32
    parser.add_argument("--run", type=Path, default=None,
                        help="finished ResNet-32 run folder whose last.pt is timed (default: none, untrained weights)")
    parser.add_argument("--config", type=Path, default=None,
                        help="run config of the data without --run (default: none, the package defaults: CIFAR-10)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. data.root=DIR or data.bundle=FILE (repeatable)")
    parser.add_argument("--data", default="cifar", choices=["cifar", "generated"],
                        help="ResNet-32 images: the CIFAR test split (from $HAR_DATA, data.root or data.bundle) or "
                             "generated ones (default: cifar)")
    parser.add_argument("--images", type=int, default=10_000,
                        help="ResNet-32 images of the throughput pass (default: 10000, the whole test split)")
    parser.add_argument("--latency-images", type=int, default=200,
                        help="ResNet-32 images timed one by one at batch 1 (default: 200)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                        help=f"ResNet-32 chunk, the largest bucket (default: {DEFAULT_CHUNK})")
    # ResNet-50
    parser.add_argument("--resnet50-images", type=int, default=1024,
                        help="ResNet-50 generated images of the throughput pass (default: 1024)")
    parser.add_argument("--resnet50-latency-images", type=int, default=64,
                        help="ResNet-50 images timed one by one at batch 1 (default: 64)")
    parser.add_argument("--resnet50-chunk", type=int, default=128,
                        help="ResNet-50 chunk: its stage graphs hold the activations of a chunk (default: 128)")
    parser.add_argument("--resnet50-side", type=int, default=224, help="ResNet-50 image side (default: 224)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results path without suffix, .md and .json written (default: "
                             "benchmarks/results/<cpu or GPU name>-early-exit)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
