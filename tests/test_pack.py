"""Packs (har.engine.pack): K runs trained together end as the K single runs would, with either executor (one
K-wide network, or each member's own step in turn).

In-process tests compute in float64 (models built with float64 as the default dtype, images widened), so that
"equal" means within rounding of another kernel, never a float tie. Tiny synthetic data: 56 training images in
batches of 16 (4 steps an epoch), 2 epochs with the lr decay and DRW at epoch 1; a few seconds each.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import synthetic_data
from test_faults import wait_for_line
from test_train import TINY
from torch._dynamo.utils import counters

import har.data.augment as augment_module
import har.data.batches as batches_module
import har.data.loader as loader_module
import har.engine.member as member_module
from har.config import config_hash, from_dict, load_config, to_dict
from har.data.build import write_bundle
from har.engine.executors import PackStep
from har.engine.membership import check_pack, pack_shape
from har.engine.pack import train_pack
from har.engine.signals import TrainingInterrupted
from har.engine.trainer import train
from har.errors import ConfigError, RunError
from har.methods.mixup import draw_mixing
from har.models.packed import PackedNet
from har.run.assembly import build_loss, build_model
from har.run.folder import TRAIN_ERROR as ERROR_FILE

pytestmark = pytest.mark.usefixtures("single_thread")  # small workloads slow down badly with contending threads

# ResNet-8: ResNet-32's groups, widths and exits at a sixth of its cost (what a pack does is the same for both)
TWO_EPOCHS = {"model": {"name": "resnet8"}, "train": {"epochs": 2, "lr_milestones": [1], "warmup_epochs": 0,
                                                       "log_every": 2},
              "loss": {"drw_epoch": 1}, "eval": {"record_test_from": 0}}
# Three members of one shape (cosine exits for all) that differ in seed, loss, HAR and its t, DRW and Mixup.
MEMBERS = [
    {"train": {"seed": 0}, "loss": {"name": "ce", "har": False, "reweight": "none"}},
    {"train": {"seed": 1}, "loss": {"name": "ldam", "har": True, "train_threshold": 0.2, "reweight": "drw"}},
    {"train": {"seed": 2, "mixup": "input"}, "loss": {"name": "focal", "har": True, "train_threshold": 0.3,
                                                       "reweight": "cb"}},
]


def member_config(extra, classifier="cosine", executor="auto"):
    values = json.loads(json.dumps(TINY))
    for part in (TWO_EPOCHS, {"model": {"classifier": classifier}, "train": {"pack_executor": executor}}, extra):
        for section, fields in part.items():
            values.setdefault(section, {}).update(fields)
    return from_dict(values)


@pytest.fixture(params=["fused", "serial"])
def executor(request):
    """Each in-process pack test runs with both executors (on the CPU `auto` would take serial)."""
    return request.param


def exactness(executor: str) -> float:
    """The serial executor takes the single run's own kernels: bit for bit; the fused one other kernels."""
    return 0.0 if executor == "serial" else 1e-9


@pytest.fixture
def float64(monkeypatch):
    """Models in float64 and images widened to it (the trainers cast nothing themselves)."""
    real = augment_module.normalize

    def wide(*args):
        return real(*args).double()

    for module in (augment_module, batches_module, loader_module):
        monkeypatch.setattr(module, "normalize", wide)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def batches_seen(monkeypatch):
    """Every training batch drawn, keyed by the seed of the epoch's generator (a function of run seed and epoch)."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    real = loader_module.TensorBatches.epoch

    def spy(self, generator, order=None, start=0):
        for images, labels in real(self, generator, order, start):
            seen.setdefault(generator.initial_seed(), []).append((images.clone(), labels.clone()))
            yield images, labels

    monkeypatch.setattr(loader_module.TensorBatches, "epoch", spy)
    return seen


def load(run: Path, name="last.pt"):
    return torch.load(run / name, weights_only=False)


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close_runs(single: Path, member: Path, tol: float = 1e-9) -> None:
    """Same weights, buffers, momentum, schedule and metrics rows, within `tol` (relative and absolute)."""
    a, b = load(single), load(member)
    assert a["epoch"] == b["epoch"] and a["partial"] is None and b["partial"] is None
    assert a["config_sha256"] == b["config_sha256"] and a["scheduler"] == b["scheduler"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=tol, atol=tol, msg=key)
    momentum_a, momentum_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert momentum_a.keys() == momentum_b.keys()
    for index in momentum_a:
        torch.testing.assert_close(momentum_b[index]["momentum_buffer"], momentum_a[index]["momentum_buffer"],
                                   rtol=tol, atol=tol)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the state its single run would resume with
    ra, rb = rows(single), rows(member)
    assert [r.keys() for r in ra] == [r.keys() for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key, value in x.items():
            if key == "exit_loss":
                assert [v is None for v in y[key]] == [v is None for v in value]
                assert [v for v in y[key] if v is not None] == pytest.approx([v for v in value if v is not None],
                                                                              rel=tol, abs=tol)
            else:
                assert y[key] == pytest.approx(value, rel=tol, abs=tol), key


def test_a_pack_ends_as_its_single_runs_in_float64(tmp_path, tiny_data, float64, batches_seen, executor):
    configs = [member_config(m, executor=executor) for m in MEMBERS]
    singles = [tmp_path / f"single{k}" for k in range(len(configs))]
    for cfg, out in zip(configs, singles, strict=True):
        train(cfg, out, data=tiny_data)
    alone = {seed: [(x.clone(), y.clone()) for x, y in batches] for seed, batches in batches_seen.items()}
    batches_seen.clear()
    members = [tmp_path / "pack" / f"m{k}" for k in range(len(configs))]
    histories = train_pack(list(zip(configs, members, strict=True)), data=tiny_data)

    assert [len(h) for h in histories] == [2, 2, 2]
    assert batches_seen.keys() == alone.keys() and len(alone) == 6  # 3 members x 2 epochs
    for seed, batches in alone.items():  # data order and augmentation bit-identical
        assert len(batches_seen[seed]) == len(batches) == 4
        for (x, y), (px, py) in zip(batches, batches_seen[seed], strict=True):
            assert torch.equal(x, px) and torch.equal(y, py)
    for single, member in zip(singles, members, strict=True):
        assert_close_runs(single, member, exactness(executor))
        assert (single / "config.yaml").read_text() == (member / "config.yaml").read_text()
    assert [r["reweighted"] for r in rows(members[1])] == [False, True]
    assert "test_top1" in rows(members[0])[1]


def test_a_channels_last_pack_ends_as_its_single_runs_in_float64(tmp_path, tiny_data, float64, executor):
    """In the channels-last layout (the CUDA default) a member's state moves between the pack and its own modules
    in that layout too (weights, momentum), and members end as their channels-last single runs."""
    configs = [member_config({**m, "train": {**m["train"], "channels_last": True}}, executor=executor)
               for m in MEMBERS[:2]]
    singles = [tmp_path / f"single{k}" for k in range(2)]
    for cfg, out in zip(configs, singles, strict=True):
        train(cfg, out, data=tiny_data)
    members = [tmp_path / "pack" / f"m{k}" for k in range(2)]
    train_pack(list(zip(configs, members, strict=True)), data=tiny_data)
    assert load(members[0])["model"]["backbone.stem.0.weight"].is_contiguous(memory_format=torch.channels_last)
    for single, member in zip(singles, members, strict=True):
        assert_close_runs(single, member, exactness(executor))


def test_a_member_that_turns_non_finite_stops_alone(tmp_path, tiny_data, float64, monkeypatch, executor):
    """Member 1's loss turns NaN in epoch 1 (3 epochs): it stops with the single run's error in its folder and
    keeps its epoch-0 checkpoint; members 0 and 2 finish as their single runs (the fused executor rebuilds the
    pack without member 1 for epoch 2); the pack then fails naming member 1."""
    configs = [member_config({"train": {"seed": s, "epochs": 3}, "loss": {"name": "ce", "reweight": "none"}},
                             "linear", executor) for s in (0, 1, 2)]
    singles = [tmp_path / f"single{k}" for k in (0, 2)]
    for cfg, out in zip([configs[0], configs[2]], singles, strict=True):
        train(cfg, out, data=tiny_data)
    real_build = member_module.build_loss
    calls = []

    def poisoned_for_seed_1(cfg, counts):
        loss = real_build(cfg, counts)
        if cfg.train.seed == 1:
            per_example = loss.exit_loss.per_example

            def nan_from_step_5(logits, target):
                calls.append(1)
                values = per_example(logits, target)
                return values * float("nan") if len(calls) > 4 * 4 else values  # 4 exits x 4 steps: epoch 1 on

            loss.exit_loss.per_example = nan_from_step_5
        return loss

    monkeypatch.setattr(member_module, "build_loss", poisoned_for_seed_1)
    members = [tmp_path / "pack" / f"m{k}" for k in range(3)]
    with pytest.raises(RunError, match=r"1 of 3 pack members stopped") as stopped:
        train_pack(list(zip(configs, members, strict=True)), data=tiny_data)
    assert str(members[1]) in str(stopped.value)
    error = (members[1] / ERROR_FILE).read_text()
    assert "non-finite training loss at epoch 1, step 0" in error
    assert load(members[1])["epoch"] == 0 and len(rows(members[1])) == 1
    for single, member in zip(singles, [members[0], members[2]], strict=True):
        assert_close_runs(single, member, exactness(executor))
        assert load(member)["epoch"] == 2
        assert not (member / ERROR_FILE).exists()


def test_members_must_share_a_shape_and_not_be_decoupled(tmp_path):
    base = member_config({}, "linear")
    other_batch = member_config({"train": {"batch_size": 8}}, "linear")
    # loss, seed and Mixup are the members' own
    assert pack_shape(member_config(MEMBERS[0])) == pack_shape(member_config(MEMBERS[1]))
    with pytest.raises(ConfigError, match=r"(?s)another shape.*train.batch_size: 16 -> 8"):
        check_pack([(base, tmp_path / "a"), (other_batch, tmp_path / "b")])
    with pytest.raises(ConfigError, match="share a run folder"):
        check_pack([(base, tmp_path / "a"), (base, tmp_path / "a")])
    manifold = member_config({"train": {"mixup": "manifold"}, "model": {"layout": "CBBBE"}}, "linear")
    with pytest.raises(ConfigError, match="manifold"):
        check_pack([(manifold, tmp_path / "c")])


def test_members_at_different_epochs_train_apart_until_level(tmp_path, tiny_data, float64, executor):
    """A member one epoch ahead (as after a kill between two members' checkpoints) waits while the other catches
    up; both end as their single runs."""
    configs = [member_config(MEMBERS[0], executor=executor), member_config(MEMBERS[1], executor=executor)]
    singles = [tmp_path / "single0", tmp_path / "single1"]
    for cfg, out in zip(configs, singles, strict=True):
        train(cfg, out, data=tiny_data)
    members = [tmp_path / "pack" / "m0", tmp_path / "pack" / "m1"]
    one_epoch = from_dict({**json.loads(json.dumps(to_dict(configs[0]))), "train": {
        **to_dict(configs[0])["train"], "epochs": 1}})
    train(one_epoch, tmp_path / "ahead", data=tiny_data)  # the epoch-0 checkpoint of member 0, made alone
    members[0].mkdir(parents=True)
    ahead = load(tmp_path / "ahead")
    ahead["config"], ahead["config_sha256"] = to_dict(configs[0]), config_hash(configs[0])
    torch.save(ahead, members[0] / "last.pt")
    (members[0] / "metrics.jsonl").write_text((tmp_path / "ahead" / "metrics.jsonl").read_text())
    train_pack(list(zip(configs, members, strict=True)), data=tiny_data)
    for single, member in zip(singles, members, strict=True):
        assert_close_runs(single, member, exactness(executor))


class PackSetup:
    """A tiny bundle, three member configs and an uninterrupted `har train-pack` to compare with (started at once
    in the background). 56 images in batches of 8: 7 steps an epoch, 3 epochs, a log line every step."""

    def __init__(self, root: Path, executor: str) -> None:
        self.root, self.executor = root, executor
        self.bundle = root / "tiny.npz"
        self.configs = []
        for k, member in enumerate([{"train": {"seed": 0}, "loss": {"har": False}},
                                    {"train": {"seed": 1}},
                                    {"train": {"seed": 2, "mixup": "input"}, "loss": {"name": "focal"}}]):
            values = json.loads(json.dumps(TINY))
            values["train"].update(batch_size=8, log_every=1)
            for section, fields in member.items():
                values[section].update(fields)
            path = root / f"member{k}.yaml"
            path.write_text(yaml.safe_dump(values))
            self.configs.append(path)
        write_bundle(synthetic_data(), load_config(self.configs[0], [f"data.bundle={self.bundle}"]).data, self.bundle)
        self._reference = root / "reference"
        self._straight = self.start(self._reference)

    def command(self, out: Path, *extra: str) -> list[str]:
        members = [part for k, c in enumerate(self.configs) for part in ("--member", str(c), str(out / f"m{k}"))]
        return [sys.executable, "-m", "har.cli", "train-pack", *members, "--set", f"data.bundle={self.bundle}",
                "--set", f"train.pack_executor={self.executor}", *extra]

    def start(self, out: Path) -> subprocess.Popen:
        return subprocess.Popen(self.command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))

    @property
    def reference(self) -> Path:
        log = self._straight.communicate(timeout=300)[0]
        assert self._straight.returncode == 0, log
        return self._reference


@pytest.fixture(scope="module", params=["fused", "serial"])
def pack_setup(tmp_path_factory, request):
    runs = PackSetup(tmp_path_factory.mktemp("packs"), request.param)
    yield runs
    runs._straight.kill()
    runs._straight.communicate()


def assert_equal_runs(a: Path, b: Path) -> None:
    """Bit for bit: same weights and metrics rows (the same computation, interrupted or not)."""
    first, second = load(a), load(b)
    assert first["model"].keys() == second["model"].keys() and second["partial"] is None
    for key in first["model"]:
        assert torch.equal(first["model"][key], second["model"][key]), key
    assert rows(a) == rows(b)


def test_a_pack_stopped_by_sigterm_and_sigkills_resumes_to_the_uninterrupted_result(pack_setup, tmp_path):
    """SIGTERM in epoch 1 (exit 75, every member's mid-epoch checkpoint), then SIGKILLs at seeded random points
    (some inside the members' checkpoint writes, which can leave members at different points), each followed by
    the same command; every member ends as in the uninterrupted pack."""
    out = tmp_path / "pack"
    proc = pack_setup.start(out)
    wait_for_line(proc, "pack epoch 2 step 2/7 ")
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate()[0]
    assert proc.returncode == 75, log
    assert "SIGTERM received: saved the pack's 3 checkpoints" in log
    for k in range(3):
        partial = load(out / f"m{k}")["partial"]
        assert partial["epoch"] == 1 and 0 < partial["step"] < 7
    rng = random.Random(20261202)
    for epoch, step in [(2, rng.randrange(4, 8)), (3, rng.randrange(1, 8))]:  # after the SIGTERM's step
        proc = pack_setup.start(out)
        wait_for_line(proc, f"pack epoch {epoch} step {step}/7 ")
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        proc.communicate()
    done = subprocess.run(pack_setup.command(out), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    for k in range(3):
        assert_equal_runs(pack_setup.reference / f"m{k}", out / f"m{k}")


def test_a_member_of_a_stopped_pack_resumes_alone(tmp_path, tiny_data, float64, monkeypatch, executor):
    """SIGUSR1 (SLURM's warning) in epoch 1 stops the pack with every member's mid-epoch checkpoint; `train` on one
    member's folder alone continues it and ends as its uninterrupted single run."""
    configs = [member_config(m, executor=executor) for m in MEMBERS]
    train(configs[1], tmp_path / "single1", data=tiny_data)
    real, drawn = loader_module.TensorBatches.epoch, []

    def signal_at_epoch_1_step_1(self, generator, order=None, start=0):
        for batch in real(self, generator, order, start):
            drawn.append(1)
            if len(drawn) == 3 * 4 + 3 * 2:  # 3 members: all of epoch 0, two steps of epoch 1
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch

    monkeypatch.setattr(loader_module.TensorBatches, "epoch", signal_at_epoch_1_step_1)
    members = [tmp_path / "pack" / f"m{k}" for k in range(3)]
    with pytest.raises(TrainingInterrupted, match="SIGUSR1 received: saved the pack's 3 checkpoints"):
        train_pack(list(zip(configs, members, strict=True)), data=tiny_data)
    monkeypatch.setattr(loader_module.TensorBatches, "epoch", real)
    for member in members:
        assert load(member)["epoch"] == 0 and load(member)["partial"]["step"] == 2
    train(configs[1], members[1], data=tiny_data)
    assert_close_runs(tmp_path / "single1", members[1], exactness(executor))


def test_a_compiled_serial_pack_compiles_every_members_step_past_dynamos_recompile_limit(tmp_path, tiny_data,
                                                                                        monkeypatch):
    """Members with different losses are different graphs of StepLoss.forward; past dynamo's recompile limit (8 by
    default, so a pack of 16 can pass it; 2 here, to keep the test short) it would train the other members
    eagerly. The serial executor raises the limit, so each member's step is compiled (the `eager` backend stands
    in for inductor)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: real_compile(module, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    configs = [member_config({"train": {"seed": k, "epochs": 1, "lr_milestones": [], "compile": "default"},
                              "loss": {"name": name, "reweight": "none", "train_threshold": 0.2}}, executor="serial")
               for k, name in enumerate(("ce", "focal", "ldam"))]
    with torch._dynamo.config.patch(recompile_limit=2):  # restores the limit the pack raises, too
        train_pack([(cfg, tmp_path / f"m{k}") for k, cfg in enumerate(configs)], data=tiny_data)
    assert counters["frames"]["ok"] >= 3  # one graph each; 2 at the limit
    assert all(load(tmp_path / f"m{k}")["epoch"] == 0 for k in range(3))
    torch._dynamo.reset()


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_compiled_pack_step_is_one_graph_that_equals_the_eager_step(tiny_data, channels_last):
    """`train.compile` compiles the whole pack step (K-wide forward, every member's loss and statistics); checked
    with the `aot_eager` backend (inductor would take minutes on 2 cores), fullgraph=True failing on any break,
    also in the channels-last layout that CUDA trains in."""
    torch._dynamo.reset()
    configs = [member_config(m) for m in MEMBERS]
    members = []
    for cfg in configs:
        torch.manual_seed(cfg.train.seed)
        members.append((build_model(cfg, tiny_data.num_classes), build_loss(cfg, tiny_data.class_counts)))
    packed = PackedNet([model for model, _ in members])
    if channels_last:
        packed = packed.to(memory_format=torch.channels_last)
    eager = PackStep(packed, [loss for _, loss in members], [cfg.train.mixup for cfg in configs], amp=False)
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    params = list(packed.parameters())
    for step in range(3):
        images = [torch.randn(16, 3, 32, 32) for _ in configs]
        labels = [torch.randint(0, tiny_data.num_classes, (16,)) for _ in configs]
        mixings = [None if cfg.train.mixup == "off" else draw_mixing(1.0, cfg.train.seed, 0, step, 16,
                                                                      torch.device("cpu")) for cfg in configs]
        want = eager(images, labels, mixings)
        want_grads = torch.autograd.grad(sum(o.loss_sum / o.normaliser for o in want), params)
        got = compiled(images, labels, mixings)
        got_grads = torch.autograd.grad(sum(o.loss_sum / o.normaliser for o in got), params)
        for a, b in zip(want, got, strict=True):
            for name, x, y in zip(a._fields, a, b, strict=True):
                torch.testing.assert_close(y, x, msg=f"{name} at step {step}")
        for x, y in zip(want_grads, got_grads, strict=True):
            torch.testing.assert_close(y, x)
