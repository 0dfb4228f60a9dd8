"""The experiment grid of the reproduction pipeline: which runs exist, where they live, what each one trains.

The Snakemake workflow asks this module for every run and path, so the grid logic is plain Python that tests
can call without Snakemake. A pipeline config (`config.yaml`, validated by `workflow/schemas/config.schema.yaml`)
lists datasets and ratios, methods (each a partial `har` run config), the t line search (Table I), the exit
layouts (Table V) and seeds; `run_config` turns one grid point into a complete run config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from har.config import from_dict, to_dict

# The paper's tables, in order: I t line search, II CIFAR-LT, III ImageNet-LT / iNaturalist, IV no
# re-weighting, V exit layouts.
TABLES = ("I", "II", "III", "IV", "V")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    dataset: str
    ratio: float
    method: str  # a key of the config's methods, or "<method>@<layout>" for a Table V layout variant
    seed: int
    t_point: float | None = None  # a t grid value of the line search (in units of 1/C for LDAM); None: final run

    @property
    def split(self) -> str:
        return split_name(self.dataset, self.ratio)

    @property
    def base_method(self) -> str:
        return self.method.split("@")[0]

    @property
    def layout(self) -> str | None:
        return self.method.split("@")[1] if "@" in self.method else None

    @property
    def role(self) -> str:
        return "final" if self.t_point is None else "tsearch"

    @property
    def run_dir(self) -> str:
        if self.t_point is None:
            return f"results/runs/{self.split}/{self.method}/seed{self.seed}"
        return f"results/tsearch/{self.split}/{self.method}/t{self.t_point:g}/seed{self.seed}"


def split_name(dataset: str, ratio: float) -> str:
    """`cifar10-r100`: the folder name of a long-tailed split."""
    return f"{dataset}-r{ratio:g}"


def splits(cfg: dict) -> list[tuple[str, float]]:
    """Every (dataset, ratio) of the config."""
    return [(d["name"], float(r)) for d in cfg["datasets"] for r in d["ratios"]]


def trainable_methods(cfg: dict) -> list[str]:
    return [name for name, m in cfg["methods"].items() if m.get("trainable", True)]


def untrainable_methods(cfg: dict) -> list[str]:
    return [name for name, m in cfg["methods"].items() if not m.get("trainable", True)]


def searched_methods(cfg: dict) -> list[str]:
    """Trainable methods whose t comes from the line search."""
    return [name for name in trainable_methods(cfg) if cfg["methods"][name].get("t_search")]


def layout_variants(cfg: dict) -> list[str]:
    """Table V's runs: the layout method with each layout, as `<method>@<layout>`."""
    layouts = cfg.get("layouts") or {}
    method = layouts.get("method")
    if not method or method not in trainable_methods(cfg):
        return []
    return [f"{method}@{layout}" for layout in layouts.get("values", [])]


def final_runs(cfg: dict) -> list[RunSpec]:
    """Every method (and layout variant) on every split with every seed."""
    methods = trainable_methods(cfg) + layout_variants(cfg)
    return [RunSpec(d, r, m, s) for d, r in splits(cfg) for m in methods for s in cfg["seeds"]]


def tsearch_runs(cfg: dict) -> list[RunSpec]:
    """Table I's line search: every grid value of t for every searched method, on the search seeds."""
    search = cfg["t_search"]
    return [RunSpec(d, r, m, s, float(t)) for d, r in splits(cfg) for m in searched_methods(cfg)
            for t in search[cfg["methods"][m]["t_search"]] for s in search["seeds"]]


def needs_selected_t(cfg: dict, spec: RunSpec) -> bool:
    """Final runs of searched methods take t from the selection on the validation split."""
    return spec.role == "final" and spec.base_method in searched_methods(cfg)


def t_value(cfg: dict, method: str, t_point: float, num_classes: int) -> float:
    """The training threshold of a grid value: LDAM grids are in units of 1/C (Table I: 1.7/C .. 2.1/C)."""
    scale = cfg["t_search"].get("per_class_units", {}).get(cfg["methods"][method]["t_search"], False)
    return t_point / num_classes if scale else t_point


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def run_config(cfg: dict, spec: RunSpec, train_threshold: float | None = None) -> dict:
    """The complete, validated `har` run config of one grid point, as plain values.

    Precedence, lowest first: the package defaults, the method's `run` fields, the layout of a Table V variant,
    the config's `run_overrides` (the quick configuration shortens training there), the grid point itself.
    """
    method = cfg["methods"][spec.base_method]
    values = _merge(method.get("run", {}), {"model": {"layout": spec.layout}} if spec.layout else {})
    values = _merge(values, cfg.get("run_overrides") or {})
    values = _merge(values, {"data": {"dataset": spec.dataset, "ratio": spec.ratio, "root": cfg.get("data_root")},
                             "train": {"seed": spec.seed}})
    if spec.t_point is not None:
        train_threshold = t_value(cfg, spec.base_method, spec.t_point, NUM_CLASSES[spec.dataset])
    if train_threshold is not None:
        values = _merge(values, {"loss": {"train_threshold": train_threshold}})
    return to_dict(from_dict(values))


def describe(cfg: dict, spec: RunSpec) -> dict[str, Any]:
    """A run's record for aggregation: where it is and what it is, as the tables and figures need."""
    method = cfg["methods"][spec.base_method]
    display = method.get("display", spec.base_method)
    if spec.role == "tsearch":
        tables = ["I"]
    elif spec.layout:
        tables, display = ["V"], f"{display} [{spec.layout}]"
    else:
        tables = list(method.get("tables", []))
    return {"dataset": spec.dataset, "ratio": spec.ratio, "split": spec.split, "method": spec.method,
            "base_method": spec.base_method, "display": display, "tables": tables, "seed": spec.seed,
            "t_point": spec.t_point, "role": spec.role, "run_dir": spec.run_dir}
