"""The paper's Figures 2-7 from the run folders: accuracy against cost, confidence, loss per exit, exits.

Figures are bare `matplotlib.figure.Figure` objects drawn by the Agg canvas: no pyplot state, no display and
nothing left open. Every figure is titled with the config label, captioned under its axes with the data its runs saw
and where they trained, and written as PNG and PDF. Panels sit in rows of at most `MAX_COLUMNS`, legends inside
the figure and titles and captions wrapped to its width, so a paper grid of eight splits stays readable at 100%.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from har.atomic import atomic_write
from har.config import from_dict
from har.data.build import ListSplit, build_data
from har.data.imagelist import ImageListDataset
from har.errors import ResultError
from har.evaluation import selection
from har.evaluation.dynamic import softmax
from har.facts import CIFAR_DATASETS
from har.pipeline import grid
from har.reporting.results import (
    load_results,
    machine_text,
    provenance_text,
    read_eval,
    read_metrics,
    read_outputs,
    read_run_config,
    setting_label,
)

log = logging.getLogger(__name__)

EXAMPLES_PER_EXIT = 8
MAX_COLUMNS = 3  # panels per row: each split keeps a readable panel (about 700 px at 150 dpi) however many there are
# DejaVu Sans (Agg's default) averages about 0.5 em per character on captions like ours; 0.6 leaves room for capitals
CHAR_EM = 0.6
HEADER_IN = 1.0  # room for a two- or three-line suptitle


def _wrap(text: str, width_in: float, size_pt: float) -> str:
    """`text` broken into lines that fit `width_in` inches at `size_pt` points: a long line would otherwise widen the
    saved PNG (bbox_inches="tight") far beyond its panels. Explicit newlines are kept."""
    chars = max(20, math.floor(width_in * 72 / (size_pt * CHAR_EM)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def _title(fig: Figure, text: str) -> None:
    """The figure's suptitle, wrapped to its width."""
    title = fig.suptitle(text)
    title.set_text(_wrap(text, fig.get_figwidth(), title.get_fontsize()))


def _caption(fig: Figure, df: pd.DataFrame) -> None:
    """Provenance under the axes, wrapped to the figure's width: the data the runs saw and where they trained."""
    text = fig.text(0.5, 0.0, "", ha="center", va="top", fontsize="small")
    text.set_text(_wrap(f"Data: {provenance_text(df)}. Trained on: {machine_text(df)}.", fig.get_figwidth(),
                        text.get_fontsize()))


def _panels(n: int, panel: tuple[float, float], legend_in: float = 0.0) -> tuple[Figure, list[Axes]]:
    """A figure of `n` panels of `panel` inches in rows of at most MAX_COLUMNS, with `legend_in` inches on the right
    for a figure legend; cells past `n` in the last row are removed."""
    columns = min(n, MAX_COLUMNS)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(columns * panel[0] + legend_in, rows * panel[1] + HEADER_IN), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    return fig, list(axes[:n])


def _shared_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for all panels, right of them and inside the figure (each panel's own legend is removed)."""
    handles = {}
    for ax in axes:
        handles.update({label: h for h, label in zip(*ax.get_legend_handles_labels())})
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize=7)


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}.{ext}"
        # bbox_inches="tight" keeps the data line under the axes; no creation date in a PDF, so that a figure
        # redrawn from the same results is the same file (the reference figures are tracked by git)
        metadata = {"CreationDate": None} if ext == "pdf" else None
        atomic_write(path, lambda f, ext=ext, metadata=metadata: fig.savefig(f, format=ext, dpi=150,
                                                                             bbox_inches="tight", metadata=metadata))
        paths.append(path)
    return paths


def _finals(df: pd.DataFrame) -> pd.DataFrame:
    """Final runs of the methods themselves (no Table V layout variants)."""
    return df[(df["role"] == "final") & (df["method"] == df["base_method"])]


def _split_order(cfg: dict, df: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, split) of every configured split that has runs, in config order."""
    present = set(df["split"])
    return [(d, grid.split_name(d, r)) for d, r in grid.splits(cfg) if grid.split_name(d, r) in present]


def _method_order(cfg: dict, methods: Sequence[str]) -> list[str]:
    return [m for m in cfg["methods"] if m in set(methods)]


def _in_order(runs: pd.DataFrame, cfg: dict, splits: list[str]) -> pd.DataFrame:
    """Runs split by split in `splits` order, by config method order within a split (records may come in any order)."""
    rank = {key: i for i, key in enumerate(itertools.product(splits, _method_order(cfg, runs["method"])))}
    return runs.iloc[np.argsort([rank[key] for key in zip(runs["split"], runs["method"])], kind="stable")]


def _sweep(runs: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The test sweep over s averaged over seeds: s, relative MACs, top-1."""
    points = [{"s": p["exit_threshold"], "rel_macs": 1 - p["saving"], "top1": p["top1"]}
              for run_dir in runs["run_dir"] for p in read_eval(root / run_dir, "test")["dynamic_sweep"]]
    return pd.DataFrame(points).groupby("s").mean().sort_values("rel_macs")


def fig_accuracy_flops(df: pd.DataFrame, root: Path, cfg: dict, splits: list[str], title: str) -> Figure:
    """Figs. 2 and 5: each HAR method's dynamic curve over s, static points of every method (MACs relative to
    the bare backbone: static mode costs 1)."""
    finals = _finals(df)
    methods = _method_order(cfg, finals["method"])
    colors = dict(zip(methods, sns.color_palette("tab20", len(methods))))
    labels, over = _method_labels(finals[finals["split"].isin(splits)])
    fig, axes = _panels(len(splits), (4.6, 3.8), legend_in=2.4)
    for ax, split in zip(axes, splits, strict=True):
        runs = finals[finals["split"] == split]
        for method in _method_order(cfg, runs["method"]):
            group = runs[runs["method"] == method]
            name, color = labels[(split, method)], colors[method]
            if group["har"].all():
                curve = _sweep(group, root)
                ax.plot(curve["rel_macs"], 100 * curve["top1"], "-o", ms=3, color=color, label=f"{name} dynamic")
                ax.scatter(1 - group["dyn_saving"].mean(), 100 * group["dyn_top1"].mean(), marker="*", s=160,
                           color=color, edgecolor="black", zorder=3, label=f"{name}, most accurate s")
                ax.scatter(1.0, 100 * group["top1"].mean(), marker="o", s=50, facecolor="none", edgecolor=color,
                           zorder=3, label=f"{name} static")
            else:
                ax.scatter(1.0, 100 * group["top1"].mean(), marker="s", s=40, color=color, zorder=3,
                           label=f"{name} static")
        ax.set(title=split, xlabel="MACs relative to the backbone", ylabel="test top-1 (%)")
    _shared_legend(fig, axes)
    _title(fig, f"{title} (mean over {over})\n{setting_label(cfg)}")
    return fig


def _seed_count(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _method_labels(runs: pd.DataFrame) -> tuple[dict[tuple[str, str], str], str]:
    """Each (split, method)'s label in a figure of `runs`, and what its means are over: "N seeds" when every method
    has N; otherwise (a set still training) each label carries its own count, so that a mean resting on fewer seeds
    says so."""
    keys = runs.groupby(["split", "method"])
    seeds, display = keys.size(), keys["display"].first()
    if seeds.nunique() == 1:
        return dict(display), _seed_count(int(seeds.iloc[0]))
    return {key: f"{display[key]} ({_seed_count(n)})" for key, n in seeds.items()}, "seeds"


def _pair(df: pd.DataFrame, cfg: dict) -> list[str]:
    """A HAR method and its non-HAR counterpart (har_x -> x), else any HAR and non-HAR, else the first two."""
    finals = _finals(df)
    present = _method_order(cfg, finals["method"])
    har = [m for m in present if finals.loc[finals["method"] == m, "har"].all()]
    for m in har:
        if m.removeprefix("har_") in present:
            return [m, m.removeprefix("har_")]
    others = [m for m in present if m not in har]
    return [har[0], others[0]] if har and others else present[:2]


def _minority(report: dict) -> tuple[list[int], str, list[int], str]:
    """Minority (medium + few-shot) and majority (many-shot) classes, else the rarer and commoner halves."""
    groups = report["groups"]
    minority, majority = groups["medium"] + groups["few"], groups["many"]
    if minority and majority:
        return minority, "medium + few-shot", majority, "many-shot"
    order = np.argsort(report["class_counts"], kind="stable").tolist()
    half = max(1, len(order) // 2)
    return order[:half], "rarer half of the classes", order[half:], "commoner half"


def _share(values: np.ndarray, keep: np.ndarray) -> str:
    return f"{keep.mean():.0%}" if values.size else "n/a"


def fig_confidence(df: pd.DataFrame, root: Path, cfg: dict, splits: list[str]) -> Figure | None:
    """Fig. 3: the final exit's true-class probability on test, minority against majority classes."""
    finals = _finals(df)
    methods = _pair(df, cfg)
    if not methods:
        return None
    fig = Figure(figsize=(4.6 * len(methods), 3.4 * len(splits) + HEADER_IN), layout="constrained")
    axes = fig.subplots(len(splits), len(methods), squeeze=False, sharey="row")  # a split's methods on one scale
    bins = np.linspace(0, 1, 21)
    for row, split in zip(axes, splits):
        for ax, method in zip(row, methods):
            runs = finals[(finals["split"] == split) & (finals["method"] == method)].sort_values("seed")
            if runs.empty:
                ax.set_axis_off()
                continue
            run = runs.iloc[0]
            logits, labels = read_outputs(root / run["run_dir"], "test")
            true_prob = softmax(logits[-1])[np.arange(len(labels)), labels]
            minority, minority_name, majority, majority_name = _minority(read_eval(root / run["run_dir"], "test"))
            low, high = true_prob[np.isin(labels, minority)], true_prob[np.isin(labels, majority)]
            sns.histplot(x=low, bins=bins, stat="probability", color="tab:red", alpha=0.5, ax=ax,
                         label=f"minority: {minority_name}")
            sns.histplot(x=high, bins=bins, stat="probability", color="tab:blue", alpha=0.5, ax=ax,
                         label=f"majority: {majority_name}")
            ax.text(0.5, 0.97, f"minority with p >= 0.9: {_share(low, low >= 0.9)}\n"
                               f"majority with p <= 0.1: {_share(high, high <= 0.1)}",
                    transform=ax.transAxes, ha="center", va="top", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            ax.set(title=f"{run['display']}, {split}, seed {run['seed']}", xlim=(0, 1),
                   xlabel="true-class probability at the final exit", ylabel="share of test examples")
            ax.legend(fontsize=7, loc="center")
    _title(fig, f"Confidence of minority and majority classes (test)\n{setting_label(cfg)}")
    return fig


def _share_text(percent: float) -> str:
    return "0%" if percent == 0 else "<0.1%" if percent < 0.1 else f"{percent:.1f}%"


def _label_shares(ax: Axes, part: pd.DataFrame, methods: list[str]) -> None:
    """Write over each loss bar of `ax` the mean share of training examples it averages: a bar resting on a few
    examples (an exit almost none leave at) otherwise looks as solid as one resting on a third of them. Seaborn gives
    one bar container per hue level, in `methods` order, and puts exit k's bars around x = k. Each label sits over
    its bar's error bar (mean + std, as the bars draw it), not on the bar, so the two never cross."""
    exits = list(dict.fromkeys(part["exit"]))
    by = part.groupby(["method", "exit"])
    shares, tops = by["fraction"].mean(), (by["loss"].mean() + by["loss"].std().fillna(0)).fillna(0)
    for container, method in zip(ax.containers, methods, strict=True):
        for bar in container:
            key = (method, exits[round(bar.get_x() + bar.get_width() / 2)])
            ax.annotate(_share_text(shares[key]), (bar.get_x() + bar.get_width() / 2, tops[key]), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(top=max(1.1 * tops.max(), ax.get_ylim()[1]))  # room for the highest label


def fig_loss_per_exit(df: pd.DataFrame, root: Path, cfg: dict, splits: list[str]) -> Figure | None:
    """Fig. 4: mean HAR loss at each exit in the last training epoch, and the share of examples exiting there."""
    finals = _finals(df)
    finals = finals[finals["har"] & finals["split"].isin(splits)]
    if finals.empty:
        return None
    splits = [s for s in splits if s in set(finals["split"])]
    labels, over = _method_labels(finals)
    rows = []
    for _, run in finals.iterrows():
        last = read_metrics(root / run["run_dir"])[-1]
        rows += [{"split": run["split"], "method": labels[(run["split"], run["method"])], "exit": f"exit {k + 1}",
                  "loss": np.nan if loss is None else loss, "fraction": 100 * fraction}
                 for k, (loss, fraction) in enumerate(zip(last["exit_loss"], last["exit_fraction"]))]
    long = pd.DataFrame(rows)
    methods = list(dict.fromkeys(long["method"]))
    fig = Figure(figsize=(2 * 4.6 + 1.8, 3.2 * len(splits) + HEADER_IN), layout="constrained")
    axes = fig.subplots(len(splits), 2, squeeze=False)  # a row per split: loss beside share
    for row, split in zip(axes, splits, strict=True):
        part = long[long["split"] == split]
        for ax, metric, label, what in zip(row, ("loss", "fraction"),
                                           ("mean HAR loss", "training examples exiting here (%)"),
                                           ("loss of the examples leaving at each exit", "where examples leave")):
            sns.barplot(data=part, x="exit", y=metric, hue="method", hue_order=methods, errorbar="sd", ax=ax)
            ax.set(title=f"{split}: {what}", xlabel="", ylabel=label)
        _label_shares(row[0], part, methods)
    _shared_legend(fig, axes.ravel())
    _title(fig, f"HAR loss and share of examples per exit\nlast training epoch, mean ± std over {over}; "
                f"over a loss bar, the share of examples in it\n{setting_label(cfg)}")
    return fig


def fig_exits_by_epoch(df: pd.DataFrame, root: Path, cfg: dict, splits: list[str]) -> Figure | None:
    """Beside Fig. 4: the share of training examples leaving at each exit, epoch by epoch, for every HAR method (mean
    and range over seeds). HAR reweights only where examples leave early: if nothing leaves before the last exit, HAR
    trains as plain deep supervision (every exit on every example)."""
    finals = _finals(df)
    finals = finals[finals["har"] & finals["split"].isin(splits)]
    if finals.empty:
        return None
    labels, over = _method_labels(finals)
    rows = []
    for _, run in _in_order(finals, cfg, splits).iterrows():  # a panel per (split, method), split by split
        panel = f"{labels[(run['split'], run['method'])]}, {run['split']}"
        for row in read_metrics(root / run["run_dir"]):
            rows += [{"panel": panel, "epoch": row["epoch"] + 1, "exit": f"exit {k + 1}",
                      "share": 100 * fraction, "seed": run["seed"]}
                     for k, fraction in enumerate(row["exit_fraction"])]
    long = pd.DataFrame(rows)
    panels, exits = list(dict.fromkeys(long["panel"])), sorted(set(long["exit"]), key=lambda e: int(e.split()[1]))
    fig, axes = _panels(len(panels), (4.6, 3.6), legend_in=1.0)
    for ax, panel in zip(axes, panels, strict=True):
        sns.lineplot(data=long[long["panel"] == panel], x="epoch", y="share", hue="exit", hue_order=exits,
                     errorbar=("pi", 100), marker="o" if long["epoch"].nunique() <= 20 else None, ax=ax)
        ax.set(title=panel, ylabel="training examples leaving here (%)", ylim=(-2, 102),
               xlim=(0.5, long["epoch"].max() + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    _shared_legend(fig, axes)
    _title(fig, f"Where training examples leave, epoch by epoch (mean and range over {over})\n"
                f"{setting_label(cfg)}")
    return fig


def _showcase(df: pd.DataFrame, cfg: dict, splits: list[str]) -> pd.Series | None:
    """The HAR run that Figs. 6 and 7 show: har_ldam_drw if present, on the first split, lowest seed."""
    finals = _finals(df)
    har = finals[finals["har"] & finals["split"].isin(splits)]
    if har.empty:
        return None
    methods = _method_order(cfg, har["method"])
    method = "har_ldam_drw" if "har_ldam_drw" in methods else methods[0]
    runs = har[har["method"] == method]
    split = next(s for s in splits if s in set(runs["split"]))
    return runs[runs["split"] == split].sort_values("seed").iloc[0]


def _run_title(run: pd.Series, entry: dict) -> str:
    """Which run a per-run figure shows, with the t it trained with and the s its test images left at."""
    t = run.get("train_threshold")
    t_text = f", t = {t:.3g}" if run.get("har") and t is not None and not pd.isna(t) else ""
    s_a, s_b = entry.get("exit_thresholds") or [entry["exit_threshold"]] * 2
    s_text = f"s = {s_a:.3g}" if s_a == s_b else f"s = {s_a:.3g} / {s_b:.3g} on the two test halves"
    return (f"{run['display']}{t_text}, {run['split']}, seed {run['seed']}, {s_text} "
            f"({entry.get('protocol', 'chosen on val')})")


def fig_exits(run: pd.Series, root: Path, cfg: dict) -> Figure:
    """Fig. 6: each exit's confusion matrix over the test examples leaving there, and their composition."""
    report = read_eval(root / run["run_dir"], "test")
    best = report["dynamic_selected"]["best"]
    per_exit = best["per_exit"]
    if any("confusion" not in e for e in per_exit):
        raise ResultError(f"{root / run['run_dir']}/eval/test.json has no per-exit confusion; evaluate it again")
    num_classes = len(report["class_counts"])
    fig, axes = _panels(len(per_exit) + 1, (3.4, 3.4))
    for k, (ax, entry) in enumerate(zip(axes, per_exit)):
        ticks = num_classes <= 10
        sns.heatmap(np.array(entry["confusion"]), ax=ax, cmap="Blues", cbar=False, square=True,
                    annot=ticks, fmt="d", annot_kws={"fontsize": 6}, xticklabels=ticks, yticklabels=ticks,
                    rasterized=True)
        accuracy = "-" if entry["accuracy"] is None else f"{entry['accuracy']:.0%}"
        ax.set(title=f"exit {k + 1}: {entry['fraction']:.0%} leave, acc {accuracy}", xlabel="predicted",
               ylabel="true" if k % MAX_COLUMNS == 0 else "")
    ax = axes[-1]
    exits = np.arange(1, len(per_exit) + 1)
    bottom = np.zeros(len(per_exit))
    for group, color in zip(("many", "medium", "few"), sns.color_palette("Set2", 3)):
        counts = np.array([sum(e["class_counts"][c] for c in report["groups"][group]) for e in per_exit])
        if counts.any():  # a split without few-shot classes (CIFAR-10-LT) gets no empty legend entry
            ax.bar(exits, counts, bottom=bottom, color=color, label=group)
        bottom += counts
    # headroom above the tallest bar for the legend
    ax.set(xlabel="exit", ylabel="test examples leaving here", xticks=exits, title="composition and accuracy",
           ylim=(0, 1.35 * max(bottom.max(), 1)))
    twin = ax.twinx()
    twin.plot(exits, [np.nan if e["accuracy"] is None else 100 * e["accuracy"] for e in per_exit], "ko-",
              label="accuracy")
    twin.set(ylabel="accuracy (%)", ylim=(0, 105))
    twin.grid(False)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper right")
    _title(fig, f"Exits at inference: {_run_title(run, best)}\n{setting_label(cfg)}")
    return fig


def _test_split(run_dir: Path, bundle: Path | None, labels: np.ndarray) -> tuple[Callable[[int], np.ndarray],
                                                                              list[str]]:
    """The run's test images (one by one, as H x W x 3 uint8) in the order of its eval npz, and the class names.

    CIFAR runs read them from the split's bundle; ImageNet-LT / iNaturalist runs from their list and image
    folder (resized and centre-cropped as for evaluation)."""
    config = from_dict(read_run_config(run_dir))
    if config.data.is_list_dataset:
        data = build_data(config.data)
    else:
        data = build_data(dataclasses.replace(config.data, bundle=str(bundle)))
    if len(data.test) != len(labels) or not np.array_equal(data.test.labels, labels):
        raise ResultError(f"the test split of {run_dir}'s data config does not match its eval/test.npz (labels "
                          f"differ); export the bundle with the run's data config (har export-data) or restore the "
                          f"lists it was evaluated on")
    test = data.test
    if isinstance(test, ListSplit):  # the evaluation's resize and crop, without normalisation
        view = ImageListDataset(test.entries, test.root, train=False, image_size=config.data.image_size,
                                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        return (lambda i: (view[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)), data.classes
    return (lambda i: test.images[i]), data.classes


def fig_exit_examples(run: pd.Series, root: Path, cfg: dict, bundle: Path | None) -> Figure:
    """Fig. 7: the first test images leaving at each exit (title: true class; in red, with the exit's prediction,
    when misclassified)."""
    run_dir = root / run["run_dir"]
    report = read_eval(run_dir, "test")
    best = report["dynamic_selected"]["best"]
    logits, labels = read_outputs(run_dir, "test")
    image, classes = _test_split(run_dir, bundle, labels)
    probs = softmax(logits)
    # each test half leaves at the s chosen on the other, as the evaluation reported it
    halves = selection.stratified_halves(labels, report.get("halves", {}).get("seed", 0))
    pair = best.get("exit_thresholds") or [best["exit_threshold"]] * 2
    where = selection.crossfit_exits(probs.max(axis=2), halves, pair)
    predictions = probs[where, np.arange(len(labels))].argmax(axis=1)
    fig = Figure(figsize=(1.4 * EXAMPLES_PER_EXIT + 1, 1.6 * len(logits) + 1), layout="constrained")
    axes = fig.subplots(len(logits), EXAMPLES_PER_EXIT, squeeze=False)
    for k, row in enumerate(axes):
        leaving = np.flatnonzero(where == k)
        for ax, i in zip(row, leaving[:EXAMPLES_PER_EXIT]):
            ax.imshow(image(i))
            right = predictions[i] == labels[i]
            ax.set_title(classes[labels[i]] if right else f"{classes[labels[i]]} (as {classes[predictions[i]]})",
                         fontsize=8, color="black" if right else "red")
        for ax in row:
            ax.set(xticks=[], yticks=[])
            if not ax.images and ax is not row[0]:
                ax.set_axis_off()
        row[0].set_ylabel(f"exit {k + 1}\n({len(leaving)} leave)", fontsize=9)
    _title(fig, f"Test images by exit: {_run_title(run, best)}\nabove each image its true class; in red where its exit "
                f"misclassified it, with what the exit predicted\n{setting_label(cfg)}")
    return fig


def figure_names(cfg: dict) -> list[str]:
    """The figures `plot_figures` writes for a pipeline config (the workflow declares them as outputs)."""
    datasets = {dataset for dataset, _ in grid.splits(cfg)}
    names = []
    if datasets & set(CIFAR_DATASETS):
        names.append("fig2_accuracy_flops")
    if datasets - set(CIFAR_DATASETS):
        names.append("fig5_accuracy_flops_large")
    finals = grid.final_runs(cfg)
    if finals:
        names.append("fig3_confidence")
    if any(grid.run_config(cfg, spec)["loss"]["har"] for spec in finals):
        names += ["fig4_loss_per_exit", "fig4_exits_by_epoch", "fig6_exits", "fig7_exit_examples"]
    return names


def plot_figures(records: Sequence[dict], root: str | Path, cfg: dict, out_dir: str | Path,
                 bundles: dict[str, str | Path]) -> list[Path]:
    """Write Figs. 2-7 as PNG and PDF into `out_dir`; return their paths (a figure without data is logged and
    skipped). `bundles` maps a CIFAR split to its data bundle, which Fig. 7 reads the test images from (an
    ImageNet-LT / iNaturalist run's images come from its lists)."""
    root, out_dir = Path(root), Path(out_dir)
    df = load_results(records, root)
    ordered = _split_order(cfg, df)
    small = [split for dataset, split in ordered if dataset in CIFAR_DATASETS]
    large = [split for dataset, split in ordered if dataset not in CIFAR_DATASETS]
    paths: list[Path] = []

    def emit(name: str, make: Callable[[], Figure | None], why: str) -> None:
        fig = make()
        if fig is None:
            log.info("%s skipped: %s", name, why)
        else:
            _caption(fig, df)
            paths.extend(_save(fig, out_dir, name))

    splits = small + large
    run = _showcase(df, cfg, large + small)  # the paper shows its exits on ImageNet-LT when it is there
    bundle = None if run is None or run["dataset"] not in CIFAR_DATASETS else bundles.get(run["split"])
    if run is not None and run["dataset"] in CIFAR_DATASETS and bundle is None:  # fail in seconds
        raise ResultError(f"no data bundle for split {run['split']} (Fig. 7 shows its test images); pass "
                          f"bundles={{'{run['split']}': 'results/splits/{run['split']}/data.npz'}}")
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.2):
        emit("fig2_accuracy_flops", lambda: fig_accuracy_flops(df, root, cfg, small, "Accuracy against MACs")
             if small else None, "no CIFAR-LT split in this config")
        emit("fig5_accuracy_flops_large", lambda: fig_accuracy_flops(df, root, cfg, large, "Accuracy against MACs, "
             "large-scale") if large else None, "no ImageNet-LT / iNaturalist split in this config")
        emit("fig3_confidence", lambda: fig_confidence(df, root, cfg, splits), "no final runs")
        emit("fig4_loss_per_exit", lambda: fig_loss_per_exit(df, root, cfg, splits), "no HAR run")
        emit("fig4_exits_by_epoch", lambda: fig_exits_by_epoch(df, root, cfg, splits), "no HAR run")
        emit("fig6_exits", lambda: fig_exits(run, root, cfg) if run is not None else None, "no HAR run")
        emit("fig7_exit_examples", lambda: fig_exit_examples(run, root, cfg,
                                                             None if bundle is None else Path(bundle))
             if run is not None else None, "no HAR run")
    return paths
