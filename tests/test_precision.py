"""How a run's precision is chosen where its config leaves it unset, and what its folder records of it."""

from __future__ import annotations

import json

import pytest
import torch

from har.config import TrainConfig, from_dict
from har.engine.numerics import exact_fp32
from har.errors import RunError
from har.run import machine
from har.run.assembly import precision, record_machine

AMD_ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
XEON_AMX = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
OLDER_X86 = {"avx2", "avx512f"}


@pytest.mark.parametrize(("flags", "native"), [(AMD_ZEN4, True), (XEON_AMX, True), (OLDER_X86, False), (set(), False)])
def test_native_bf16_reads_the_cpu_flags(flags, native, monkeypatch):
    monkeypatch.delenv(machine.FORCE_ENV, raising=False)
    assert machine.native_bf16(flags) is native


@pytest.mark.parametrize(("flags", "amp"), [(XEON_AMX, True), (AMD_ZEN4, True), (OLDER_X86, False)])
def test_unset_autocast_follows_the_cpus_bf16_and_an_explicit_value_wins(flags, amp, monkeypatch):
    """On a CPU that computes bf16 natively a run left at the default trains in bf16, elsewhere in fp32 (where bf16
    has no hardware and gains nothing); channels-last goes with autocast unless the config says otherwise; CUDA takes
    bf16."""
    monkeypatch.delenv(machine.FORCE_ENV, raising=False)
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))
    cpu = torch.device("cpu")
    assert precision(TrainConfig(), cpu) == (amp, amp)
    assert precision(TrainConfig(amp=False, channels_last=True), cpu) == (False, True)
    assert precision(TrainConfig(amp=True), cpu) == (True, True)
    assert precision(TrainConfig(amp=False), cpu) == (False, False)
    assert precision(TrainConfig(), torch.device("cuda")) == (True, True)
    monkeypatch.setenv(machine.FORCE_ENV, "1" if not amp else "0")  # the override beats the flags
    assert precision(TrainConfig(), cpu) == (not amp, not amp)


def test_the_folder_records_each_start_and_refuses_to_go_on_in_another_precision(tmp_path, monkeypatch):
    """machine.jsonl gets a line per start (device, CPU model and flags, precision); a run begun in bf16 on a bf16
    machine, resumed with the default on a CPU without bf16, would silently switch to fp32: refused, naming both."""
    monkeypatch.delenv(machine.FORCE_ENV, raising=False)
    cfg = from_dict({"train": {"epochs": 3}})
    cpu = torch.device("cpu")
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(AMD_ZEN4))
    monkeypatch.setattr(machine, "cpu_model", lambda: "AMD EPYC")
    record_machine(cfg, tmp_path, cpu, 0)
    record_machine(cfg, tmp_path, cpu, 1)
    lines = [json.loads(line) for line in (tmp_path / machine.MACHINE).read_text().splitlines()]
    assert [(r["start_epoch"], r["precision"], r["channels_last"]) for r in lines] == [
        (0, "bf16 autocast", True), (1, "bf16 autocast", True)]
    assert lines[0]["cpu_flags"] == ["avx2", "avx512_bf16", "avx512f"]
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(OLDER_X86))
    with pytest.raises(RunError, match=r"began training in bf16 autocast .* would go on in fp32 .* set train.amp"):
        record_machine(cfg, tmp_path, cpu, 2)
    record_machine(from_dict({"train": {"epochs": 3, "amp": True}}), tmp_path, cpu, 2)  # explicit: goes on
    lines = [json.loads(line) for line in (tmp_path / machine.MACHINE).read_text().splitlines()]
    # ... with its convolutions in float32 from bf16 operands (har.engine.bf16), which the record and captions say
    assert [r["bf16_convolutions"] for r in lines] == ["hardware", "hardware", "float32 from bf16 operands"]
    assert machine.summary(lines[-1:]) == \
        "AMD EPYC (avx2, avx512f; bf16 autocast (float32 convolutions), channels-last)"
    assert "float32 convolutions" not in machine.summary(lines[:1])
    record_machine(from_dict({"train": {"epochs": 3, "amp": False}}), tmp_path / "fp32", cpu, 0)
    fp32 = [json.loads(line) for line in (tmp_path / "fp32" / machine.MACHINE).read_text().splitlines()]
    assert fp32[0]["bf16_convolutions"] is None
    assert machine.summary(fp32) == "AMD EPYC (avx2, avx512f; fp32)"
    record_machine(cfg, tmp_path, cpu, 0)  # a fresh start (epoch 0) begins a new record
    assert len((tmp_path / machine.MACHINE).read_text().splitlines()) == 1


@pytest.mark.parametrize(("device", "amp", "inside"),
                         [("cuda", False, False), ("cuda", True, True), ("cpu", False, True)])
def test_fp32_on_cuda_turns_tf32_off_while_the_run_trains_and_restores_it(device, amp, inside):
    """cuDNN and cuBLAS may compute fp32 convolutions and matmuls in TF32 (on by default for cuDNN); a run in fp32
    on CUDA turns both off while it trains, and leaves them as they were afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_fp32(torch.device(device), amp):
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (inside, inside)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
