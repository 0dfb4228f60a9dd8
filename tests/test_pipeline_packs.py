"""Packs in the pipeline: which runs grid.packs trains together, the DAG's pack jobs, and the pack job itself.

The grouping tests read the configs only (no Snakemake, no training). The job tests train 1 epoch of tiny runs
on a synthetic bundle (a real bundle file, written by the real writer): seconds, no CIFAR files needed.
"""

import json
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, synthetic_data
from test_workflow import expected_jobs, job_counts, paper_config, snakemake, workdir_copy

import har.engine.loop as loop_module
import har.engine.member as member_module
from har.config import from_dict
from har.data.build import write_bundle
from har.engine.membership import check_pack
from har.errors import RunError
from har.facts import LIST_DATASETS
from har.pipeline import grid, jobs
from har.run.folder import TRAIN_ERROR as ERROR_FILE


def ci_config() -> dict:
    return yaml.safe_load((REPO / "config" / "ci.yaml").read_text())


def with_size(cfg: dict, size: int, **extra) -> dict:
    return {**cfg, "pack": {"size": size, **extra}}


def packed_dirs(packs: dict) -> list[str]:
    return [spec.run_dir for members in packs.values() for spec in members]


def test_the_paper_configs_packs():
    """Packs of 16: every CIFAR run but Manifold Mixup's is in exactly one pack, with runs of its own split and role
    only, whose configs the pack trainer accepts as one pack; ImageNet-LT and iNaturalist runs train alone."""
    cfg = paper_config()
    assert grid.pack_size(cfg) == 16
    packs = grid.packs(cfg)
    runs = grid.final_runs(cfg) + grid.tsearch_runs(cfg)
    expected = {s.run_dir for s in runs if s.dataset not in LIST_DATASETS and s.method != "manifold_mixup"}
    assert sorted(packed_dirs(packs)) == sorted(expected)  # each once
    for name, members in packs.items():
        assert 2 <= len(members) <= 16
        assert {(s.split, s.role) for s in members} == {(members[0].split, members[0].role)}
        assert name.startswith(f"{members[0].split}/{members[0].role}-")
        check_pack([(from_dict(grid.run_config(cfg, s)), Path(s.run_dir)) for s in members])
    # per CIFAR split: finals of 4 shapes (bare linear: CE, focal, Mixup, CE+DRW, focal gamma 1 and 2, 18 runs in 2
    # packs; bare cosine: LDAM, LDAM+DRW; exits linear: HAR(CE), HAR(CE)+DRW; exits cosine: HAR(LDAM),
    # HAR(LDAM)+DRW; 6 runs each), t search of 2 (HAR(CE)+DRW, HAR(LDAM)+DRW: 5 t x 3 seeds each)
    sizes = sorted(len(m) for name, m in packs.items() if name.startswith("cifar10-r100/"))
    assert sizes == [6, 6, 6, 9, 9, 15, 15]
    assert len(packs) == 6 * 7
    assert grid.pack_resources(cfg, packs[next(iter(packs))]) == cfg["resources"]["train"]


def test_size_one_means_no_packs_and_packs_are_cut_evenly_and_named_stably():
    cfg = paper_config()
    assert grid.packs(with_size(cfg, 1)) == {}
    assert grid.packs({k: v for k, v in cfg.items() if k != "pack"}) == {}  # absent: every run alone
    packs = grid.packs(with_size(cfg, 4))
    search = {n: m for n, m in packs.items() if m[0].role == "tsearch" and m[0].split == "cifar10-r100"
              and m[0].method == "har_ce_drw"}
    # 15 runs (5 t x 3 seeds): 4 packs of 4, 4, 4, 3, in (t, seed) order
    assert [len(m) for m in search.values()] == [4, 4, 4, 3]
    assert [(s.t_point, s.seed) for m in search.values() for s in m] == \
        [(t, seed) for t in cfg["t_search"]["ce"] for seed in cfg["t_search"]["seeds"]]
    assert len({n.rsplit("-", 1)[0] for n in search}) == 1 and [n[-2:] for n in search] == ["-0", "-1", "-2", "-3"]
    # the same config in another method order gives the same packs, under the same names
    reordered = {**cfg, "methods": dict(reversed(list(cfg["methods"].items())))}
    assert grid.packs(with_size(reordered, 4)) == packs
    bigger = grid.pack_resources(with_size(cfg, 4, resources={"runtime": 600}), next(iter(packs.values())))
    assert bigger == {**cfg["resources"]["train"], "runtime": 600}


def test_runs_that_cannot_pack_train_alone_and_no_pack_waits_on_a_selection_it_does_not_need():
    """The CI config feeds the search's t to the final HAR(LDAM)+DRW runs (and its Table V layout variant): those
    wait on their selection in packs of their own; tau-norm's stage two trains alone; a CIFAR dataset whose train
    jobs ask for 2 GPUs (torchrun) packs nothing."""
    cfg = with_size(ci_config(), 16)
    packs = grid.packs(cfg)
    runs = {s.run_dir: s for s in grid.final_runs(cfg) + grid.tsearch_runs(cfg)}
    assert set(runs) - set(packed_dirs(packs)) == {f"results/runs/cifar10-r100/tau_norm/seed{s}" for s in (0, 1)}
    waiting = {name: {s.method for s in m} for name, m in packs.items() if grid.needs_selected_t(cfg, m[0])}
    assert sorted(waiting.values(), key=sorted) == [{"har_ldam_drw"}, {"har_ldam_drw@CEBBBE"}]
    for members in packs.values():
        assert len({grid.needs_selected_t(cfg, s) for s in members}) == 1
        assert len({s.base_method for s in members if grid.needs_selected_t(cfg, s)}) <= 1
    manifold = {**cfg, "methods": {**cfg["methods"], "ce": {**cfg["methods"]["ce"], "run": {
        "loss": {"name": "ce", "har": False}, "train": {"mixup": "manifold"}}}}}
    assert not any(s.method == "ce" for s in sum(grid.packs(manifold).values(), []))
    two_gpus = json.loads(json.dumps(cfg))
    two_gpus["datasets"][0]["resources"] = {"train": {"gpu": 2}}
    assert grid.packs(two_gpus) == {}
    imagenet = paper_config()
    assert not any(s.dataset in LIST_DATASETS for s in sum(grid.packs(imagenet).values(), []))


def test_the_dag_has_one_pack_job_per_pack_and_run_train_only_for_single_runs(tmp_path):
    work = workdir_copy(tmp_path)
    cfg = ci_config()
    proc = snakemake(work, "--configfile", "config/ci.yaml", "-n")
    packs = grid.packs(cfg)
    singles = expected_jobs(cfg)["run_train"] - len(packed_dirs(packs))
    assert len(packs) == 6 and singles == 2  # tau-norm's two stage-two runs
    counts = job_counts(proc.stdout)
    assert (counts["pack_train"], counts["pack_member"], counts["run_train"]) == (6, 12, singles)
    jobs_ = {m.group(2): m.group(1).split(", ")
             for m in re.finditer(r"rule pack_train:\n\s+input: (.*)\n\s+output: (\S+)", proc.stdout)}
    assert set(jobs_) == {f"results/packs/{name}/pack.json" for name in packs}
    bundle, selection = "results/splits/cifar10-r100/data.npz", "results/selection/cifar10-r100/har_ldam_drw.json"
    fed = {f"results/packs/{name}/pack.json" for name, m in packs.items() if grid.needs_selected_t(cfg, m[0])}
    assert {out: inputs for out, inputs in jobs_.items() if out in fed} == {out: [bundle, selection] for out in fed}
    assert all(inputs == [bundle] for out, inputs in jobs_.items() if out not in fed)
    members = re.findall(r"rule pack_member:\n\s+input: (\S+)\n\s+output: (\S+)", proc.stdout)
    assert sorted(out for _, out in members) == sorted(f"{d}/train.json" for d in packed_dirs(packs))
    assert all(f"results/packs/{name}/pack.json" == inp for inp, out in members for name, m in packs.items()
               if any(f"{s.run_dir}/train.json" == out for s in m))


# Two methods of one shape (the bare ResNet-32), two seeds: one pack of 4. The bundle is synthetic.
TINY = {
    "label": "pack job test (tiny)", "data_root": None, "seeds": [0, 1], "pack": {"size": 4},
    "run_overrides": {"train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "log_every": 1},
                      "eval": {"batch_size": 100}},
    "datasets": [{"name": "cifar10", "ratios": [100], "tables": ["II"]}],
    "methods": {"ce": {"tables": ["II"], "exits": False, "run": {"loss": {"name": "ce", "har": False}}},
                "focal": {"tables": ["II"], "exits": False, "run": {"loss": {"name": "focal", "har": False}}}},
    "t_search": {"seeds": [0], "ce": [0.9], "ldam": [2.0]},
    "resources": {kind: {"runtime": 10, "mem_mb": 2000, "cpus": 1, "gpu": 0}
                  for kind in ("split", "train", "evaluate", "report")},
}


@pytest.fixture
def tiny_pipeline(tmp_path, monkeypatch) -> Iterator[tuple[dict, list[grid.RunSpec], Path]]:
    """The tiny grid's one pack and a bundle of its split (synthetic images of 10 classes), in a work folder."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = json.loads(json.dumps(TINY))
    (members,) = grid.packs(cfg).values()
    data_cfg = from_dict({"data": grid.split_data(cfg, "cifar10", 100.0)}).data
    bundle = write_bundle(synthetic_data((20, 12, 8, 6, 5, 4, 3, 3, 2, 2), per_class_eval=3), data_cfg,
                          tmp_path / "data.npz")
    yield cfg, members, bundle
    torch.set_num_threads(threads)


def test_a_pack_job_writes_each_members_train_marker_as_a_single_run_job_would(tiny_pipeline, tmp_path):
    """Members' folders hold the config a single run job trains; each member's train.json has the content of
    train_run's for that run (record, epochs, a final row of the same fields). An edited member is moved aside and
    trained again by the next pack job, the other members' folders are left as they are."""
    cfg, members, bundle = tiny_pipeline
    result = jobs.train_pack_job(cfg, members, bundle, [], "pack.json")
    assert json.loads(Path("pack.json").read_text()) == result
    assert [m["run_dir"] for m in result["members"]] == [s.run_dir for s in members]
    for spec in members:
        jobs.write_member_marker("pack.json", spec.run_dir, f"{spec.run_dir}/train.json")
        marker = json.loads(Path(spec.run_dir, "train.json").read_text())
        assert marker["run"] == grid.describe(cfg, spec) and marker["epochs"] == 1
        assert {"loss", "train_top1", "lr"} <= set(marker["final"])
        assert not Path(spec.run_dir, ERROR_FILE).exists()
        # the single run job of the same run finds the member's folder a finished run of its config (nothing moved
        # aside, nothing trained) and writes the same marker
        jobs.train_run(cfg, spec, bundle, None, tmp_path / "single.json")
        assert json.loads((tmp_path / "single.json").read_text()) == marker
        assert not list(Path(spec.run_dir).parent.glob("*.stale-*"))

    edited = json.loads(json.dumps(cfg))
    edited["methods"]["focal"]["run"]["loss"]["focal_gamma"] = 1.0
    kept = {s.run_dir: Path(s.run_dir, "last.pt").stat().st_mtime_ns for s in members if s.method == "ce"}
    (same_pack,) = grid.packs(edited).values()  # the loss is a member's own: the same pack
    jobs.train_pack_job(edited, same_pack, bundle, [], "pack.json")
    for spec in members:
        aside = list(Path(spec.run_dir).parent.glob(f"{Path(spec.run_dir).name}.stale-config-*"))
        assert len(aside) == (spec.method == "focal")
        if spec.method == "ce":
            assert Path(spec.run_dir, "last.pt").stat().st_mtime_ns == kept[spec.run_dir]
        else:
            assert yaml.safe_load(Path(spec.run_dir, "config.yaml").read_text())["loss"]["focal_gamma"] == 1.0


def test_a_member_that_turns_non_finite_fails_its_own_marker_job_only(tiny_pipeline, monkeypatch):
    """The pack job finishes the other members and writes the pack's marker; their train.json markers are written,
    the failed member's marker job stops naming the error and how to train it again."""
    cfg, members, bundle = tiny_pipeline
    real_build = member_module.build_loss
    poisoned = members[1]

    def nan_for_one_member(run_cfg, counts):
        loss = real_build(run_cfg, counts)
        if (run_cfg.loss.name, run_cfg.train.seed) == (poisoned.method, poisoned.seed):
            per_example = loss.exit_loss.per_example
            loss.exit_loss.per_example = lambda logits, target: per_example(logits, target) * float("nan")
        return loss

    monkeypatch.setattr(member_module, "build_loss", nan_for_one_member)
    result = jobs.train_pack_job(cfg, members, bundle, [], "pack.json")
    errors = {m["run_dir"]: m["error"] for m in result["members"]}
    assert [d for d, e in errors.items() if e] == [poisoned.run_dir]
    assert "non-finite training loss at epoch 0" in errors[poisoned.run_dir]
    for spec in members:
        out = f"{spec.run_dir}/train.json"
        if spec == poisoned:
            with pytest.raises(RunError, match=r"stopped in its pack \(pack.json\): non-finite .* delete pack.json"):
                jobs.write_member_marker("pack.json", spec.run_dir, out)
            assert not Path(out).exists()
        else:
            jobs.write_member_marker("pack.json", spec.run_dir, out)
            assert json.loads(Path(out).read_text())["epochs"] == 1


def test_a_pack_job_refused_before_training_writes_no_marker(tiny_pipeline):
    """Anything but a member's divergence fails the whole job (Snakemake reruns or retries it): no pack marker."""
    cfg, members, bundle = tiny_pipeline
    with pytest.raises(Exception, match="does not exist"):
        jobs.train_pack_job(cfg, members, Path("missing.npz"), [], "pack.json")
    assert not Path("pack.json").exists()


def test_a_pack_job_stopped_by_slurms_warning_writes_no_marker_and_its_retry_resumes(tiny_pipeline, monkeypatch):
    """SIGUSR1 (here recorded before the first step ends): every member saves its mid-epoch checkpoint, the job
    exits 75 without the pack's marker (Snakemake retries it), and the retry resumes each member and finishes."""
    cfg, members, bundle = tiny_pipeline
    real = loop_module.stop_requests

    @contextmanager
    def warned():
        with real() as stop:
            stop.signum = signal.SIGUSR1
            yield stop

    monkeypatch.setattr(loop_module, "stop_requests", warned)
    with pytest.raises(SystemExit) as stopped:
        jobs.train_pack_job(cfg, members, bundle, [], "pack.json")
    assert stopped.value.code == 75 and not Path("pack.json").exists()
    for spec in members:
        assert torch.load(Path(spec.run_dir, "last.pt"), weights_only=False)["partial"]["step"] == 1
    monkeypatch.setattr(loop_module, "stop_requests", real)
    result = jobs.train_pack_job(cfg, members, bundle, [], "pack.json")
    assert [m["train"]["epochs"] for m in result["members"]] == [1] * len(members)
