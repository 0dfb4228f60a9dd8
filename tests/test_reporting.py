"""Tables and figures from real (tiny) run folders laid out as the pipeline grid lays them out."""

import copy
import json
import logging
import math
import re
import shutil
import statistics
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synthetic_data
from matplotlib.backends.backend_agg import FigureCanvasAgg

from har.config import config_hash, from_dict
from har.data.build import write_bundle
from har.engine.trainer import train
from har.errors import ResultError
from har.evaluation.dynamic import READINGS
from har.evaluation.evaluate import evaluate_run
from har.pipeline import grid
from har.published import load_published
from har.reporting import figures
from har.reporting.figures import plot_figures
from har.reporting.report import build_tables
from har.reporting.results import (
    files_digest,
    load_results,
    provenance_text,
    summarise,
    target_column,
    target_label,
)

SPLIT = "cifar10-r100"
PIPELINE = {
    "label": "tiny test",
    "seeds": [0, 1],
    "datasets": [{"name": "cifar10", "ratios": [100]}],
    "run_overrides": {"train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 1, "device": "cpu"},
                      "eval": {"exit_thresholds": [0.0, 0.5, 0.9, 1.01], "target_savings": [0.2]}},
    "methods": {
        "ce_drw": {"display": "CE+DRW", "tables": ["II", "IV"],
                   "run": {"model": {"layout": "CBBBE"}, "loss": {"name": "ce", "reweight": "drw", "har": False}}},
        "har_ce_drw": {"display": "HAR(CE)+DRW", "tables": ["II", "III"], "t_search": "ce",
                       "run": {"loss": {"name": "ce", "reweight": "drw", "har": True}}},
        "mixup": {"display": "Mixup", "tables": ["II"], "trainable": False},
    },
    "t_search": {"seeds": [0], "ce": [0.5, 0.9], "feed_final": True},
    "layouts": {"method": "har_ce_drw", "values": ["CBBEBE"]},
}
SELECTED = {SPLIT: {"har_ce_drw": {"t_point": 0.5, "train_threshold": 0.5}}}


def _train_all(root, specs, data):
    """Train and evaluate each grid run once; a run whose config another already has is a copy of it."""
    trained = {}
    for spec in specs:
        selected = SELECTED[SPLIT][spec.base_method]["train_threshold"] if grid.needs_selected_t(PIPELINE, spec) \
            else None
        cfg = from_dict(grid.run_config(PIPELINE, spec, selected))
        out = root / spec.run_dir
        if config_hash(cfg) in trained:  # the t point that was selected is the final seed-0 run itself
            shutil.copytree(trained[config_hash(cfg)], out)
            continue
        train(cfg, out, data=data)
        evaluate_run(out, device="cpu", data=data)
        trained[config_hash(cfg)] = out
    return cfg.data


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Five trained runs (two methods x two seeds, one layout variant, one t point) and a copied sixth."""
    root = tmp_path_factory.mktemp("reporting")
    data = synthetic_data(counts=(21, 6, 2), per_class_eval=4)  # one training step per run
    specs = [s for s in grid.final_runs(PIPELINE) if s.layout is None or s.seed == 0] + grid.tsearch_runs(PIPELINE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: more threads only wait for each other (10x slower)
    try:
        data_cfg = _train_all(root, specs, data)
    finally:
        torch.set_num_threads(threads)
    bundle = write_bundle(data, data_cfg, root / "results" / "splits" / SPLIT / "data.npz")
    return root, [grid.describe(PIPELINE, s) for s in specs], {SPLIT: bundle}


def test_rows_equal_the_eval_json(results):
    root, records, _ = results
    df = load_results(records, root)
    assert len(df) == len(records) == 7
    for record, (_, row) in zip(records, df.iterrows()):
        run = root / record["run_dir"]
        test = json.loads((run / "eval" / "test.json").read_text())
        val = json.loads((run / "eval" / "val.json").read_text())
        assert {k: row[k] for k in ("method", "seed", "role", "run_dir")} == \
            {k: record[k] for k in ("method", "seed", "role", "run_dir")}
        assert row["top1"] == test["static"]["top1"] and row["val_top1"] == val["static"]["top1"]
        for group in ("many", "medium", "few"):
            value = test["static"]["shot"][group]
            assert math.isnan(row[group]) if value is None else row[group] == value
        assert row["macs"] == test["static"]["macs"]
        best, target = test["dynamic_selected"]["best"], test["dynamic_selected"]["saving>=0.2"]
        assert (row["dyn_s"], row["dyn_top1"], row["dyn_saving"]) == \
            (best["exit_threshold"], best["top1"], best["saving"])
        assert (row[target_column("s", 0.2)], row[target_column("top1", 0.2)], row[target_column("saving", 0.2)]) == \
            (target["exit_threshold"], target["top1"], target["saving"])
        trunk = test["dynamic_selected"]["saving_trunk>=0.2"]
        at = {m: row[target_column(m, 0.2, "saving_trunk")] for m in ("saving_trunk", "top1", "reached")}
        assert at == {"saving_trunk": trunk["saving_trunk"], "top1": trunk["top1"],
                      "reached": float(all(trunk["target"]["reached"]))}
        assert row["har"] == (record["base_method"] == "har_ce_drw")
        assert row["num_exits"] == len(test["flops"]["exits"])
    assert df["many"].isna().all() and df["medium"].notna().all()  # counts (21, 6, 2): no many-shot class


def _break_missing(run):
    (run / "eval" / "test.json").unlink()


def _break_truncated(run):
    path = run / "eval" / "test.json"
    path.write_text(path.read_text()[:200])


def _break_incomplete(run):
    path = run / "eval" / "val.json"
    report = json.loads(path.read_text())
    del report["static"]["top1"]
    path.write_text(json.dumps(report))


def _break_hash(run):  # the folder was trained again with another config after this evaluation
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("epochs: ", "epochs: 1", 1))


@pytest.mark.parametrize("damage, message", [(_break_missing, "has no eval/test.json"),
                                             (_break_truncated, "test.json is unreadable"),
                                             (_break_incomplete, r"incomplete \(missing static.top1\)"),
                                             (_break_hash, "computed for another config")])
def test_bad_results_are_refused_naming_the_run(results, tmp_path, damage, message):
    root, records, _ = results
    record = records[0]
    shutil.copytree(root / record["run_dir"], tmp_path / record["run_dir"])
    damage(tmp_path / record["run_dir"])
    with pytest.raises(ResultError, match=message) as caught:
        load_results([record], tmp_path)
    assert record["run_dir"] in str(caught.value)


def test_summarise_mean_std_and_count(results):
    root, records, _ = results
    df = load_results(records, root)
    summary = summarise(df, ["split", "method", "role"])
    for _, row in summary.iterrows():
        values = [r["top1"] for r in df.to_dict("records")
                  if (r["split"], r["method"], r["role"]) == (row["split"], row["method"], row["role"])]
        assert row["top1_n"] == len(values)
        assert row["top1_mean"] == pytest.approx(statistics.fmean(values))
        if len(values) > 1:
            assert row["top1_std"] == pytest.approx(statistics.stdev(values))
        else:
            assert math.isnan(row["top1_std"])
    assert summary.loc[summary["method"] == "har_ce_drw@CBBEBE", "top1_n"].item() == 1
    assert summary["many_n"].eq(0).all() and summary["many_mean"].isna().all()
    assert summarise(df.iloc[:0], "method").empty
    # each="seed": the values behind every mean, by seed, a missing one left out
    df.loc[(df["seed"] == 1) & (df["method"] == "ce_drw"), "top1"] = float("nan")
    each = summarise(df, ["split", "method", "role"], ["top1", "many"], each="seed")
    assert list(each.columns[-2:]) == ["many_n", "many_each"] and each["many_each"].map(len).eq(0).all()
    for _, row in each.iterrows():
        runs = df[(df["split"] == row["split"]) & (df["method"] == row["method"]) & (df["role"] == row["role"])
                  & df["top1"].notna()].sort_values("seed")
        assert row["top1_each"] == tuple(zip(runs["seed"], runs["top1"])) and len(runs) == row["top1_n"]
    assert any(len(pairs) < n for pairs, n in zip(each["top1_each"], summary["top1_n"]))  # the dropped seed


def _numbers(cells):
    """The leading percentage of each filled cell."""
    return [float(re.match(r"-?[\d.]+", c).group()) for c in cells if c != "-"]


def test_tables_in_three_formats_with_every_row_and_the_paper_columns(results, tmp_path):
    root, records, _ = results
    df = load_results(records, root)
    paths = build_tables(df, PIPELINE, SELECTED, load_published(), tmp_path)
    assert sorted(p.name for p in paths) == sorted([f"table_{t}.{ext}" for t in grid.TABLES
                                                    for ext in ("csv", "md", "tex")] + ["fidelity.md", "fidelity.csv"])
    tables = {t: pd.read_csv(tmp_path / f"table_{t}.csv", comment="#", dtype=str, keep_default_na=False)
              for t in grid.TABLES}
    for t in grid.TABLES:
        for ext in ("csv", "md", "tex"):
            text = (tmp_path / f"table_{t}.{ext}").read_text()
            assert "tiny test (not the paper's setting)" in text
            assert "data given in memory (origin not recorded)" in text  # the runs' data_provenance label
            assert ("over 1 seed;" if t == "I" else "over 2 seeds;") in text
        for column in tables[t].columns:
            if ("top-1" in column or column in ("many", "medium", "few", "all")) and not column.endswith("diff"):
                assert all(0 <= x <= 100 for x in _numbers(tables[t][column])), (t, column)
    assert "\\toprule" in (tmp_path / "table_II.tex").read_text()

    search = tables["I"]
    assert search[["t", "Selected"]].values.tolist() == [["0.5", "yes"], ["0.9", ""]]
    assert "stand-in" in (tmp_path / "table_I.md").read_text()

    two = tables["II"].set_index(["Method", "Mode"])
    assert list(dict.fromkeys(two.index.get_level_values(0))) == ["CE+DRW", "HAR(CE)+DRW", "Mixup ‡"]
    har = df[(df["method"] == "har_ce_drw") & (df["role"] == "final")]
    mean, std = 100 * har["top1"].mean(), 100 * har["top1"].std()
    assert two.loc[("HAR(CE)+DRW", "static"), "top-1"] == f"{mean:.1f} ± {std:.1f}"
    assert two.loc[("HAR(CE)+DRW", "static"), "top-1 paper"] == "-"  # the paper's HAR value is dynamic
    for reading in READINGS:  # evaluated at 0.2 only
        at_paper = two.loc[("HAR(CE)+DRW", f"{target_label(0.32, reading)} §")]
        assert (at_paper["top-1"], at_paper["top-1 paper"], at_paper["MACs saving paper"]) == ("-", "76.8", "32.0")
    dyn = 100 * har["dyn_top1"].mean()
    assert two.loc[("HAR(CE)+DRW", "dynamic, most accurate s"), "top-1"].startswith(f"{dyn:.1f}")
    drw = df[(df["method"] == "ce_drw") & (df["role"] == "final")]
    assert two.loc[("CE+DRW", "static"), "top-1 paper"] == "76.3"
    assert two.loc[("CE+DRW", "static"), "top-1 diff"] == f"{100 * drw['top1'].mean() - 76.3:+.1f}"
    assert ("CE+DRW", "dynamic, most accurate s") not in two.index  # not a HAR method
    assert (two.loc[("Mixup ‡", "static"), ["top-1", "top-1 diff"]] == "-").all()  # not trainable: no runs
    assert two.loc[("Mixup ‡", "static"), "top-1 paper"] == "73.1"
    assert "| HAR(CE)+DRW |" in (tmp_path / "table_II.md").read_text()
    assert "HAR(CE)+DRW &" in (tmp_path / "table_II.tex").read_text()

    assert tables["III"][["Method", "Mode", "many"]].values.tolist()[0] == ["HAR(CE)+DRW", "static", "-"]
    assert set(tables["IV"]["Method"]) == {"CE+DRW"} and "paper" not in " ".join(tables["IV"].columns)
    layouts = tables["V"][tables["V"]["Mode"] == "static"]
    assert layouts["Layout"].tolist() == ["default", "CBBEBE"] and layouts["Exits"].tolist() == ["4", "2"]
    assert layouts["all"].iloc[1].endswith("(n=1)")
    fidelity = pd.read_csv(tmp_path / "fidelity.csv", comment="#", keep_default_na=False)
    assert set(fidelity["method"]) >= {"CE+DRW", "HAR(CE)+DRW"} and "Mixup ‡" not in set(fidelity["method"])
    assert (fidelity["verdict"] == "cannot be judged (quick config, not the paper's setting)").all()


def test_a_table_without_runs_says_so(results, tmp_path):
    root, records, _ = results
    cfg = copy.deepcopy(PIPELINE)
    cfg["methods"]["har_ce_drw"]["tables"] = ["II"]
    build_tables(load_results(records, root), cfg, SELECTED, [], tmp_path)
    assert "no method of this config is listed for Table III" in (tmp_path / "table_III.md").read_text()


def test_every_figure_is_written_as_png_and_pdf(results, tmp_path, caplog):
    root, records, bundles = results
    with caplog.at_level(logging.INFO, logger="har.reporting.figures"):
        paths = plot_figures(records, root, PIPELINE, tmp_path, bundles)
    names = ["fig2_accuracy_flops", "fig3_confidence", "fig4_loss_per_exit", "fig4_exits_by_epoch", "fig6_exits",
             "fig7_exit_examples"]
    assert sorted(p.name for p in paths) == sorted(f"{n}.{ext}" for n in names for ext in ("png", "pdf"))
    for path in paths:
        head = path.read_bytes()[:8]
        assert path.stat().st_size > 1024
        assert head == b"\x89PNG\r\n\x1a\n" if path.suffix == ".png" else head.startswith(b"%PDF")
    assert "fig5_accuracy_flops_large skipped" in caplog.text
    assert np.all([p.parent == tmp_path for p in paths])


def test_fig3_draws_the_methods_of_a_split_on_one_scale(results):
    """HAR against its baseline side by side: bars of the same height mean the same share in both panels."""
    root, records, _ = results
    fig = figures.fig_confidence(load_results(records, root), root, PIPELINE, [SPLIT])
    panels = [ax for ax in fig.axes if ax.has_data()]
    assert len(panels) == 2
    assert panels[0].get_shared_y_axes().joined(*panels)
    tallest = [max(patch.get_height() for patch in ax.patches) for ax in panels]
    assert panels[0].get_ylim() == panels[1].get_ylim() and panels[0].get_ylim()[1] >= max(tallest)


def test_fig7_names_each_images_class_and_a_wrong_exits_prediction(results):
    """Over every thumbnail its true class; a misclassified one in red with what its exit predicted, so the figure
    shows which mistakes each exit makes."""
    root, records, bundles = results
    df = load_results(records, root)
    run = figures._showcase(df, PIPELINE, [SPLIT])
    fig = figures.fig_exit_examples(run, root, PIPELINE, Path(bundles[SPLIT]))
    titles = [ax.title for ax in fig.axes if ax.images]
    colours = [t.get_color() for t in titles]
    assert set(colours) == {"black", "red"}, colours  # the tiny runs get some right and some wrong
    for title in titles:
        wrong = re.fullmatch(r"(\w+) \(as (\w+)\)", title.get_text())
        assert (title.get_color() == "red") == (wrong is not None), title.get_text()
        assert wrong is None or wrong[1] != wrong[2]
    assert "in red where its exit misclassified it" in fig._suptitle.get_text()


def test_fig4_writes_over_each_loss_bar_the_share_of_examples_it_averages(results, tmp_path):
    root, records, _ = results
    copy_root = tmp_path / "runs"
    shutil.copytree(root, copy_root)
    shares = {0: [0.0004, 0.3, 0.2, 0.4996], 1: [0.0, 0.1, 0.4, 0.5]}  # last epoch of HAR(CE)+DRW, seeds 0 and 1
    losses = {0: [1.0, 2.0, 3.0, 4.0], 1: [3.0, 2.0, 5.0, 4.0]}
    for record in records:
        if record["method"] == "har_ce_drw" and record["role"] == "final":
            path = copy_root / record["run_dir"] / "metrics.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            rows[-1].update(exit_fraction=shares[record["seed"]], exit_loss=losses[record["seed"]])
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    fig = figures.fig_loss_per_exit(load_results(records, copy_root), copy_root, PIPELINE, [SPLIT])
    loss_panel, share_panel = fig.axes[:2]
    assert [t.get_text() for t in loss_panel.texts] == ["<0.1%", "20.0%", "30.0%", "50.0%"]  # means over the seeds
    assert [t.get_text() for t in share_panel.texts] == []  # the share panel shows them as bars
    tops = [statistics.mean(pair) + statistics.stdev(pair) for pair in zip(losses[0], losses[1], strict=True)]
    assert [t.xy[1] for t in loss_panel.texts] == pytest.approx(tops)  # over the error bar, not on the bar
    assert loss_panel.get_ylim()[1] > max(tops)


def test_fig2_says_how_many_seeds_each_mean_rests_on(results):
    root, records, _ = results
    fig = figures.fig_accuracy_flops(load_results(records, root), root, PIPELINE, [SPLIT], "Fig. 2")
    assert "mean over 2 seeds" in fig.get_suptitle().replace("\n", " ")
    assert "CE+DRW static" in [t.get_text() for t in fig.legends[0].get_texts()]
    # a set still training: HAR(CE)+DRW's seed 1 not there yet
    partial = [r for r in records if not (r["method"] == "har_ce_drw" and r["seed"] == 1)]
    fig = figures.fig_accuracy_flops(load_results(partial, root), root, PIPELINE, [SPLIT], "Fig. 2")
    assert "mean over seeds" in fig.get_suptitle().replace("\n", " ")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"CE+DRW (2 seeds) static", "HAR(CE)+DRW (1 seed) dynamic"} <= set(labels)
    data = load_results(partial, root)
    loss = figures.fig_loss_per_exit(data, root, PIPELINE, [SPLIT])
    assert "mean ± std over 1 seed" in loss.get_suptitle().replace("\n", " ")  # HAR runs only: all have one
    exits = figures.fig_exits_by_epoch(load_results(records, root), root, PIPELINE, [SPLIT])
    assert [ax.get_title() for ax in exits.axes if ax.get_title()] == [f"HAR(CE)+DRW, {SPLIT}"]
    assert "mean and range over 2 seeds" in exits.get_suptitle().replace("\n", " ")


def test_figures_without_the_bundle_are_refused_before_plotting(results, tmp_path):
    root, records, _ = results
    with pytest.raises(ResultError, match=f"no data bundle for split {SPLIT}"):
        plot_figures(records, root, PIPELINE, tmp_path, {})
    assert not list(tmp_path.iterdir())


def test_each_table_reports_only_the_splits_of_the_datasets_serving_it(results, tmp_path):
    root, records, _ = results
    cfg = copy.deepcopy(PIPELINE)
    cfg["datasets"] = [{"name": "cifar10", "ratios": [100], "tables": ["I", "II", "IV", "V"]},
                       {"name": "imagenet_lt", "tables": ["III"], "run": {"model": {"name": "resnet50"}}}]
    build_tables(load_results(records, root), cfg, SELECTED, [], tmp_path)
    tables = {t: pd.read_csv(tmp_path / f"table_{t}.csv", comment="#", dtype=str, keep_default_na=False)
              for t in grid.TABLES}
    assert not any("imagenet_lt" in column for column in tables["II"].columns)
    assert set(tables["III"]["Split"]) == {"imagenet_lt"}  # no CIFAR rows, and no runs there yet
    assert (tables["III"]["all"] == "-").all()
    assert set(tables["V"]["Split"]) == {SPLIT}


# The label a run on a re-built CIFAR-10 copy records: one unbroken caption line of it made Fig. 2 2856 px wide.
LONG_LABEL = ("CIFAR-10 copy at /work/shared/data/cifar-10-batches-py (md5 differs from the official release: "
              "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch) (quick run: 0.05 of "
              "every training class, 0.1 of val and test)")


def _relabelled(results, tmp_path, ratios):
    """The runs copied under a long data label, their final runs recorded once per CIFAR-10 split of `ratios`."""
    root, records, bundles = results
    copy_root = tmp_path / "runs"
    shutil.copytree(root, copy_root)
    for path in copy_root.rglob("eval/test.json"):
        report = json.loads(path.read_text())
        report["data_provenance"]["label"] = LONG_LABEL
        path.write_text(json.dumps(report))
    cfg = copy.deepcopy(PIPELINE)
    cfg["datasets"] = [{"name": "cifar10", "ratios": ratios}]
    splits = [grid.split_name("cifar10", r) for r in ratios]
    finals = [r for r in records if r["role"] == "final"]
    return copy_root, cfg, [dict(r, split=s) for s in splits for r in finals], {s: bundles[SPLIT] for s in splits}


@pytest.mark.parametrize("ratios", [[100], [100, 50, 20, 10]])
def test_figures_keep_captions_legends_and_panels_readable(results, tmp_path, monkeypatch, ratios):
    root, cfg, records, bundles = _relabelled(results, tmp_path, ratios)
    drawn, save = {}, figures._save

    def keep(fig, out_dir, name):
        drawn[name] = fig
        return save(fig, out_dir, name)

    monkeypatch.setattr(figures, "_save", keep)
    plot_figures(records, root, cfg, tmp_path / "figures", bundles)
    assert len(drawn) == 6
    for name, fig in drawn.items():
        renderer = FigureCanvasAgg(fig).get_renderer()
        box, width = fig.get_tightbbox(renderer), fig.get_figwidth()
        assert -0.05 <= box.x0 and box.x1 <= width + 0.05, name  # no caption, title or legend juts out sideways
        for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
            extent = legend.get_window_extent(renderer)
            assert fig.bbox.x0 <= extent.x0 and extent.x1 <= fig.bbox.x1, name
        caption = next(t.get_text() for t in fig.texts if t.get_text().startswith("Data: "))
        assert "cifar-10-batches-py" in caption and "Trained on: " in caption and "\n" in caption
        if name != "fig7_exit_examples":  # Fig. 7's thumbnails are eight to a row by design
            assert width <= figures.MAX_COLUMNS * 4.6 + 2.5, name
            panels = [ax.get_window_extent(renderer).width / fig.dpi for ax in fig.axes]
            assert min(panels) >= 2.5, name  # inches: at 150 dpi a panel keeps about 400 px or more
            titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
            assert len(titles) == len(set(titles)), (name, titles)  # each panel says what it shows
    pad = matplotlib.rcParams["savefig.pad_inches"]
    for name, fig in drawn.items():  # the saved PNG (150 dpi, cropped tight) is no wider than the figure and its pads
        png_width = int.from_bytes((tmp_path / "figures" / f"{name}.png").read_bytes()[16:20], "big")
        assert png_width <= (fig.get_figwidth() + 2 * pad) * 150 + 2, name


def test_captions_name_the_data_by_its_files_not_by_the_folder_it_was_read_from(results, tmp_path):
    """Runs that read the same copy from two folders (two machines) share one caption part that names neither
    folder; a run on a copy with other files gets a part of its own, told apart by its files' digest; official
    files need no digest."""
    root, records, _ = results
    copy_root = tmp_path / "runs"
    shutil.copytree(root, copy_root)
    reports = sorted(copy_root.rglob("eval/test.json"))
    assert len(reports) >= 3
    files = {"data_batch_1": "a" * 32, "test_batch": "b" * 32}

    def record(path, folder, files, official=False):
        report = json.loads(path.read_text())
        label = ("official CIFAR-10" if official else
                 f"CIFAR-10 copy at {folder} (md5 differs from the official release: data_batch_1, test_batch)")
        report["data_provenance"] = {"dataset": "cifar10", "official": official, "source": folder,
                                     "files": files, "differing": [] if official else list(files), "label": label}
        path.write_text(json.dumps(report))

    for k, path in enumerate(reports):
        record(path, f"/machine{k % 2}/data/cifar-10-batches-py", files)
    same = ("CIFAR-10 copy (md5 differs from the official release: data_batch_1, test_batch), files digest "
            f"{files_digest(files)} (not the official files)")
    assert provenance_text(load_results(records, copy_root)) == same

    other = dict(files, test_batch="c" * 32)
    record(reports[0], "/machine0/data/cifar-10-batches-py", other)
    parts = provenance_text(load_results(records, copy_root)).split("; ")
    assert files_digest(other) != files_digest(files) and sorted(parts) == sorted(
        [same, same.replace(files_digest(files), files_digest(other))])
    assert not any("/machine" in part for part in parts)

    for path in reports:
        record(path, "/machine0/data/cifar-10-batches-py", {"data_batch_1": "d" * 32}, official=True)
    assert provenance_text(load_results(records, copy_root)) == "official CIFAR-10"
