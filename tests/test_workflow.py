"""The Snakemake pipeline, driven through its CLI on a temporary copy of the workflow and configs."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, shared_cifar_root, synthetic_data
from snakemake.utils import validate
from snakemake_interface_common.exceptions import WorkflowError

from har.config import from_dict
from har.errors import ConfigError
from har.facts import LIST_DATASETS
from har.pipeline import grid, jobs

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def workdir_copy(tmp_path: Path) -> Path:
    """The workflow, its configs and profiles in a fresh folder: runs write only there."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("workflow", "config", "profiles", "slurm"):
        shutil.copytree(REPO / name, work / name)
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    return work


def snakemake(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SNAKEMAKE, *args], cwd=work, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    table = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}




def paper_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def expected_jobs(cfg: dict) -> dict[str, int]:
    """Jobs per rule of a pipeline config, by the grid's rules written out again (not by calling the grid).

    A CIFAR dataset has one split per ratio, a list dataset one split. A dataset runs the trainable methods whose
    tables meet its tables, the stage-one methods of those, and on Table V's datasets the layout method and its
    layout variants, each with every seed. Datasets serving Table I search t for their searched methods: one run
    per t value and search seed, one selection per (split, method).
    """
    all_tables = {"I", "II", "III", "IV", "V"}
    methods = {name: m for name, m in cfg["methods"].items() if m.get("trainable", True)}
    layouts = cfg.get("layouts") or {}
    layout_datasets = layouts.get("datasets") or [d["name"] for d in cfg["datasets"]
                                                  if "V" in d.get("tables", all_tables)]
    finals = searches = selections = 0
    for entry in cfg["datasets"]:
        count = 1 if entry["name"] in LIST_DATASETS else len(entry["ratios"])
        tables = set(entry.get("tables", all_tables))
        names = {name for name, m in methods.items() if tables & set(m.get("tables", []))}
        names |= {methods[name]["stage_one"] for name in names if "stage_one" in methods[name]}
        variants = 0
        if entry["name"] in layout_datasets and layouts.get("method") in methods:
            names.add(layouts["method"])
            variants = len(layouts["values"])
        finals += count * (len(names) + variants) * len(cfg["seeds"])
        if "I" in tables:
            searched = [methods[name]["t_search"] for name in names if "t_search" in methods[name]]
            searches += count * sum(len(cfg["t_search"][kind]) for kind in searched) * len(cfg["t_search"]["seeds"])
            selections += count * len(searched)
    counts = {"split_build": sum(len(d["ratios"]) for d in cfg["datasets"] if d["name"] not in LIST_DATASETS),
              "split_verify": sum(d["name"] in LIST_DATASETS for d in cfg["datasets"]),
              "run_train": finals + searches, "run_evaluate": finals + searches, "t_select": selections,
              "tables_build": 1, "figures_plot": 1, "all": 1}
    return {rule: n for rule, n in counts.items() if n}


def with_packs(expected: dict[str, int], packs: int, members: int) -> dict[str, int]:
    """`expected_jobs` of a config whose `members` runs train in `packs` pack jobs: their train.json markers come
    from one pack_member job each, the other runs keep their run_train jobs."""
    singles = expected["run_train"] - members
    counts = {**expected, "run_train": singles, "pack_train": packs, "pack_member": members}
    return {rule: n for rule, n in counts.items() if n}


def test_full_paper_config_dry_run_has_every_job(tmp_path):
    work = workdir_copy(tmp_path)
    cfg = paper_config()
    (work / "single.yaml").write_text(yaml.safe_dump({**cfg, "pack": {"size": 1}}))
    proc = snakemake(work, "--configfile", "single.yaml", "-n", "--quiet", "rules")  # every run its own job
    # config.yaml today: CIFAR-10 and CIFAR-100 at ratios 100 / 50 / 10 (tables I, II, IV) are 6 bundled splits;
    # ImageNet-LT (I, III, IV, V) and iNaturalist 2018 (III) 2 verified ones. CIFAR runs the 13 methods of Tables II
    # and IV (8 + 5): 6 splits x 13 x 3 seeds = 234 final runs. ImageNet-LT runs Table III's 9 methods (CE, Focal+DRW,
    # CE+DRW, HAR(CE)+DRW, LDAM+DRW, HAR(LDAM)+DRW, cRT, LWS, tau-norm), Table IV's 6 others (Focal with gamma 0.5,
    # 1 and 2, LDAM, HAR(CE), HAR(LDAM)) and the 5 layouts of Table V: 20 x 3 = 60; iNaturalist 9 x 3 = 27; 321
    # final runs. t search on the 7 splits serving Table I (ImageNet-LT and the CIFAR stand-ins): 7 x 2 searched
    # methods x 5 t x 3 seeds = 210 runs, 7 x 2 = 14 selections. So split_build 6, split_verify 2, run_train =
    # run_evaluate = 531, t_select 14.
    expected = expected_jobs(paper_config())
    assert job_counts(proc.stdout) == expected
    assert (expected["split_build"], expected["split_verify"], expected["run_train"]) == (6, 2, 531)
    assert expected["t_select"] == 14
    assert "har: not trained" not in proc.stderr  # every method of every table is trained
    # config.yaml as it is on a SLURM cluster, packs of 16: the 414 CIFAR runs but Manifold Mixup's 18 train in 7
    # packs per split (test_pipeline_packs.py::test_the_paper_configs_packs), ImageNet-LT and iNaturalist's 117 alone
    proc = snakemake(work, "--profile", "slurm", "-n", "--quiet", "rules")
    assert job_counts(proc.stdout) == with_packs(expected, 6 * 7, 414 - 18)


def test_quick_config_dry_run(tmp_path):
    work = workdir_copy(tmp_path)
    proc = snakemake(work, "--configfile", "config/quick.yaml", "-n", "--quiet", "rules")
    # 15 methods (mixup, manifold mixup and the decoupled three among them) + 1 layout variant, 2 seeds = 32;
    # t search 2 methods x 2 t x 1 seed = 4
    # in packs of 4 but Manifold Mixup's 2 and the 6 decoupled runs: bare linear CE, focal, Mixup, CE+DRW,
    # focal+DRW (10 runs, 3 packs), bare cosine LDAM, LDAM+DRW, exits linear HAR(CE)(+DRW), exits cosine
    # HAR(LDAM)(+DRW) (4 each), the layout variant (2), the t search of each searched method (2 each): 9 packs
    cfg = yaml.safe_load((REPO / "config" / "quick.yaml").read_text())
    assert expected_jobs(cfg)["run_train"] == 36
    assert job_counts(proc.stdout) == with_packs(expected_jobs(cfg), 9, 36 - 8)


def test_decoupled_runs_train_after_their_shared_stage_one_run(tmp_path):
    """cRT, LWS and tau-norm on ImageNet-LT, seed 0: one CE stage-one run, trained first, shared by the three."""
    work = workdir_copy(tmp_path)
    targets = [f"results/runs/imagenet_lt/{m}/seed0/train.json" for m in ("crt", "lws", "tau_norm")]
    proc = snakemake(work, "-n", *targets)  # the job list with each job's input, then the job stats
    assert job_counts(proc.stdout) == {"split_verify": 1, "run_train": 4}
    inputs = {m.group(2): m.group(1).split(", ")
              for m in re.finditer(r"rule run_train:\n\s+input: (.*)\n\s+output: (\S+)", proc.stdout)}
    stage_one, split = "results/runs/imagenet_lt/ce/seed0/train.json", "results/splits/imagenet_lt/split.json"
    assert inputs == {stage_one: [split], **{target: [split, stage_one] for target in targets}}


def test_grid_of_the_paper_config():
    """List datasets: one split named after the dataset, no bundle; a decoupled run's config names its stage-one run
    folder and rebuilds that run's model."""
    cfg = paper_config()
    grid.check_config(cfg)
    runs = grid.final_runs(cfg) + grid.tsearch_runs(cfg)
    listed = [s for s in runs if s.dataset in LIST_DATASETS]
    assert listed and all(s.run_dir.startswith(f"results/{'runs' if s.role == 'final' else 'tsearch'}/{s.dataset}/")
                          for s in listed)
    assert {s.split for s in listed} == {"imagenet_lt", "inat2018"}
    assert "results/runs/imagenet_lt/ce/seed0" in {s.run_dir for s in listed}
    assert {s.split for s in listed if s.role == "tsearch"} == {"imagenet_lt"}  # Table I: ImageNet-LT, not iNat
    assert not any(grid.needs_selected_t(cfg, s) for s in listed)  # feed_final is off: the paper's t
    assert {s.split for s in runs if s.dataset == "cifar10"} == {"cifar10-r100", "cifar10-r50", "cifar10-r10"}
    crt = next(s for s in listed if s.split == "imagenet_lt" and s.method == "crt" and s.seed == 1)
    first = grid.stage_one_run(cfg, crt)
    assert first.run_dir == "results/runs/imagenet_lt/ce/seed1" and first in runs
    two, one = grid.run_config(cfg, crt), grid.run_config(cfg, first)
    assert (two["decouple"]["method"], two["decouple"]["stage_one"]) == ("crt", first.run_dir)
    assert one["decouple"]["method"] == "none" and one["data"]["bundle"] is None
    assert {k: two["model"][k] for k in ("name", "layout")} == {"name": "resnet50", "layout": "CBBBBE"}
    assert {k: one["model"][k] for k in ("name", "layout")} == {"name": "resnet50", "layout": "CBBBBE"}
    assert two["train"]["epochs"] == 10 and one["train"]["epochs"] == 100  # stage two's own schedule
    assert one["train"]["lr_milestones"] == [60, 80] and one["loss"]["drw_epoch"] == 80
    # Table V: ResNet-50 layouts on ImageNet-LT only; HAR on the list datasets takes the unsearched t (LDAM: 2/C)
    variants = {s.method for s in runs if s.layout}
    assert variants == {f"har_ldam_drw@{layout}" for layout in cfg["layouts"]["values"]}
    assert {s.dataset for s in runs if s.layout} == {"imagenet_lt"}
    har = next(s for s in listed if s.dataset == "inat2018" and s.method == "har_ldam_drw")
    assert grid.run_config(cfg, har)["loss"]["train_threshold"] == pytest.approx(2.0 / 8142)
    # CIFAR keeps ResNet-32 and the package's 200-epoch schedule; methods of Table III alone stay off CIFAR
    assert not {"crt", "lws", "tau_norm"} & {s.method for s in runs if s.dataset.startswith("cifar")}
    mixup = next(s for s in runs if s.split == "cifar100-r10" and s.method == "manifold_mixup")
    values = grid.run_config(cfg, mixup)
    assert (values["model"]["name"], values["model"]["layout"], values["train"]["epochs"]) == ("resnet32", "CBBBE", 200)
    assert values["train"]["mixup"] == "manifold"


def test_final_runs_take_the_papers_t_and_the_search_feeds_them_only_when_asked():
    """t = 0.9 for HAR(CE) and 2.0 / C for HAR(LDAM) on every dataset (the paper's Sec. IV-B); the CIFAR search is
    a stand-in for Table I whose choice trains the final runs only with t_search.feed_final."""
    cfg = paper_config()
    finals = [s for s in grid.final_runs(cfg) if s.dataset.startswith("cifar")]
    assert not any(grid.needs_selected_t(cfg, s) for s in finals)
    assert len(cfg["t_search"]["seeds"]) >= 3 and grid.tsearch_runs(cfg)

    def t_of(split, method):
        spec = next(s for s in finals if s.split == split and s.method == method)
        return grid.run_config(cfg, spec)["loss"]["train_threshold"]

    assert t_of("cifar10-r100", "har_ldam_drw") == pytest.approx(0.2)
    assert t_of("cifar100-r50", "har_ldam_drw") == pytest.approx(0.02)
    assert t_of("cifar100-r100", "har_ce_drw") == pytest.approx(0.9)
    # Table IV: the method's own t, in units of 1/C for HAR(LDAM) (0.2 could never be exceeded on CIFAR-100)
    assert t_of("cifar100-r100", "har_ldam") == pytest.approx(0.02)
    assert t_of("cifar10-r10", "har_ldam") == pytest.approx(0.2)
    assert t_of("cifar100-r10", "har_ce") == pytest.approx(0.9)
    cfg["t_search"]["feed_final"] = True
    fed = {s.method for s in finals if grid.needs_selected_t(cfg, s)}
    assert fed == {"har_ce_drw", "har_ldam_drw"}
    spec = next(s for s in finals if s.split == "cifar100-r100" and s.method == "har_ldam_drw")
    assert grid.run_config(cfg, spec, train_threshold=0.018)["loss"]["train_threshold"] == 0.018
    # the paper's protocol: ImageNet-LT's choice trains every dataset's final runs (feed_from defaults to it)
    assert {grid.fed_from(cfg, s) for s in grid.final_runs(cfg) if grid.needs_selected_t(cfg, s)} == {"imagenet_lt"}
    inat = next(s for s in grid.final_runs(cfg) if s.dataset == "inat2018" and s.method == "har_ldam_drw")
    assert grid.fed_from(cfg, inat) == "imagenet_lt" and grid.fixed_t(cfg, inat) is None
    cfg["t_search"]["feed_from"] = None  # each split's own search; iNaturalist has none and keeps the paper's t
    assert grid.fed_from(cfg, spec) == "cifar100-r100" and not grid.needs_selected_t(cfg, inat)
    assert grid.run_config(cfg, inat)["loss"]["train_threshold"] == pytest.approx(2.0 / 8142)


def test_the_paper_grid_trains_every_table_in_the_papers_own_setting():
    """Table III's CE+DRW, Focal+DRW and HAR(CE)+DRW on both list datasets; Table I's search and Table IV's methods on
    ImageNet-LT (ResNet-50), beside their CIFAR stand-ins; Focal+DRW, which Table II lacks, not on CIFAR."""
    cfg = paper_config()
    finals = grid.final_runs(cfg)

    def planned(split, role="final"):
        return {(s.method, s.seed) for s in finals + grid.tsearch_runs(cfg) if s.split == split and s.role == role}

    seeds = set(cfg["seeds"])
    table_iii = {"ce_drw", "focal_drw", "har_ce_drw"}
    table_iv = {"focal", "focal_g1", "focal_g2", "ce", "har_ce", "ldam", "har_ldam"}
    for split in ("imagenet_lt", "inat2018"):
        assert {(m, k) for m in table_iii for k in seeds} <= planned(split)
        rows = [grid.RunSpec(split, grid.LIST_RATIOS[split], m, 0) for m in table_iii]
        assert all(grid.describe(cfg, spec)["tables"] == ["III"] for spec in rows)
    assert {(m, k) for m in table_iv for k in seeds} <= planned("imagenet_lt")
    assert not {m for m, _ in planned("inat2018")} & (table_iv - {"ce"})  # Table IV is ImageNet-LT's
    search = [s for s in grid.tsearch_runs(cfg) if s.split == "imagenet_lt"]
    assert {(s.method, s.t_point, s.seed) for s in search} == {
        (m, float(t), k) for m, kind in (("har_ce_drw", "ce"), ("har_ldam_drw", "ldam"))
        for t in cfg["t_search"][kind] for k in cfg["t_search"]["seeds"]}
    assert all(grid.describe(cfg, s)["tables"] == ["I"] for s in search)
    har = next(s for s in finals if s.split == "imagenet_lt" and s.method == "har_ce" and s.seed == 0)
    assert grid.describe(cfg, har)["tables"] == ["IV"]
    assert (grid.run_config(cfg, har)["model"]["name"], grid.run_config(cfg, har)["train"]["epochs"]) == \
        ("resnet50", 100)
    for split in ("cifar10-r100", "cifar100-r10"):  # the stand-ins stay
        assert {m for m, _ in planned(split)} >= table_iv and planned(split, "tsearch")
        assert "focal_drw" not in {m for m, _ in planned(split)}
    ce = next(s for s in finals if s.split == "cifar10-r100" and s.method == "ce" and s.seed == 0)
    assert grid.describe(cfg, ce)["tables"] == ["II", "IV"]  # CIFAR does not serve Table III


def test_a_grid_without_imagenet_lt_keeps_the_cifar_stand_ins():
    """Without ImageNet-LT, Tables I and IV are planned on CIFAR alone, and with feed_final each CIFAR split's own
    search feeds its final runs (feed_from names a split the grid does not search)."""
    cfg = paper_config()
    cfg["datasets"] = [d for d in cfg["datasets"] if d["name"] != "imagenet_lt"]
    cfg["layouts"].pop("datasets")
    runs = grid.final_runs(cfg) + grid.tsearch_runs(cfg)
    assert {s.split for s in runs if s.role == "tsearch"} == {grid.split_name(d, r) for d, r in grid.splits(cfg, "I")}
    assert {s.split for s in runs if s.method == "har_ldam"} == {s for s in {r.split for r in runs} if "cifar" in s}
    cfg["t_search"]["feed_final"] = True
    fed = {s.split: grid.fed_from(cfg, s) for s in runs if grid.needs_selected_t(cfg, s)}
    assert fed and all(split == source for split, source in fed.items())
    assert not any(s.dataset == "inat2018" for s in runs if grid.needs_selected_t(cfg, s))


def test_imagenet_lts_choice_of_t_feeds_every_dataset_in_its_own_units(tmp_path, monkeypatch):
    """With feed_final, a CIFAR-10 HAR(LDAM)+DRW run takes ImageNet-LT's chosen 1.9/C as 1.9/10, as the paper reused
    2.0/C; HAR(CE)+DRW's t is the point itself."""
    cfg, trained = paper_config(), []
    cfg["t_search"]["feed_final"] = True
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("har.engine.trainer.train", lambda run_cfg, out: trained.append(run_cfg) or [])
    for method, t_point in (("har_ldam_drw", 1.9), ("har_ce_drw", 0.85)):
        selection = tmp_path / f"{method}.json"
        selection.write_text(json.dumps({"split": "imagenet_lt", "method": method, "t_point": t_point,
                                         "train_threshold": grid.t_value(cfg, method, t_point, 1000)}))
        spec = grid.RunSpec("cifar10", 100.0, method, 0)
        assert grid.fed_from(cfg, spec) == "imagenet_lt"
        jobs.train_run(cfg, spec, tmp_path / "data.npz", selection, tmp_path / "train.json")
    assert [run_cfg.loss.train_threshold for run_cfg in trained] == [pytest.approx(0.19), pytest.approx(0.85)]


def test_target_savings_are_the_configs_then_the_papers_for_the_cell(monkeypatch):
    asked = []

    def paper_savings(dataset, ratio, method):
        asked.append((dataset, ratio, method))
        return [0.32] if (dataset, ratio, method) == ("cifar10", 100.0, "har_ce_drw") else [0.25]

    monkeypatch.setattr(grid.published, "target_savings_for", paper_savings)  # grid's import of the paper's values
    cfg = paper_config()
    runs = {s.run_dir: s for s in grid.final_runs(cfg) + grid.tsearch_runs(cfg)}
    default = list(from_dict({}).eval.target_savings)
    assert grid.target_savings(cfg, runs["results/runs/cifar10-r100/har_ce_drw/seed0"]) == [*default, 0.32]
    assert grid.target_savings(cfg, runs["results/runs/cifar10-r50/har_ce_drw/seed1"]) == default  # no repeats
    assert grid.target_savings(cfg, runs["results/runs/imagenet_lt/har_ldam_drw/seed0"]) == default
    assert asked[-1] == ("imagenet_lt", None, "har_ldam_drw")  # a list dataset's cell has no ratio
    search = next(s for s in runs.values() if s.role == "tsearch")
    calls = len(asked)
    assert grid.target_savings(cfg, search) == default and len(asked) == calls  # Table I has no paper saving


def test_t_is_cross_fitted_on_the_test_halves_of_the_search_runs(tmp_path, monkeypatch):
    """Half A prefers t 1.8, half B 2.0: each is scored on the other half; the whole test split picks the fed t."""
    monkeypatch.chdir(tmp_path)
    cfg = paper_config()
    halves = {1.8: ([0.70, 0.60], [0.62, 0.60]), 2.0: ([0.60, 0.60], [0.70, 0.70])}  # (A, B) static top-1 per seed
    runs = []
    for t, (on_a, on_b) in halves.items():
        for seed in (0, 1):
            spec = grid.RunSpec("cifar100", 100.0, "har_ldam_drw", seed, t)
            whole = (on_a[seed] + on_b[seed]) / 2
            report = {"static": {"top1": whole},
                      "halves": {"sizes": [100, 100], "static_top1": [on_a[seed], on_b[seed]]}}
            (tmp_path / spec.run_dir / "eval").mkdir(parents=True)
            (tmp_path / spec.run_dir / "eval" / "test.json").write_text(json.dumps(report))
            runs.append(spec)
    result = jobs.select_t(cfg, "cifar100-r100", "har_ldam_drw", runs, tmp_path / "sel.json")
    assert result["t_points_by_half"] == [1.8, 2.0]
    # B reported at 1.8 (chosen on A): mean 0.61; A reported at 2.0 (chosen on B): 0.60
    assert result["crossfit_top1"] == pytest.approx((0.61 + 0.60) / 2)
    assert result["t_point"] == 2.0 and result["train_threshold"] == pytest.approx(0.02)  # whole: 0.65 vs 0.63
    assert result["chosen_on"] == "test" and json.loads((tmp_path / "sel.json").read_text()) == result


def test_on_imagenet_lt_t_is_chosen_on_the_validation_list(tmp_path, monkeypatch):
    """Table I as the paper ran it: validation top-1 prefers t 0.8, test top-1 0.9; the selection takes 0.8 and
    reports the test top-1 there."""
    monkeypatch.chdir(tmp_path)
    cfg = paper_config()
    top1 = {0.8: {"val": 0.50, "test": 0.40}, 0.9: {"val": 0.45, "test": 0.48}}
    runs = []
    for t, scores in top1.items():
        spec = grid.RunSpec("imagenet_lt", grid.LIST_RATIOS["imagenet_lt"], "har_ce_drw", 0, t)
        (tmp_path / spec.run_dir / "eval").mkdir(parents=True)
        for part, value in scores.items():
            report = {"static": {"top1": value}, "halves": {"sizes": [10, 10], "static_top1": [value, value]}}
            (tmp_path / spec.run_dir / "eval" / f"{part}.json").write_text(json.dumps(report))
        runs.append(spec)
    result = jobs.select_t(cfg, "imagenet_lt", "har_ce_drw", runs, tmp_path / "sel.json")
    assert (result["t_point"], result["chosen_on"], result["protocol"]) == (0.8, "val", "val")
    assert result["test_top1_at_chosen"] == 0.40 and "crossfit_top1" not in result
    assert result["val_top1_by_t_point"] == {"0.8": 0.50, "0.9": 0.45}


def test_imagenet_lts_selection_job_reads_the_validation_reports(tmp_path):
    work = workdir_copy(tmp_path)
    proc = snakemake(work, "-n", "results/selection/imagenet_lt/har_ldam_drw.json")
    inputs = re.search(r"rule t_select:\n\s+input: (.*)\n\s+output: results/selection/imagenet_lt/", proc.stdout)
    reports = inputs.group(1).split(", ")
    assert len(reports) == 2 * 5 * 3  # val and test of 5 t x 3 seeds
    assert {r.rsplit("/", 1)[1] for r in reports} == {"val.json", "test.json"}


def test_list_dataset_jobs_verify_the_lists_and_train_without_a_bundle(tmp_path, monkeypatch):
    """The split job of a list dataset writes only the summary (from build_data, which checks the lists and
    images); its runs get no data.bundle, and a decoupled run's config names its stage-one folder."""
    cfg, asked, trained = paper_config(), [], []
    monkeypatch.setattr(jobs, "build_data", lambda data_cfg: asked.append(data_cfg) or synthetic_data((40, 12, 4)))
    monkeypatch.setattr(jobs, "write_bundle", lambda *args: pytest.fail("a list dataset has no bundle"))
    jobs.build_split(cfg, "imagenet_lt", grid.LIST_RATIOS["imagenet_lt"], None, tmp_path / "split.json")
    summary = json.loads((tmp_path / "split.json").read_text())
    assert (summary["dataset"], summary["ratio"], summary["class_counts"]) == ("imagenet_lt", 10.0, [40, 12, 4])
    assert summary["sizes"] == {"train": 56, "val": 18, "test": 18} and summary["val_counts"] == [6, 6, 6]
    assert [(d.dataset, d.bundle, d.train_fraction) for d in asked] == [("imagenet_lt", None, 1.0)]

    monkeypatch.setattr("har.engine.trainer.train", lambda run_cfg, out: trained.append((run_cfg, out)) or [])
    spec = grid.RunSpec("imagenet_lt", grid.LIST_RATIOS["imagenet_lt"], "lws", 2)
    jobs.train_run(cfg, spec, None, None, tmp_path / "train.json")
    (run_cfg, out), = trained
    assert out == "results/runs/imagenet_lt/lws/seed2" and run_cfg.data.bundle is None
    assert (run_cfg.decouple.method, run_cfg.decouple.stage_one) == ("lws", "results/runs/imagenet_lt/ce/seed2")
    assert json.loads((tmp_path / "train.json").read_text())["run"]["split"] == "imagenet_lt"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["methods"]["crt"].update(stage_one="nope"), "methods.crt.stage_one: 'nope' is not a method"),
    (lambda c: c["methods"]["lws"].update(stage_one="crt"), "methods.lws.stage_one: 'crt' is itself decoupled"),
    (lambda c: c["methods"]["ce"].update(trainable=False), "methods.crt.stage_one: 'ce' is not trained"),
    (lambda c: c["methods"]["crt"].pop("stage_one"), "methods.crt: run.decouple.method crt needs stage_one"),
    (lambda c: c["datasets"][2].update(ratios=[100]), "datasets: imagenet_lt has no imbalance ratio"),
    (lambda c: c["layouts"].update(datasets=["cifar1000"]), "layouts.datasets: 'cifar1000' is not a dataset"),
    (lambda c: c["t_search"].pop("unsearched"), "t_search.unsearched.ce: har_ce_drw runs on cifar10-r100 with a "
                                                "fixed t"),
    (lambda c: c["methods"]["har_ldam_drw"].update(t={"value": 2.0}), "methods.har_ldam_drw: t and t_search both"),
    (lambda c: c["methods"]["har_ce"]["run"]["loss"].update(train_threshold=0.8),
     "methods.har_ce: t and run.loss.train_threshold both give its t"),
])
def test_grid_refuses_inconsistent_configs(edit, message):
    cfg = paper_config()
    edit(cfg)
    with pytest.raises(ConfigError, match=re.escape(message)):
        grid.check_config(cfg)
        for spec in grid.final_runs(cfg):
            grid.run_config(cfg, spec)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["datasets"][0].update(ratios=[0.5]), "0.5 is less than the minimum of 1"),
    (lambda c: c.update(pack={"size": 0}), "0 is less than the minimum of 1"),
])
def test_the_schema_refuses_out_of_range_fields(edit, message):
    """In process: the Snakefile's own schema check; the Snakemake start-up is tested once below."""
    cfg = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    edit(cfg)
    with pytest.raises(WorkflowError, match=re.escape(message)):
        validate(cfg, schema=str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


@pytest.mark.parametrize("edit, message", [  # one each: the schema, check_config, a run's own fields
    (lambda c: c.update(seeds="zero"), "'zero' is not of type 'array'"),
    (lambda c: c["methods"]["ce"]["run"]["loss"].update(name="hinge"),
     "config: method 'ce': loss.name: 'hinge' is not allowed"),
    (lambda c: c["methods"]["tau_norm"].update(stage_one="ce_plain"),
     "config: methods.tau_norm.stage_one: 'ce_plain' is not a method of this config"),
])
def test_bad_config_stops_before_any_job(tmp_path, edit, message):
    work = workdir_copy(tmp_path)
    cfg = yaml.safe_load((work / "config" / "ci.yaml").read_text())
    edit(cfg)
    (work / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--configfile", "bad.yaml", "--cores", "1", check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (work / "results").exists()


@pytest.mark.pipeline
@pytest.mark.skipif(shared_cifar_root() is None, reason="needs the CIFAR-10 copy in ../shared/data or HAR_DATA")
def test_ci_config_runs_end_to_end_and_reruns_only_what_changed(tmp_path, monkeypatch):
    """The whole DAG on tiny runs (about 3 minutes on 2 cores), then an edit of one method's config."""
    monkeypatch.setenv("HAR_DATA", str(shared_cifar_root()))
    work = workdir_copy(tmp_path)
    snakemake(work, "--profile", "profiles/local", "--configfile", "config/ci.yaml", "--cores", "2",
              "--resources", "gpu=2")

    tables = work / "results" / "tables"
    for table in ("I", "II", "III", "IV", "V"):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"table_{table}.{ext}").stat().st_size > 100
    table2 = pd.read_csv(tables / "table_II.csv", comment="#")
    assert list(dict.fromkeys(table2["Method"])) == ["CE", "LDAM+DRW", "HAR(LDAM)+DRW", "Mixup ‡"]
    for cell in table2[table2["Mode"] == "static"]["top-1"].iloc[:3]:
        mean = float(cell.split(" ± ")[0])
        assert 0 <= mean <= 100
    assert "CI run (tiny, not the paper's setting)" in (tables / "table_II.md").read_text()
    assert "cannot be judged" in (tables / "fidelity.md").read_text()
    cost = pd.read_csv(tables / "cost.csv", comment="#").set_index("Table")
    assert cost.loc["whole grid", "Jobs measured"] == "22 of 22"  # 6 pack jobs, tau-norm's 2 runs, 14 evaluations
    assert list(dict.fromkeys(pd.read_csv(tables / "table_IV.csv", comment="#")["Method"])) == ["CE", "HAR(CE)"]
    assert list(pd.read_csv(tables / "table_III.csv", comment="#")["Method"]) == ["CE", "tau-norm"]
    tau = yaml.safe_load((work / "results/runs/cifar10-r100/tau_norm/seed1/config.yaml").read_text())
    assert tau["decouple"]["stage_one"] == "results/runs/cifar10-r100/ce/seed1"
    table1 = pd.read_csv(tables / "table_I.csv", comment="#")
    assert len(table1) == 2 and (table1["Selected"] == "yes").sum() == 1
    selection = yaml.safe_load((work / "results/selection/cifar10-r100/har_ldam_drw.json").read_text())
    assert selection["t_point"] in (1.8, 2.0) and selection["chosen_on"] == "test"
    assert set(selection["t_points_by_half"]) <= {1.8, 2.0} and 0 <= selection["crossfit_top1"] <= 1
    final = yaml.safe_load((work / "results/runs/cifar10-r100/har_ldam_drw/seed0/config.yaml").read_text())
    assert final["loss"]["train_threshold"] == pytest.approx(selection["train_threshold"])
    for figure in ("fig2_accuracy_flops", "fig3_confidence", "fig4_loss_per_exit", "fig6_exits", "fig7_exit_examples"):
        png = (work / "figures" / f"{figure}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert (work / "figures" / f"{figure}.pdf").read_bytes()[:4] == b"%PDF"

    cfg = yaml.safe_load((work / "config" / "ci.yaml").read_text())
    cfg["methods"]["ce"]["run"]["loss"]["reweight"] = "cb"
    (work / "edited.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--configfile", "edited.yaml", "-n", "--quiet", "rules")
    # ce's two seeds (their pack, then their markers), and tau_norm's two stage-two runs on them
    assert job_counts(proc.stdout) == {"pack_train": 1, "pack_member": 2, "run_train": 2, "run_evaluate": 4,
                                       "tables_build": 1, "figures_plot": 1, "all": 1}
    proc = snakemake(work, "--configfile", "config/ci.yaml", "-n", "--quiet", "rules")
    assert "Nothing to be done" in proc.stdout + proc.stderr
