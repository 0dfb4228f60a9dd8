"""One writer per run folder and process-level faults: a second trainer or evaluator, a dead holder's lock, another
host's lock, Ctrl-C, an --out that is a file, a full disk, a read-only folder, refused inputs, a kill during the
final save or an evaluation write. Real `har` processes where the behaviour is a process's (locks, signals), on
a tiny synthetic bundle (56 images, batches of 8: 7 steps per epoch)."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import synthetic_data
from test_faults import wait_for_line
from test_train import TINY

import har.atomic as atomic_module
import har.run.checkpoint as checkpoint_module
import har.run.lock as lock_module
from har.cli import main
from har.config import load_config
from har.data.build import write_bundle
from har.engine.trainer import train
from har.errors import RunError
from har.evaluation.evaluate import evaluate_run
from har.run.folder import LOCK as LOCK_NAME
from har.run.lock import EXIT_LOCKED

ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The config file and bundle every run reads, and one finished run (3 epochs) to copy."""
    root = tmp_path_factory.mktemp("run_folder")
    values = json.loads(json.dumps(TINY))
    values["train"].update(batch_size=8, log_every=1)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    bundle = root / "tiny.npz"
    cfg = load_config(config, [f"data.bundle={bundle}"])
    write_bundle(synthetic_data(), cfg.data, bundle)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(cfg, root / "finished")
    yield {"config": config, "bundle": bundle, "cfg": cfg, "finished": root / "finished"}
    torch.set_num_threads(threads)


def args(tiny, out, *extra):
    return ["train", "--config", str(tiny["config"]), "--out", str(out), "--set", f"data.bundle={tiny['bundle']}",
            *extra]


def start(argv):
    return subprocess.Popen([sys.executable, "-m", "har.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def run(argv):
    return subprocess.run([sys.executable, "-m", "har.cli", *argv], capture_output=True, text=True, timeout=300,
                          env=ENV)


def finished_copy(tiny, run_dir):
    shutil.copytree(tiny["finished"], run_dir)
    return run_dir


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


def test_a_second_trainer_and_an_evaluation_are_refused_and_a_dead_holders_lock_is_taken_over(tiny, tmp_path,
                                                                                               capsys):
    """The cluster case: a job trains on after Snakemake was killed (here: stopped with SIGSTOP, so it holds the
    folder for as long as the test needs), the rerun's trainer on the same folder is refused; then the job dies
    (SIGKILL) and the next trainer takes its lock over and finishes the run."""
    out = tmp_path / "run"
    first = start(args(tiny, out))
    try:
        wait_for_line(first, "epoch 1 step 1/7 ")
        first.send_signal(signal.SIGSTOP)
        second = run(args(tiny, out))
        assert second.returncode == EXIT_LOCKED, second.stderr
        [line] = error_lines(second.stderr)
        assert f"host {socket.gethostname()}, pid {first.pid}, started " in line and "har train" in line
        assert "Traceback" not in second.stderr

        assert main(["evaluate", "--run", str(out)]) == EXIT_LOCKED
        err = capsys.readouterr().err
        assert f"pid {first.pid}" in err and "being written" in err
        assert not (out / "eval").exists()
    finally:
        first.kill()
        first.communicate()
    assert (out / LOCK_NAME).exists()  # left by the killed process
    third = run(args(tiny, out))
    assert third.returncode == 0, third.stderr
    assert "taking over" in third.stderr and f"pid {first.pid}" in third.stderr
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2
    assert not (out / LOCK_NAME).exists()


HOLD = ("import sys, time; from pathlib import Path; from har.run.lock import acquire; "
        "acquire(Path(sys.argv[1]), 'evaluate', 'evaluation folder'); print('held', flush=True); time.sleep(300)")


def test_two_evaluations_do_not_interleave_and_a_killed_ones_leftovers_are_removed(tiny, tmp_path, capsys, caplog):
    run_dir = finished_copy(tiny, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir / "eval")], stdout=subprocess.PIPE, text=True,
                              env=dict(ENV, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["evaluate", "--run", str(run_dir)]) == EXIT_LOCKED
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    leftover = run_dir / "eval" / ".val.json.x1y2.tmp"  # an evaluation killed while writing val.json
    leftover.write_text("{")
    with caplog.at_level("WARNING"):
        reports = evaluate_run(run_dir, device="cpu")
    assert "taking over" in caplog.text
    assert set(reports) == {"val", "test"} and (run_dir / "eval" / "test.json").exists()
    assert not list((run_dir / "eval").glob(".*.tmp")) and not (run_dir / "eval" / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_never_taken_over(tiny, tmp_path, capsys):
    run_dir = finished_copy(tiny, tmp_path / "run")
    lock = {"host": "node-elsewhere", "pid": 1, "started": "2026-12-01T10:00:00+00:00", "command": "train"}
    (run_dir / LOCK_NAME).write_text(json.dumps(lock))
    assert main(args(tiny, run_dir)) == EXIT_LOCKED
    err = capsys.readouterr().err
    assert "har train on host node-elsewhere, pid 1, started 2026-12-01T10:00:00+00:00" in err
    assert f"delete {run_dir / LOCK_NAME} by hand" in err
    assert (run_dir / LOCK_NAME).exists()


def test_ctrl_c_ends_train_and_evaluate_with_status_130_and_one_line(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # SIGINT back to its default in the child: a shell that starts the suite in the background (nohup, &) makes
    # its children ignore SIGINT, and Python then never turns it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "har.cli", *args(tiny, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_line(proc, "epoch 1 step 2/7 ")
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log
    assert "Traceback" not in log
    assert log.rstrip().splitlines()[-1] == ("har train: interrupted (Ctrl-C); run the same command again to "
                                             "resume from the last checkpoint")
    assert not (out / LOCK_NAME).exists()

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("har.evaluation.evaluate.evaluate_run", interrupted)
    assert main(["evaluate", "--run", str(tiny["finished"])]) == 130
    assert capsys.readouterr().err.startswith("har evaluate: interrupted (Ctrl-C)")


def test_an_out_that_is_a_file_or_lies_below_one_is_refused(tiny, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert main(args(tiny, a_file)) == 2
    assert f"run folder (--out) {a_file} is a file, not a folder" in capsys.readouterr().err
    assert main(args(tiny, a_file / "run")) == 2
    assert f"{a_file / 'run'} lies below {a_file}, which is a file" in capsys.readouterr().err


def fail_at(monkeypatch, name, exc, nth):
    """Make the `nth` atomic write of a file called `name` fail with `exc`, as a full disk does."""
    real = atomic_module._open_temp
    seen = []

    class Refusing:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise exc

        def __getattr__(self, attr):
            return getattr(self.handle, attr)

        def __enter__(self):
            return self

        def __exit__(self, *info):
            self.handle.close()

    def opener(path):
        handle, tmp = real(path)
        seen.extend([path] if path.name == name else [])
        return (Refusing(handle) if path.name == name and len(seen) == nth else handle), tmp

    monkeypatch.setattr(atomic_module, "_open_temp", opener)


@pytest.mark.parametrize("name", ["last.pt", "metrics.jsonl"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_checkpoint_survives(tiny, tmp_path, capsys,
                                                                                       monkeypatch, name):
    """Epoch 0 is saved, epoch 1's write fails."""
    out = tmp_path / "run"
    fail_at(monkeypatch, name, OSError(errno.ENOSPC, "No space left on device"), nth=2)
    assert main(args(tiny, out)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"cannot write {out / name}: No space left on device (ENOSPC); free space" in line
    assert not list(out.glob(".*.tmp"))
    survivor = "prev.pt" if name == "last.pt" else "last.pt"
    assert torch.load(out / survivor, weights_only=False)["epoch"] == 0

    monkeypatch.undo()
    assert main(args(tiny, out)) == 0  # space freed: the same command resumes
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2


def read_only(monkeypatch, folder):
    """Writes below `folder` are refused as in a read-only folder (chmod does not stop root, who runs some tests)."""
    denied = PermissionError(errno.EACCES, "Permission denied")
    real_create, real_open = lock_module._create_exclusive, atomic_module._open_temp

    def create(path):
        if folder in path.parents:
            raise denied
        return real_create(path)

    def open_temp(path):
        if folder in path.parents:
            raise denied
        return real_open(path)

    monkeypatch.setattr(lock_module, "_create_exclusive", create)
    monkeypatch.setattr(atomic_module, "_open_temp", open_temp)


def test_a_finished_run_is_not_rewritten_and_reads_in_a_read_only_folder(tiny, tmp_path, monkeypatch):
    run_dir = finished_copy(tiny, tmp_path / "run")
    before = {n: (run_dir / n).stat() for n in ("config.yaml", "config.sha256", "metrics.jsonl", "last.pt")}
    assert len(train(tiny["cfg"], run_dir)) == 3
    after = {n: (run_dir / n).stat() for n in before}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()}

    read_only(monkeypatch, run_dir)
    assert [r["epoch"] for r in train(tiny["cfg"], run_dir)] == [0, 1, 2]
    with pytest.raises(RunError, match=r"cannot create the lock file .*eval/\.har\.lock: Permission denied"):
        evaluate_run(run_dir, device="cpu")


def test_an_unfinished_run_in_a_read_only_folder_is_refused_before_training(tiny, tmp_path, monkeypatch):
    run_dir = finished_copy(tiny, tmp_path / "run")
    os.replace(run_dir / "prev.pt", run_dir / "last.pt")  # epoch 1 of 0..2
    read_only(monkeypatch, run_dir)
    with pytest.raises(RunError, match=r"cannot be written \(Permission denied: .*\) and its run is not finished "
                                       r"\(2 of 3 epochs\): make the folder writable"):
        train(tiny["cfg"], run_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_chmod_read_only_folder(tiny, tmp_path, capsys):
    run_dir = finished_copy(tiny, tmp_path / "run")
    run_dir.chmod(0o555)
    try:
        assert main(args(tiny, run_dir)) == 0
        assert main(["evaluate", "--run", str(run_dir)]) == 2
        assert f"cannot create evaluation folder {run_dir / 'eval'}: Permission denied" in capsys.readouterr().err
    finally:
        run_dir.chmod(0o755)


@pytest.mark.parametrize("existed", [False, True], ids=["new-folder", "empty-folder"])
def test_a_refused_input_leaves_no_config_behind_and_the_corrected_command_works(tiny, tmp_path, capsys, existed):
    out = tmp_path / "run"
    if existed:
        out.mkdir()
    wrong = args(tiny, out, "--set", "train.epochs=1", "--set", f"data.bundle={tmp_path / 'missing.npz'}")
    assert main(wrong) == 2
    assert "missing.npz does not exist" in capsys.readouterr().err
    assert out.exists() == existed and (not existed or list(out.iterdir()) == [])
    assert main(args(tiny, out, "--set", "train.epochs=1")) == 0
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 0


@pytest.mark.parametrize("fault", ["missing", "truncated"])
def test_evaluate_after_a_kill_during_the_final_save_recovers_prev(tiny, tmp_path, caplog, fault):
    run_dir = finished_copy(tiny, tmp_path / "run")
    os.replace(run_dir / "last.pt", run_dir / "prev.pt")  # killed between moving last.pt and writing the new one
    if fault == "truncated":
        (run_dir / "last.pt").write_bytes((run_dir / "prev.pt").read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        reports = evaluate_run(run_dir, device="cpu")
    assert "resuming from" in caplog.text and "prev.pt" in caplog.text
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 2
    assert reports["test"]["num_examples"] == 18


def test_a_disk_error_while_moving_the_checkpoint_names_both_files(tiny, tmp_path, monkeypatch):
    run_dir = finished_copy(tiny, tmp_path / "run")
    os.replace(run_dir / "last.pt", run_dir / "prev.pt")

    def refuse(source, target):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoint_module.os, "replace", refuse)
    with pytest.raises(RunError, match=r"cannot move prev.pt to .*last.pt: Read-only file system \(EROFS\)"):
        evaluate_run(run_dir, device="cpu")
