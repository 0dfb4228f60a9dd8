"""Faults a long training job meets: SIGKILL, SIGTERM / SIGUSR1 from the scheduler, an unreadable checkpoint,
a diverging loss. Real `har train` processes run on a tiny synthetic bundle (3 epochs of 56 images, 7 steps each,
the DRW switch and the lr decay at epoch 2); every interrupted run is resumed by running the same command again
and must end with the weights and metrics of an uninterrupted run, bit for bit.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from conftest import synthetic_data
from test_train import TINY, without_time

import har.data.batches as batches_module
from har.cli import main
from har.config import load_config
from har.data.build import write_bundle
from har.engine.signals import EXIT_TEMPFAIL, TrainingInterrupted, stop_requests
from har.engine.trainer import train
from har.errors import RunError

STEPS = 7  # 56 training images in batches of 8
EPOCHS = 3


class Setup:
    """The bundle and config file every run reads, and an uninterrupted `har train` run to compare with, started
    at once in the background (it trains while the interrupted runs start) and awaited on first use."""

    def __init__(self, root):
        values = json.loads(json.dumps(TINY))
        values["train"].update(batch_size=8, log_every=1)
        self.config = root / "tiny.yaml"
        self.config.write_text(yaml.safe_dump(values))
        self.bundle = root / "tiny.npz"
        self.cfg = load_config(self.config, [f"data.bundle={self.bundle}"])
        write_bundle(synthetic_data(), self.cfg.data, self.bundle)
        self._reference = root / "reference"
        self._straight = start(self, self._reference)

    @property
    def reference(self):
        log = self._straight.communicate(timeout=300)[0]
        assert self._straight.returncode == 0, log
        return self._reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    runs = Setup(tmp_path_factory.mktemp("faults"))
    yield runs
    runs._straight.kill()
    runs._straight.communicate()


@pytest.fixture(autouse=True)
def one_thread():
    """Training in this process computes as the `har train` processes do, with OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def command(setup, out):
    return [sys.executable, "-m", "har.cli", "train", "--config", str(setup.config), "--out", str(out),
            "--set", f"data.bundle={setup.bundle}"]


def start(setup, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command(setup, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_line(proc, fragment, timeout=120):
    """Read the process's log until a line contains `fragment`; return everything read."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if fragment in line:
            return "".join(seen)
        assert time.monotonic() < deadline, f"no {fragment!r} in time:\n{''.join(seen)}"
    raise AssertionError(f"the process ended (status {proc.wait()}) before logging {fragment!r}:\n{''.join(seen)}")


def finish(setup, out):
    """Run the same command again to the end."""
    done = subprocess.run(command(setup, out), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    return done.stderr


def checkpoint(run, name="last.pt"):
    return torch.load(run / name, weights_only=False)


def assert_same_as_reference(run, setup):
    reference = setup.reference
    a, b = checkpoint(reference)["model"], checkpoint(run)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    straight = (reference / "metrics.jsonl").read_text().splitlines()
    resumed = (run / "metrics.jsonl").read_text().splitlines()
    assert [without_time(r) for r in resumed] == [without_time(r) for r in straight]
    assert checkpoint(run)["partial"] is None
    assert not list(run.glob(".*.tmp"))


def test_sigkills_at_random_times_and_a_sigterm_mid_epoch_resume_to_the_uninterrupted_result(setup, tmp_path):
    """One run stopped four times, each stop followed by the same command again: three SIGKILLs at seeded random
    points (after a random step plus up to 0.25 s, so some land in a checkpoint write) in epochs 0 and 2, and a
    SIGTERM in epoch 1 that must exit with status 75 after a mid-epoch checkpoint."""
    rng = random.Random(20240611)
    kills = rng.sample([s for s in range(EPOCHS * STEPS) if s // STEPS != 1], 3)
    sigterm = STEPS + 1  # after the log line of epoch 1, step 1 (0-based): saved at step 2 or a little later
    out = tmp_path / "run"
    for target in sorted(kills + [sigterm]):
        epoch, step = divmod(target, STEPS)
        proc = start(setup, out)
        wait_for_line(proc, f"epoch {epoch + 1} step {step + 1}/{STEPS} ")
        if target == sigterm:
            proc.send_signal(signal.SIGTERM)
            log = proc.communicate()[0]
            assert proc.returncode == EXIT_TEMPFAIL, log
            assert "SIGTERM received: saved" in log and "run the same command again to resume" in log
            partial = checkpoint(out)["partial"]
            assert checkpoint(out)["epoch"] == 0 and partial["epoch"] == 1 and 0 < partial["step"] < STEPS
            assert checkpoint(out, "prev.pt")["epoch"] == 0 and checkpoint(out, "prev.pt")["partial"] is None
        else:
            time.sleep(rng.uniform(0, 0.25))
            proc.kill()
            proc.communicate()
            assert proc.returncode == -signal.SIGKILL
    log = finish(setup, out)
    assert "resuming" in log
    assert_same_as_reference(out, setup)


@pytest.mark.parametrize("call, epoch_done, partial", [(9, 0, (1, 2)), (STEPS, 0, None)],
                         ids=["mid-epoch", "last-step-of-epoch"])
def test_sigusr1_stops_after_the_step_with_status_75_and_restores_the_handlers(setup, tmp_path, monkeypatch,
                                                                               call, epoch_done, partial):
    """SLURM's warning signal, sent from inside a known step of this process (in the last step of an epoch, the
    epoch's own checkpoint is the stop's)."""
    real = batches_module.BatchAugment
    calls = []

    class SignalsAtStep(real):
        def __call__(self, images, generator=None):
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().__call__(images, generator)

    monkeypatch.setattr(batches_module, "BatchAugment", SignalsAtStep)
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(setup.cfg, tmp_path / "run")
    assert stopped.value.code == EXIT_TEMPFAIL and "SIGUSR1 received" in str(stopped.value)
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    ckpt = checkpoint(tmp_path / "run")
    assert ckpt["epoch"] == epoch_done
    assert (ckpt["partial"] and (ckpt["partial"]["epoch"], ckpt["partial"]["step"])) == partial


def test_an_epoch_resumed_from_a_checkpoint_without_per_class_sums_leaves_them_out_of_its_row(setup, tmp_path,
                                                                                              monkeypatch):
    """A mid-epoch checkpoint of a version that summed no classes: the rest of that epoch trains as before and its
    metrics row has everything but `train_top1_per_class` (half an epoch's counts would pass for a whole one)."""
    real, calls = batches_module.BatchAugment, []

    class SignalsAtStep(real):
        def __call__(self, images, generator=None):
            calls.append(1)
            if len(calls) == STEPS + 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().__call__(images, generator)

    monkeypatch.setattr(batches_module, "BatchAugment", SignalsAtStep)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(setup.cfg, out)
    monkeypatch.setattr(batches_module, "BatchAugment", real)
    older = checkpoint(out)
    assert older["partial"]["epoch"] == 1
    for key in ("class_seen", "class_correct"):
        del older["partial"]["sums"][key]
    torch.save(older, out / "last.pt")
    train(setup.cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (setup.reference / "metrics.jsonl").read_text().splitlines()]
    assert ["train_top1_per_class" in row for row in rows] == [True, False, True]
    assert [{k: v for k, v in row.items() if k not in ("seconds", "train_top1_per_class")} for row in rows] == \
        [{k: v for k, v in row.items() if k not in ("seconds", "train_top1_per_class")} for row in straight]


def test_stop_requests_installs_no_handler_outside_the_main_thread():
    errors = []

    def body():
        try:
            with stop_requests() as request:
                assert request.signum is None
        except Exception as exc:  # signal.signal raises ValueError outside the main thread
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []


def copy_of_reference(setup, run):
    run.mkdir()
    for name in ("config.yaml", "config.sha256", "metrics.jsonl", "last.pt", "prev.pt"):
        (run / name).write_bytes((setup.reference / name).read_bytes())
    assert checkpoint(run)["epoch"] == 2 and checkpoint(run, "prev.pt")["epoch"] == 1
    return run


def test_a_missing_last_checkpoint_resumes_from_prev(setup, tmp_path, caplog):
    """Killed between moving last.pt to prev.pt and writing the new last.pt (here: the final save)."""
    run = copy_of_reference(setup, tmp_path / "run")
    os.replace(run / "last.pt", run / "prev.pt")
    with caplog.at_level("WARNING"):
        assert len(train(setup.cfg, run)) == EPOCHS
    assert f"{run / 'last.pt'} is missing; resuming from {run / 'prev.pt'}" in caplog.text
    assert_same_as_reference(run, setup)  # the final checkpoint is back under its name, for evaluation


def test_unreadable_last_checkpoint_resumes_from_prev_and_both_unreadable_is_an_error(setup, tmp_path, caplog,
                                                                                       capsys):
    run = copy_of_reference(setup, tmp_path / "run")
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        train(setup.cfg, run)
    assert f"checkpoint {run / 'last.pt'} is unreadable" in caplog.text and "resuming from" in caplog.text
    assert_same_as_reference(run, setup)  # epoch 2 trained again from prev.pt
    assert checkpoint(run, "prev.pt")["epoch"] == 1

    for name in ("last.pt", "prev.pt"):
        (run / name).write_bytes((run / name).read_bytes()[:1000])
    assert main(command(setup, run)[3:]) == 2
    err = capsys.readouterr().err
    assert f"no usable checkpoint: checkpoint {run / 'last.pt'} is unreadable" in err
    assert f"and checkpoint {run / 'prev.pt'} is unreadable" in err
    assert "Delete last.pt and prev.pt" in err and "to train this run from scratch" in err


def test_nan_in_the_data_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    real = batches_module.BatchAugment
    calls = []

    class NaNAtStep10(real):
        def __call__(self, images, generator=None):
            calls.append(1)
            x = super().__call__(images, generator)
            return x.index_fill(0, torch.tensor([3]), float("nan")) if len(calls) == 10 else x

    monkeypatch.setattr(batches_module, "BatchAugment", NaNAtStep10)
    with pytest.raises(RunError, match=r"non-finite training loss at epoch 1, step 2 \(both 0-based; 7 steps"):
        train(setup.cfg, tmp_path / "run")
    ckpt = checkpoint(tmp_path / "run")
    assert ckpt["epoch"] == 0 and ckpt["partial"] is None
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert "non-finite training loss at epoch 1, step 2" in (tmp_path / "run" / "train.error").read_text()


def test_a_huge_lr_stops_the_cli_with_status_2_naming_epoch_and_step(setup, tmp_path, capsys):
    """lr 0.1 in epoch 0, then x1e31 (lr 1e30) from epoch 1: the epoch-0 checkpoint survives the divergence."""
    run = tmp_path / "run"
    assert main(command(setup, run)[3:] + ["--set", "train.lr_milestones=[1]", "--set", "train.lr_decay=1.0e+31"]) == 2
    err = capsys.readouterr().err
    assert "error: non-finite training loss at epoch 1, step" in err and "Lower train.lr" in err
    assert checkpoint(run)["epoch"] == 0
