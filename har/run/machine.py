"""The machine a run trains on, recorded in its folder at every start, since one run may outlast several machines.

`machine.jsonl` gets one line per (re)start: the epoch it starts from, the device, the CPU's model and the features
that decide how fast bf16 is (oneDNN computes bf16 natively with AVX512-BF16 or AMX; without them autocast's
convolutions compute in float32, `har.engine.bf16`, and bf16 gains nothing over fp32), the precision, how its
convolutions computed, the memory format, threads, compile mode and torch version.
Tables and the fidelity report print where and how their runs trained from it; a run whose precision would change on
resume (autocast left unset and resolved differently on another machine) is refused.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from har.run.folder import MACHINE

# CPU flags (as /proc/cpuinfo spells them) that decide the CPU's precision, and that the record keeps
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FORCE_ENV = "HAR_NATIVE_BF16"
FLOAT32_CONVOLUTIONS = "float32 from bf16 operands"  # machine.jsonl's bf16_convolutions where har.engine.bf16 runs them
RECORDED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS); read once a process,
    since a training step asks (`har.engine.bf16`) and the CPU does not change under it."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty when unknown)."""
    return set(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) Platinum 8488C', ...)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), so that autocast is faster than fp32.

    `HAR_NATIVE_BF16=0` (or 1) overrides what the flags say, e.g. where a virtual machine hides or misreports them;
    the test suite sets 0, so that runs left at the default train in fp32 on every machine.
    """
    forced = os.environ.get(FORCE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def machine_record(device: torch.device, amp: bool, channels_last: bool, compile_mode: str,
                   start_epoch: int) -> dict[str, Any]:
    """What one start of a run trains on and how (one line of `machine.jsonl`)."""
    flags = cpu_flags()
    record = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "start_epoch": start_epoch,
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_flags": sorted(f for f in RECORDED_FLAGS if f in flags),
        "precision": "bf16 autocast" if amp else "fp32",
        # how autocast's convolutions compute on a CPU: oneDNN's bf16 kernels, or float32 (har.engine.bf16)
        "bf16_convolutions": (("hardware" if native_bf16() else FLOAT32_CONVOLUTIONS)
                              if amp and device.type == "cpu" else None),
        "channels_last": channels_last,
        "threads": torch.get_num_threads(),
        "compile": compile_mode,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        record["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return record


def read_machines(run_dir: Path) -> list[dict[str, Any]]:
    """The folder's machine records, oldest first (none for runs trained before they were kept)."""
    path = Path(run_dir) / MACHINE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(records: list[dict[str, Any]]) -> str:
    """One line for a caption: the distinct machines and precisions a run (or a set of runs) trained on."""
    seen = sorted({f"{r['device_name']} ({', '.join(r['cpu_flags']) or 'no bf16 flags'}; {r['precision']}"
                   f"{' (float32 convolutions)' if r.get('bf16_convolutions') == FLOAT32_CONVOLUTIONS else ''}"
                   f"{', channels-last' if r['channels_last'] else ''})" if r["device"] == "cpu" else
                   f"{r['device_name']} ({r['precision']}{', TF32' if r.get('tf32') else ''})" for r in records})
    return "; ".join(seen) if seen else "not recorded"

