"""Speed of one ResNet-32 layer (3x3 convolution + batch norm + ReLU) for a pack of K runs: fused or one per run.

A pack trains K runs of one shape at once (issue #12). One executor fuses them into a K-wide model: every
convolution becomes a grouped convolution over K x C channels (groups = K) and every batch norm one over K x C
channels. Whether that pays depends on the speed of grouped-convolution kernels, backward included, at our small
widths, which this script measures against K separate layers run one after another in one stream:

    grouped   one Conv2d(K*C, K*C, 3, groups=K) + BatchNorm2d(K*C) + ReLU on [batch, K*C, H, W]
    separate  K x (Conv2d(C, C, 3) + BatchNorm2d(C) + ReLU), each on its own [batch, C, H, W]

at ResNet-32's three stage shapes (C = 16, 32, 64 at H = W = 32, 16, 8). A step is forward and backward
(`torch.autograd.grad` of the output against a fixed random gradient, to the input and every parameter). On CUDA
each variant is also timed as one captured CUDA graph (`--graphs`), which removes the launch cost and leaves the
kernels: the eager rows are what a plain loop costs, the graph rows what per-run CUDA graphs would approach.
The fused layout is checked first: the grouped layer built from the K separate layers' weights must give their
outputs and input gradients in float64. It prints figures; it is not a timed test.

    python benchmarks/pack_kernels.py                                     # CUDA when present: bf16, channels-last
    python benchmarks/pack_kernels.py --device cpu --ks 1 2 4 --steps 3 --warmup 1 --threads 1 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from har.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
STAGES = ((16, 32), (32, 16), (64, 8))  # ResNet-32 on CIFAR: (channels, side) of its three stages
VARIANTS = ("grouped", "separate")
AGREEMENT = 1e-9  # float64 tolerance of the fused-layout check (its differences are rounding, about 1e-15)
FLOP_FORMULA = ("FLOPs per step = 3 x 2 x MACs, MACs = K x batch x H x W x C x C x 9 (forward 2 x MACs, backward "
                "about twice the forward: input and weight gradients); batch norm and ReLU are not counted")


def layer(channels: int, groups: int = 1) -> nn.Sequential:
    """One ResNet-32 convolution as the model has it: 3x3, stride 1, padding 1, no bias, then BN and ReLU."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=groups),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


def fuse(layers: Sequence[nn.Sequential]) -> nn.Sequential:
    """The K-wide layer equal to `layers` run side by side: run k owns channels k*C to (k+1)*C.

    The grouped convolution's weight [K*C, C, 3, 3] is the K weights [C, C, 3, 3] stacked along the output channels;
    batch norm works per channel, so its K*C affine parameters and running statistics are the K runs' concatenated.
    """
    channels = layers[0][0].in_channels
    fused = layer(channels * len(layers), groups=len(layers)).to(layers[0][0].weight)
    with torch.no_grad():
        fused[0].weight.copy_(torch.cat([m[0].weight for m in layers]))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(fused[1], name).copy_(torch.cat([getattr(m[1], name) for m in layers]))
    return fused


def check_fused(channels: int, side: int, k: int, batch: int, seed: int) -> dict[str, float]:
    """Largest difference, in float64 on the CPU, between the fused layer and the K separate ones it came from."""
    generator = torch.Generator().manual_seed(seed)
    separate = [layer(channels).double() for _ in range(k)]
    with torch.no_grad():  # non-trivial affine parameters, so that a misplaced channel cannot go unseen
        for m in separate:
            m[1].weight.uniform_(0.5, 1.5, generator=generator)
            m[1].bias.uniform_(-0.5, 0.5, generator=generator)
    fused = fuse(separate)
    inputs = [torch.randn(batch, channels, side, side, dtype=torch.float64, generator=generator, requires_grad=True)
              for _ in range(k)]
    grads = [torch.randn(batch, channels, side, side, dtype=torch.float64, generator=generator) for _ in range(k)]
    outputs = [m(x) for m, x in zip(separate, inputs)]
    input_grads = torch.autograd.grad(outputs, inputs, grads)
    wide = torch.cat(inputs, 1).detach().requires_grad_()
    wide_out = fused(wide)
    (wide_grad,) = torch.autograd.grad(wide_out, wide, torch.cat(grads, 1))
    return {"output": (wide_out - torch.cat(outputs, 1)).abs().max().item(),
            "input_grad": (wide_grad - torch.cat(input_grads, 1)).abs().max().item()}


def synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: a clock read without this would time the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(variant: str, channels: int, side: int, k: int, args: argparse.Namespace,
               device: torch.device) -> Callable[[], object]:
    """One forward + backward of the variant on fixed inputs and output gradients (the data do not change speed)."""
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    separate = [layer(channels) for _ in range(k)]
    modules = [fuse(separate)] if variant == "grouped" else separate
    modules = [m.to(device, memory_format=memory).train() for m in modules]
    width = channels * k if variant == "grouped" else channels
    shape = (args.batch, width, side, side)
    inputs = [torch.randn(shape, device=device, dtype=args.dtype).to(memory_format=memory).requires_grad_()
              for _ in modules]
    grads = [torch.randn(shape, device=device, dtype=args.dtype).to(memory_format=memory) for _ in modules]
    mixed = args.dtype != torch.float32  # the trainer's precision: fp32 weights, bf16 autocast (no weight cache:
    # each weight is used once per step, and CUDA graph capture needs the cache off)
    autocast = (lambda: torch.autocast(device.type, args.dtype, cache_enabled=False)) if mixed \
        else contextlib.nullcontext

    def step() -> object:
        with autocast():
            return [torch.autograd.grad(m(x), [x, *m.parameters()], g) for m, x, g in zip(modules, inputs, grads)]

    return step


def graphed(step: Callable[[], object], warmup: int, device: torch.device) -> Callable[[], object]:
    """The step captured once as a CUDA graph (warm-up on a side stream first, as capture requires); replays it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_steps(steps: Sequence[Callable[[], object]], args: argparse.Namespace, device: torch.device) -> list[float]:
    """Seconds per step of each step function: the median over `--repeats` blocks of `--steps` steps, after
    `--warmup` untimed steps each. The functions take turns block by block, so that a change in the load of a shared
    machine hits them alike; the clock is read after a synchronise."""
    for step in steps:
        for _ in range(args.warmup):
            step()
    spent: list[list[float]] = [[] for _ in steps]
    for _ in range(args.repeats):
        for step, times in zip(steps, spent):
            synchronize(device)
            began = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(device)
            times.append((time.perf_counter() - began) / args.steps)
    return [statistics.median(times) for times in spent]


def measure(graph: bool, channels: int, side: int, k: int, args: argparse.Namespace,
            device: torch.device) -> list[dict]:
    """The rows of grouped and separate at one shape: time per step, run-images per second and achieved TFLOP/s
    (and the share of the peak when given).

    Graph rows that fail (capture is fussier than eager code) record their error instead of ending the benchmark,
    so that one call on a GPU still brings back every other row.
    """
    rows: list[dict] = [{"channels": channels, "side": side, "k": k, "variant": variant, "cuda_graph": graph}
                        for variant in VARIANTS]
    try:
        steps = [build_step(variant, channels, side, k, args, device) for variant in VARIANTS]
        seconds = time_steps([graphed(step, args.warmup, device) for step in steps] if graph else steps, args, device)
    except RuntimeError as exc:  # torch's CUDA errors, capture and out-of-memory ones included
        if not graph:
            raise
        for row in rows:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        return rows
    flops = 6 * k * args.batch * side * side * channels * channels * 9
    for row, time_per_step in zip(rows, seconds):
        row.update(ms_per_step=1e3 * time_per_step, run_images_per_s=k * args.batch / time_per_step,
                   tflops=flops / time_per_step / 1e12)
        if args.peak_tflops:
            row["peak_share"] = row["tflops"] / args.peak_tflops
    return rows


def speedups(rows: Sequence[dict]) -> list[dict]:
    """Per stage, K and timing mode: time of the separate layers over the grouped layer's (above 1: grouped wins)."""
    timed = {(r["channels"], r["k"], r["cuda_graph"], r["variant"]): r["ms_per_step"]
             for r in rows if "ms_per_step" in r}
    return [{"channels": c, "k": k, "cuda_graph": g, "grouped_over_separate": timed[c, k, g, "separate"] / ms}
            for (c, k, g, variant), ms in timed.items() if variant == "grouped" and (c, k, g, "separate") in timed]


def machine() -> dict:
    """What the figures depend on (the fields of throughput.py's description, without importing its data stack)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {"platform": platform.platform(), "cpu": cpu.group(1) if cpu else platform.processor(),
            "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def markdown(result: dict) -> str:
    """The results as the tables printed and written beside the JSON."""
    m = result["machine"]
    peak = result["peak_tflops"]
    lines = ["# har pack kernels: grouped against separate convolutions", "",
             f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, GPU {m['gpu'] or 'none'}; {m['platform']}; "
             f"torch {m['torch']} ({m['torch_threads']} threads), cuDNN {m['cudnn']}; load average "
             f"{m['load_average'][0]:.2f} at the start; {m['date']}",
             f"- command: `{result['command']}`",
             f"- device {result['device']}, {result['dtype']}, channels-last {result['channels_last']}, cuDNN "
             f"benchmark {result['cudnn_benchmark']}; batch {result['batch']} per run; median of "
             f"{result['repeats']} blocks of {result['steps']} timed steps (grouped and separate taking turns) after "
             f"{result['warmup']} warm-up steps; step = forward + backward of conv 3x3 + BN (training) + ReLU",
             f"- {FLOP_FORMULA}" + (f"; peak {peak:g} TFLOP/s (--peak-tflops)" if peak else ""), "",
             "## Fused-layout check (float64, CPU): grouped layer from the separate layers' weights", "",
             "| C | side | K | batch | max abs diff, output | max abs diff, input grad |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in result["check"]:
        lines.append(f"| {c['channels']} | {c['side']} | {c['k']} | {c['batch']} | {c['output']:.1e} | "
                     f"{c['input_grad']:.1e} |")
    lines += ["", f"Agree within {AGREEMENT:g}: {'yes' if result['fused_agrees'] else 'NO'}", "",
              "## Timing", "",
              "| C | side | K | variant | CUDA graph | ms per step | run-images/s | TFLOP/s | share of peak |",
              "| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        head = f"| {r['channels']} | {r['side']} | {r['k']} | {r['variant']} | {'yes' if r['cuda_graph'] else 'no'} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | |")
            continue
        share = f"{100 * r['peak_share']:.2f}%" if "peak_share" in r else "-"
        lines.append(f"{head} {r['ms_per_step']:.3f} | {r['run_images_per_s']:.0f} | {r['tflops']:.3g} | {share} |")
    lines += ["", "## Speed-up of grouped over separate (separate's time / grouped's)", "",
              "| C | K | CUDA graph | speed-up |", "| ---: | ---: | --- | ---: |"]
    for s in result["speedups"]:
        lines.append(f"| {s['channels']} | {s['k']} | {'yes' if s['cuda_graph'] else 'no'} | "
                     f"{s['grouped_over_separate']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    small = [f"--{name} {value}" for name, value in (("ks", min(args.ks)), ("batch", args.batch),
                                                       ("steps", args.steps), ("repeats", args.repeats)) if value < 1]
    if small:
        raise SystemExit(f"{', '.join(small)}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} but CUDA is not available; use auto or cpu")
    cuda = device.type == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    graphs = cuda if args.graphs is None else args.graphs
    if graphs and not cuda:
        raise SystemExit("--graphs needs CUDA; drop it on the CPU")
    if cuda:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    host = machine()  # before the work: the load average says what else the machine was doing
    check_batch = min(args.batch, 4)
    check = [{"channels": c, "side": s, "k": max(args.ks), "batch": check_batch,
              **check_fused(c, s, max(args.ks), check_batch, args.seed)} for c, s in STAGES]
    torch.manual_seed(args.seed)
    rows = []
    for channels, side in STAGES:
        for k in args.ks:
            for graph in (False, True) if graphs else (False,):
                rows += measure(graph, channels, side, k, args, device)
                print(f"C={channels} K={k}{' graph' if graph else ''}: " + ", ".join(
                    f"{r['variant']} {r.get('ms_per_step', float('nan')):.3f} ms" for r in rows[-2:]),
                    file=sys.stderr, flush=True)
                if cuda:
                    torch.cuda.empty_cache()
    result = {"command": shlex.join(["python", *sys.argv]), "machine": host, "device": device.type,
              "dtype": str(args.dtype).removeprefix("torch."), "channels_last": args.channels_last,
              "cudnn_benchmark": args.cudnn_benchmark if cuda else None, "batch": args.batch, "steps": args.steps,
              "repeats": args.repeats, "warmup": args.warmup, "peak_tflops": args.peak_tflops,
              "flop_formula": FLOP_FORMULA,
              "check": check, "fused_agrees": all(c["output"] < AGREEMENT and c["input_grad"] < AGREEMENT
                                                  for c in check),
              "rows": rows, "speedups": speedups(rows)}
    text = markdown(result)
    print(text)
    kind = "cpu" if not cuda else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower())
    out = args.out or REPO / "benchmarks" / "results" / f"{kind}-pack-kernels"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_name(out.name + ".md"), text)
    atomic_write_json(out.with_name(out.name + ".json"), result)
    print(f"written: {out}.{{md,json}}", file=sys.stderr)
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute precision; bfloat16 runs under autocast with fp32 weights, as the trainer does "
                             "(default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last tensors and weights (default: on for CUDA, off on the CPU)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each variant captured as one CUDA graph (default: on for CUDA; CUDA only)")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="let cuDNN choose its fastest kernel per shape during the warm-up (default: on)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="pack sizes K, runs trained at once (default: 1 2 4 8 16 32)")
    parser.add_argument("--batch", type=int, default=128, help="batch per run (default: 128, the trainer's)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per row (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them (default: 10)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed blocks of --steps steps per row, grouped and separate taking turns; the median "
                             "is reported (default: 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's intra-op CPU threads; 1 is far steadier on a busy shared machine (default: 0, "
                             "torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s at --dtype, for the share-of-peak column (default: none, "
                             "no such column; e.g. about 989 for an H200's dense bf16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and gradients (default: 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results path without suffix, .md and .json written (default: "
                             "benchmarks/results/<cpu or GPU name>-pack-kernels)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
