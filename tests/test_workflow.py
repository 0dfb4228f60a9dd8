"""The Snakemake pipeline, driven through its CLI on a temporary copy of the workflow and configs."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, shared_cifar_root

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def workdir_copy(tmp_path: Path) -> Path:
    """The workflow, its configs and profiles in a fresh folder: runs write only there."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("workflow", "config", "profiles"):
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


def test_full_paper_config_dry_run_has_every_job(tmp_path):
    work = workdir_copy(tmp_path)
    proc = snakemake(work, "-n", "--quiet", "rules")
    # 6 splits; 12 trainable methods + 3 Table V layouts, 3 seeds = 270 final runs; t search: 2 methods x 5 t
    # x 6 splits x 1 seed = 60 runs; one selection per (split, searched method).
    assert job_counts(proc.stdout) == {"split_build": 6, "run_train": 330, "run_evaluate": 330, "t_select": 12,
                                       "tables_build": 1, "figures_plot": 1, "all": 1}
    assert "not trained, the package cannot train them yet" in proc.stderr
    assert "mixup, manifold_mixup, crt, lws, tau_norm" in proc.stderr


def test_quick_config_dry_run(tmp_path):
    work = workdir_copy(tmp_path)
    proc = snakemake(work, "--configfile", "config/quick.yaml", "-n", "--quiet", "rules")
    # 10 trainable methods + 1 layout variant, 2 seeds; t search 2 methods x 2 t x 1 seed
    assert job_counts(proc.stdout) == {"split_build": 1, "run_train": 26, "run_evaluate": 26, "t_select": 2,
                                       "tables_build": 1, "figures_plot": 1, "all": 1}


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(seeds="zero"), "'zero' is not of type 'array'"),
    (lambda c: c["datasets"][0].update(ratios=[0.5]), "0.5 is less than the minimum of 1"),
    (lambda c: c["methods"]["ce"]["run"]["loss"].update(name="hinge"),
     "config: method 'ce': loss.name: 'hinge' is not allowed"),
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
    assert list(table2["Method"]) == ["CE", "LDAM+DRW", "HAR(LDAM)+DRW", "Mixup"]
    for cell in table2.iloc[:3, 1]:
        mean = float(cell.split(" ± ")[0])
        assert 0 <= mean <= 100
    assert "CI run (tiny, not the paper's setting)" in (tables / "table_II.md").read_text()
    assert list(pd.read_csv(tables / "table_IV.csv", comment="#")["Method"]) == ["CE", "HAR(CE)"]
    table1 = pd.read_csv(tables / "table_I.csv", comment="#")
    assert len(table1) == 2 and (table1["Selected"] == "yes").sum() == 1
    selection = yaml.safe_load((work / "results/selection/cifar10-r100/har_ldam_drw.json").read_text())
    assert selection["t_point"] in (1.8, 2.0) and selection["chosen_on"] == "val"
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
    assert job_counts(proc.stdout) == {"run_train": 2, "run_evaluate": 2, "tables_build": 1, "figures_plot": 1,
                                       "all": 1}
    proc = snakemake(work, "--configfile", "config/ci.yaml", "-n", "--quiet", "rules")
    assert "Nothing to be done" in proc.stdout + proc.stderr
