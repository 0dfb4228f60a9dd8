"""Published values in the tables and the fidelity report, from crafted results frames (no training)."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from har.pipeline import grid
from har.reporting import ResultError, build_tables, load_published, paper_savings, target_savings_for
from har.reporting.fidelity import claim_deltas
from har.reporting.published import PAPER_METHODS
from har.reporting.results import RESULT_COLUMNS, TARGET_METRICS, best_epoch_top1, read_outputs, target_column
from har.reporting.tables import make_tables

with open("config.yaml") as f:
    PAPER = yaml.safe_load(f)
EVERY = copy.deepcopy(PAPER)  # every dataset of the paper, each serving the tables the paper gives it
EVERY["datasets"] = [{"name": "cifar10", "ratios": [100, 50, 10], "tables": ["II"]},
                     {"name": "cifar100", "ratios": [100, 50, 10], "tables": ["II"]},
                     {"name": "imagenet_lt", "tables": ["I", "III", "IV", "V"]},
                     {"name": "inat2018", "tables": ["III"]}]
for _method, _tables in {"ce": ["II", "III", "IV"], "ce_drw": ["II", "III"], "focal_drw": ["III"],
                         "har_ce_drw": ["II", "III"]}.items():
    EVERY["methods"][_method]["tables"] = _tables


def crafted(cfg, overrides=None, seed=0):
    """A results frame as `load_results` gives it, one row per grid run, random metrics; `overrides` maps
    (split, method) to {column: [value per seed]}."""
    rng = np.random.default_rng(seed)
    rows = []
    for spec in grid.final_runs(cfg) + grid.tsearch_runs(cfg):
        row = grid.describe(cfg, spec)
        loss = (cfg["methods"][spec.base_method].get("run") or {}).get("loss") or {}
        row.update({c: rng.uniform(0.1, 0.9) for c in RESULT_COLUMNS})
        row.update(har=bool(loss.get("har", True)), train_threshold=0.5, layout=spec.layout, num_exits=4,
                   target=None, data_label="CIFAR-10 copy", data_official=False)
        for saving in target_savings_for(spec.dataset, spec.ratio, spec.base_method):
            row.update({target_column(m, saving): rng.uniform(0.1, 0.9) for m in TARGET_METRICS})
        for column, values in (overrides or {}).get((spec.split, spec.method), {}).items():
            if spec.role == "final":
                row[column] = values[cfg["seeds"].index(spec.seed)]
        rows.append(row)
    return pd.DataFrame(rows)


def _row(table, **labels):
    frame = pd.DataFrame(table.rows, columns=table.columns)
    for column, value in labels.items():
        frame = frame[frame[column] == value]
    assert len(frame) == 1, (table.id, labels)
    return frame.iloc[0]


HEADERS = {"I": {"many": "val many", "medium": "val medium", "few": "val few", "top1": "val top-1"},
           "II": {"top1": "top-1", "saving": "MACs saving"}}
SHOT_HEADERS = {"many": "many", "medium": "medium", "few": "few", "top1": "all", "saving": "MACs saving"}


def test_every_published_value_reaches_its_cell_beside_ours():
    df = crafted(EVERY)
    tables = {t.id: t for t in make_tables(df, EVERY, {}, load_published())}
    values = load_published()
    assert len(values) == 224
    for v in values:
        split = grid.split_name(v.dataset, v.ratio)
        display = EVERY["methods"][v.method.split("@")[0]]["display"] + (" ‡" if v.copied_from else "")
        header = HEADERS.get(v.table, SHOT_HEADERS)[v.metric]
        runs = df[(df["split"] == split) & (df["method"] == v.method) & (df["t_point"].fillna(-1) == (v.t_point or -1))]
        if v.table == "I":
            row = _row(tables["I"], Split=split, Method=display, t=f"{v.t_point:g}/C (0.5)" if "LDAM" in v.label
                       else f"{v.t_point:g}")
            column = f"val_{v.metric}"
        elif v.table == "V":
            row = _row(tables["V"], Split=split, Layout=v.method.partition("@")[2], Mode="static")
            column = v.metric
        elif v.table in ("II", "III") and v.label.startswith("HAR"):  # dynamic mode at the paper's saving
            (saving,) = paper_savings(v.table, v.dataset, v.ratio, v.method)
            row = _row(tables[v.table], Split=split, Method=display,
                       Mode=f"dynamic, s for the paper's {100 * saving:g}% saving")
            column = target_column(v.metric, saving)
        else:
            row = _row(tables[v.table], Split=split, Method=display, Mode="static")
            column = v.metric
        assert row[f"{header} paper"] == f"{v.value:.1f}", v
        assert row[f"{header} diff"] == f"{100 * runs[column].mean() - v.value:+.1f}", v
    assert "stand-in" not in tables["I"].caption  # the search is on ImageNet-LT here
    assert "count the exit heads' cost" in tables["II"].caption


def test_tables_say_which_published_cells_the_grid_trains_and_why_not_the_others():
    """The paper grid trains the runs behind every published value; a narrowed one names each untrained row with the
    first reason that applies, and the rows the paper copied instead of training."""
    published = load_published()
    for table in make_tables(crafted(PAPER), PAPER, {}, published):
        count = sum(v.table == table.id for v in published)
        assert table.notes[-1] == f"Published cells: this grid trains the runs behind {count} of the paper's " \
                                  f"{count} values."
    cfg = copy.deepcopy(PAPER)
    cfg["datasets"] = [d for d in cfg["datasets"] if d["name"] != "inat2018"]
    cfg["methods"]["crt"]["trainable"] = False
    cfg["methods"]["focal_g2"]["tables"] = []
    cfg["t_search"]["ce"] = [0.8, 0.9]
    notes = {t.id: t.notes[-1] for t in make_tables(crafted(cfg), cfg, {}, published)}
    assert notes["III"] == ("Published cells: this grid trains the runs behind 34 of the paper's 76 values. "
                            "Not trained (crt has trainable: false): imagenet_lt: CRT. "
                            "Not trained (inat2018 is not among this config's datasets): inat2018 (all its 9 rows). "
                            "Of these, the paper copied CRT, LWS, tau-norm from Kang et al. (ICLR 2020) instead of "
                            "training them.")
    assert notes["I"] == ("Published cells: this grid trains the runs behind 28 of the paper's 40 values. "
                          "Not trained (t=0.75 is not in t_search.ce): imagenet_lt: HAR(CE)+DRW t=0.75. "
                          "Not trained (t=0.85 is not in t_search.ce): imagenet_lt: HAR(CE)+DRW t=0.85. "
                          "Not trained (t=0.95 is not in t_search.ce): imagenet_lt: HAR(CE)+DRW t=0.95.")
    assert notes["IV"].endswith("Not trained (focal_g2 does not list Table IV): imagenet_lt: Focal(g=2.0).")
    assert notes["II"].startswith("Published cells: this grid trains the runs behind 60 of the paper's 60 values.")


def test_paper_savings_and_the_targets_the_pipeline_evaluates():
    assert paper_savings("II", "cifar10", 100, "har_ce_drw") == [0.32]
    assert paper_savings("II", "cifar10", 100, "ce_drw") == []
    assert target_savings_for("imagenet_lt", grid.LIST_RATIOS["imagenet_lt"], "har_ldam_drw") == [0.05]
    assert target_savings_for("imagenet_lt", None, "har_ce_drw") == [0.21]
    assert set(PAPER_METHODS.values()) <= set(PAPER["methods"])


def test_quick_tables_carry_paper_values_and_mark_copied_rows_and_missing_savings():
    with open("config/quick.yaml") as f:
        quick = yaml.safe_load(f)
    df = crafted(quick).drop(columns=[target_column(m, 0.15) for m in TARGET_METRICS])
    tables = {t.id: t for t in make_tables(df, quick, {}, load_published())}
    two = tables["II"]
    assert _row(two, Method="CE+DRW", Mode="static")["top-1 paper"] == "76.3"
    assert _row(two, Method="Mixup ‡", Mode="static")["top-1 paper"] == "73.1"
    missing = _row(two, Method="HAR(LDAM)+DRW", Mode="dynamic, s for the paper's 15% saving §")
    assert (missing["top-1"], missing["top-1 paper"], missing["top-1 diff"]) == ("-", "78.1", "-")
    assert any("add 0.15 to eval.target_savings" in note for note in two.notes)
    assert "quick run (not the paper's setting)" in two.caption and "CIFAR-10 copy (not the official" in two.caption
    assert "stand-in" in tables["I"].caption and "paper" not in " ".join(tables["I"].columns)


def test_best_epoch_column_from_metrics_rows(tmp_path):
    rows = [{"epoch": 0, "exit_loss": [1.0]}, {"epoch": 1, "test_top1": 0.61}, {"epoch": 2, "test_top1": 0.64},
            {"epoch": 3, "test_top1": 0.62}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert best_epoch_top1(tmp_path) == 0.64
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert best_epoch_top1(tmp_path) is None

    cfg = copy.deepcopy(PAPER)
    cfg["datasets"] = [{"name": "cifar10", "ratios": [100], "tables": ["II"]}]
    df = crafted(cfg, {("cifar10-r100", "ce"): {"best_epoch_top1": [0.70, 0.72, 0.74]}})
    table = make_tables(df, cfg, {}, load_published())[1]
    column = "best epoch (LDAM-DRW protocol, optimistic)"
    assert _row(table, Method="CE", Mode="static")[column] == "72.0 ± 2.0"
    assert _row(table, Method="HAR(CE)+DRW", Mode="dynamic, most accurate s")[column] == "-"
    df["best_epoch_top1"] = float("nan")
    assert column not in make_tables(df, cfg, {}, load_published())[1].columns


def _paper_cifar(label="paper setting"):
    cfg = copy.deepcopy(PAPER)
    cfg["label"] = label
    cfg["datasets"] = [{"name": "cifar10", "ratios": [100], "tables": ["II"]}]
    cfg["methods"] = {m: cfg["methods"][m] for m in ("ce_drw", "har_ce_drw", "ldam_drw", "har_ldam_drw")}
    at32, at15 = target_column("top1", 0.32), target_column("top1", 0.15)
    split = "cifar10-r100"
    overrides = {(split, "ce_drw"): {"top1": [0.760, 0.770, 0.780]},
                 (split, "har_ce_drw"): {at32: [0.770, 0.782, 0.794], "top1": [0.75, 0.75, 0.75]},  # +1.0 .. +1.4
                 (split, "ldam_drw"): {"top1": [0.700, 0.700, 0.700]},
                 (split, "har_ldam_drw"): {at15: [0.705, 0.715, 0.725]}}  # +0.5, +1.5, +2.5
    return cfg, overrides


def test_fidelity_lines_and_claims_judged_against_our_seeds(tmp_path):
    cfg, overrides = _paper_cifar()
    df = crafted(cfg, overrides)
    build_tables(df, cfg, {}, load_published(), tmp_path)
    report = pd.read_csv(tmp_path / "fidelity.csv", comment="#", keep_default_na=False)
    cells = report[report["kind"] == "cell"].set_index(["method", "mode", "metric"])
    assert len(cells) == 6  # four top-1 values and two savings of cifar10-r100
    base = cells.loc[("CE+DRW", "static", "top-1")]
    assert base["paper"] == 76.3 and base["n"] == 3
    assert base["ours_mean"] == pytest.approx(77.0) and base["ours_std"] == pytest.approx(1.0)
    assert base["diff"] == pytest.approx(0.7) and base["verdict"] == "within 2 std"
    ldam = cells.loc[("LDAM+DRW", "static", "top-1")]  # all seeds equal: std 0, diff -7 pt
    assert ldam["verdict"] == "outside 2 std"
    claims = report[report["kind"] == "claim"].set_index("method")
    ce = claims.loc["HAR(CE)+DRW - CE+DRW"]
    assert ce["mode"] == "dynamic, s for the paper's 32% saving"
    assert ce["ours_mean"] == pytest.approx(1.2) and ce["ours_std"] == pytest.approx(0.2)
    assert ce["paper"] == pytest.approx(0.5) and ce["verdict"] == "outside 2 std"  # 0.7 > 2 x 0.2
    assert "static HAR minus baseline: -2.00" in ce["note"]
    ldam_claim = claims.loc["HAR(LDAM)+DRW - LDAM+DRW"]
    assert ldam_claim["ours_mean"] == pytest.approx(1.5) and ldam_claim["paper"] == pytest.approx(1.1)
    assert ldam_claim["verdict"] == "within 2 std"  # 0.4 < 2 x 1.0
    text = (tmp_path / "fidelity.md").read_text()
    assert "**Central claims: HAR minus its baseline**" in text and "| HAR(CE)+DRW - CE+DRW |" in text


def test_quick_or_single_seed_fidelity_cannot_be_judged(tmp_path):
    cfg, overrides = _paper_cifar("quick run (not the paper's setting)")
    build_tables(crafted(cfg, overrides), cfg, {}, load_published(), tmp_path)
    report = pd.read_csv(tmp_path / "fidelity.csv", comment="#", keep_default_na=False)
    assert (report["verdict"] == "cannot be judged (quick config, not the paper's setting)").all()
    assert "no line can judge the reproduction" in (tmp_path / "fidelity.md").read_text()
    cfg, _ = _paper_cifar()
    cfg["seeds"] = [0]
    lines = claim_deltas(crafted(cfg), cfg, load_published())
    assert [line["verdict"] for line in lines] == ["cannot be judged (n < 2)"] * 2


def test_a_bad_published_csv_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "published.csv"
    path.write_text("table,dataset,ratio,method,setting,metric,value\nII,cifar10,100,CE-DRW,,top1,76.3\n")
    with pytest.raises(ResultError, match=r"published.csv line 2: method 'CE-DRW' has no pipeline key"):
        load_published(path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_npz_is_a_result_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "eval" / "test.npz"
    path.parent.mkdir()
    np.savez_compressed(path, logits=np.arange(4000.0).reshape(1, 40, 100), labels=np.arange(40))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ResultError, match=r"test.npz is missing, truncated or corrupt .*evaluate .* again") as caught:
        read_outputs(tmp_path, "test")
    assert str(path) in str(caught.value)
