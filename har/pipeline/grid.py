"""The experiment grid of the reproduction pipeline: which runs exist, where they live, what each one trains.

The Snakemake workflow asks this module for every run and path, so the grid logic is plain Python that tests
can call without Snakemake. A pipeline config (`config.yaml`, validated by `workflow/schemas/config.schema.yaml`)
lists datasets (CIFAR with their imbalance ratios, or the list datasets ImageNet-LT and iNaturalist 2018, each with
its own run fields and the tables it serves), methods (each a partial `har` run config, the tables it appears in,
and its t), the t line search (Table I: the paper's on ImageNet-LT, chosen on its validation list; on CIFAR a
stand-in), the exit layouts (Table V) and seeds; `run_config` turns one grid point into a complete run config. A
method runs on a dataset when their tables meet; a decoupled method (cRT, LWS, tau-norm) starts from the run of its
`stage_one` method on the same split and seed. With `pack.size` > 1, `packs` groups CIFAR runs of one shape into
packs, one job each.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from har import published
from har.config import ModelConfig, from_dict, to_dict
from har.engine.membership import pack_refusal, pack_shape
from har.errors import ConfigError
from har.evaluation.selection import VAL, protocol
from har.facts import DATASET_CLASSES, LIST_DATASETS, bare_layout
from har.published import TABLES

NUM_CLASSES = DATASET_CLASSES  # classes of each dataset (har.facts holds the one table)

# n_max / n_min of the published training lists (ImageNet-LT 1280 / 5, iNaturalist 2018 1000 / 2). Fixed by the
# lists, never a run-config field: it only labels a list dataset's split in records and published numbers.
LIST_RATIOS = {"imagenet_lt": 256.0, "inat2018": 500.0}

# The split whose line search chooses the t of every dataset's final runs when `t_search.feed_final` is on, unless
# `t_search.feed_from` says otherwise: the paper searched once, on ImageNet-LT, and reused its t everywhere.
PAPER_T_SPLIT = "imagenet_lt"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    dataset: str
    ratio: float  # CIFAR: the imbalance ratio; list datasets: LIST_RATIOS (not part of the split name)
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


def is_list_dataset(dataset: str) -> bool:
    """ImageNet-LT and iNaturalist 2018: read from published split lists, no bundle, no imbalance ratio to set."""
    return dataset in LIST_DATASETS


def split_name(dataset: str, ratio: float | None = None) -> str:
    """The folder name of a split: `cifar10-r100` for CIFAR, the dataset itself (`imagenet_lt`) for list datasets."""
    return dataset if is_list_dataset(dataset) else f"{dataset}-r{ratio:g}"


def _dataset(cfg: dict, dataset: str) -> dict:
    for entry in cfg["datasets"]:
        if entry["name"] == dataset:
            return entry
    raise ConfigError(f"datasets: {dataset!r} is not a dataset of this config")


def _served(entry: dict) -> tuple[str, ...]:
    """The tables a dataset entry serves (all of them unless it says)."""
    return tuple(entry.get("tables") or TABLES)


def dataset_tables(cfg: dict, dataset: str) -> tuple[str, ...]:
    """The tables a dataset serves (all of them unless its entry says)."""
    return _served(_dataset(cfg, dataset))


def splits(cfg: dict, table: str | None = None) -> list[tuple[str, float]]:
    """Every (dataset, ratio) of the config, or those of the datasets serving `table`; a list dataset's ratio is
    its `LIST_RATIOS` entry (one split per list dataset)."""
    out = []
    for entry in cfg["datasets"]:
        if table is not None and table not in _served(entry):
            continue
        if is_list_dataset(entry["name"]):
            out.append((entry["name"], LIST_RATIOS[entry["name"]]))
        else:
            out += [(entry["name"], float(r)) for r in entry["ratios"]]
    return out


def trainable_methods(cfg: dict) -> list[str]:
    return [name for name, m in cfg["methods"].items() if m.get("trainable", True)]


def untrainable_methods(cfg: dict) -> list[str]:
    return [name for name, m in cfg["methods"].items() if not m.get("trainable", True)]


def searched_methods(cfg: dict) -> list[str]:
    """Trainable methods whose t comes from the line search (on splits that have one)."""
    return [name for name in trainable_methods(cfg) if cfg["methods"][name].get("t_search")]


def decoupled_methods(cfg: dict) -> list[str]:
    """Trainable methods trained as stage two on the runs of their `stage_one` method (cRT, LWS, tau-norm)."""
    return [name for name in trainable_methods(cfg) if cfg["methods"][name].get("stage_one")]


def is_searched_split(cfg: dict, dataset: str) -> bool:
    """Table I's line search runs on the datasets serving Table I."""
    return "I" in dataset_tables(cfg, dataset)


def t_chosen_on(dataset: str) -> str:
    """The evaluation split a line search chooses t on: ImageNet-LT's validation list (the paper's Table I), the test
    split cross-fitted on its halves elsewhere (as s is: `har.evaluation.selection.protocol`)."""
    return "val" if protocol(dataset) == VAL else "test"


def run_resources(cfg: dict, spec: RunSpec, kind: str) -> dict[str, int]:
    """What a run's `kind` job (train, evaluate) asks for: the config's resources, its dataset's on top."""
    own = (_dataset(cfg, spec.dataset).get("resources") or {}).get(kind) or {}
    return {**cfg["resources"][kind], **own}


def layout_datasets(cfg: dict) -> list[str]:
    """Datasets of Table V's layout variants: those the layouts section names, else those serving Table V."""
    layouts = cfg.get("layouts") or {}
    if layouts.get("datasets") is not None:
        return list(layouts["datasets"])
    return [entry["name"] for entry in cfg["datasets"] if "V" in _served(entry)]


def layout_variants(cfg: dict) -> list[str]:
    """Table V's runs: the layout method with each layout, as `<method>@<layout>`."""
    layouts = cfg.get("layouts") or {}
    method = layouts.get("method")
    if not method or method not in trainable_methods(cfg):
        return []
    return [f"{method}@{layout}" for layout in layouts.get("values", [])]


def split_methods(cfg: dict, dataset: str) -> list[str]:
    """The methods with final runs on a dataset's splits, in config order: those whose tables meet the dataset's,
    the stage-one methods these need, and on Table V's datasets the layout method (the reference layout)."""
    tables = set(dataset_tables(cfg, dataset))
    chosen = {m for m in trainable_methods(cfg) if tables & set(cfg["methods"][m].get("tables") or ())}
    chosen |= {cfg["methods"][m]["stage_one"] for m in chosen if cfg["methods"][m].get("stage_one")}
    if layout_variants(cfg) and dataset in layout_datasets(cfg):
        chosen.add(cfg["layouts"]["method"])
    return [m for m in cfg["methods"] if m in chosen]


def idle_methods(cfg: dict) -> list[str]:
    """Trainable methods that run on no dataset (their tables meet no dataset's tables)."""
    used = {m for entry in cfg["datasets"] for m in split_methods(cfg, entry["name"])}
    return [m for m in trainable_methods(cfg) if m not in used]


def final_runs(cfg: dict) -> list[RunSpec]:
    """Every method of each split (and Table V's layout variants on their datasets) with every seed."""
    variants = layout_variants(cfg)
    on_layouts = set(layout_datasets(cfg))
    return [RunSpec(d, r, m, s) for d, r in splits(cfg)
            for m in split_methods(cfg, d) + (variants if d in on_layouts else []) for s in cfg["seeds"]]


def tsearch_runs(cfg: dict) -> list[RunSpec]:
    """Table I's line search: every grid value of t for every searched method of a searched split, on the search
    seeds."""
    search = cfg["t_search"]
    searched = set(searched_methods(cfg))
    return [RunSpec(d, r, m, s, float(t)) for d, r in splits(cfg) if is_searched_split(cfg, d)
            for m in split_methods(cfg, d) if m in searched
            for t in search[cfg["methods"][m]["t_search"]] for s in search["seeds"]]


def feeds_final(cfg: dict) -> bool:
    """Whether the t line search's choice trains the final runs (`t_search.feed_final`; default false: the paper's
    t, 0.9 for HAR(CE) and 2.0 / C for HAR(LDAM), from `t_search.unsearched`, on every dataset)."""
    return bool(cfg["t_search"].get("feed_final", False))


def searched_pairs(cfg: dict) -> set[tuple[str, str]]:
    """(split, method) of every line search: the searched methods that run on a split serving Table I."""
    searched = set(searched_methods(cfg))
    return {(split_name(d, r), m) for d, r in splits(cfg) if is_searched_split(cfg, d)
            for m in split_methods(cfg, d) if m in searched}


def fed_from(cfg: dict, spec: RunSpec) -> str | None:
    """The split whose line search chooses a final run's t when `t_search.feed_final` is on, else None.

    `t_search.feed_from` (default `PAPER_T_SPLIT`, the paper's protocol) names the split whose choice trains the
    method's final runs on every dataset, when the grid searches the method there; otherwise (or with feed_from
    null) each split's own search feeds its final runs, and a split without one keeps `t_search.unsearched`.
    """
    if not feeds_final(cfg) or spec.role != "final" or spec.base_method not in searched_methods(cfg):
        return None
    pairs = searched_pairs(cfg)
    source = cfg["t_search"].get("feed_from", PAPER_T_SPLIT)
    for split in (source, spec.split):
        if split is not None and (split, spec.base_method) in pairs:
            return split
    return None


def needs_selected_t(cfg: dict, spec: RunSpec) -> bool:
    """Final runs whose t a line search chooses (`fed_from`) wait for that choice."""
    return fed_from(cfg, spec) is not None


def stage_one_run(cfg: dict, spec: RunSpec) -> RunSpec | None:
    """The run a decoupled run's stage two starts from: its stage-one method on the same split and seed."""
    first = cfg["methods"][spec.base_method].get("stage_one")
    return RunSpec(spec.dataset, spec.ratio, first, spec.seed) if first else None


def t_value(cfg: dict, method: str, t_point: float, num_classes: int) -> float:
    """The training threshold of a grid value: LDAM grids are in units of 1/C (Table I: 1.7/C .. 2.1/C)."""
    scale = cfg["t_search"].get("per_class_units", {}).get(cfg["methods"][method]["t_search"], False)
    return t_point / num_classes if scale else t_point


def fixed_t(cfg: dict, spec: RunSpec) -> float | None:
    """The t of a final run that no line search feeds: the method's own `t` (`per_class`: in units of 1/C, as the
    paper's 2.0 / C for LDAM, whose confidence is a softmax of raw cosines), else for a searched method the point
    of `t_search.unsearched`; None for methods without HAR's t or whose t comes from the selection."""
    method = cfg["methods"][spec.base_method]
    num_classes = NUM_CLASSES[spec.dataset]
    if method.get("t") is not None:
        own = method["t"]
        return own["value"] / num_classes if own.get("per_class") else own["value"]
    if not method.get("t_search") or needs_selected_t(cfg, spec):
        return None
    kind = method["t_search"]
    point = (cfg["t_search"].get("unsearched") or {}).get(kind)
    if point is None:
        raise ConfigError(f"t_search.unsearched.{kind}: {spec.base_method} runs on {spec.split} with a fixed t (its "
                          f"dataset has no line search, or t_search.feed_final is false); give the t point to use")
    return t_value(cfg, spec.base_method, point, num_classes)


def target_savings(cfg: dict, spec: RunSpec) -> list[float]:
    """The MACs savings at which a run's evaluation chooses s: the run's `eval.target_savings`, then the paper's
    savings for its cell (Tables II, III), fractions, each once."""
    own = [float(x) for x in run_config(cfg, spec)["eval"]["target_savings"]]  # validated there
    paper = []
    if spec.role == "final":
        ratio = None if is_list_dataset(spec.dataset) else spec.ratio
        paper = [float(x) for x in published.target_savings_for(spec.dataset, ratio, spec.base_method)]
    out: list[float] = []
    for x in own + paper:
        if not any(abs(x - y) < 1e-9 for y in out):
            out.append(x)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def _bare_layout(model: str) -> str:
    """The model's layout without intermediate exits (an unknown model name is a config error)."""
    try:
        return bare_layout(model)
    except ValueError as exc:
        raise ConfigError(f"model.name: {exc}") from exc


def _decouple_method(values: dict | None) -> str:
    return ((values or {}).get("decouple") or {}).get("method") or "none"


def check_config(cfg: dict) -> None:
    """What the schema cannot say about a pipeline config, checked before any job starts (ConfigError)."""
    names = [entry["name"] for entry in cfg["datasets"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"datasets: {', '.join(twice)} listed twice; give each dataset one entry")
    for entry in cfg["datasets"]:
        if is_list_dataset(entry["name"]) and "ratios" in entry:
            raise ConfigError(f"datasets: {entry['name']} has no imbalance ratio to choose (its published lists fix "
                              f"it, one split); remove its ratios")
        if _decouple_method(entry.get("run")) != "none":
            raise ConfigError(f"datasets: {entry['name']}: run.decouple.method is a method's field; give the "
                              f"method a stage_one instead")
    if _decouple_method(cfg.get("run_overrides")) != "none":
        raise ConfigError("run_overrides.decouple.method is a method's field; give the method a stage_one instead")
    layouts = cfg.get("layouts") or {}
    for dataset in layouts.get("datasets") or []:
        if dataset not in names:
            raise ConfigError(f"layouts.datasets: {dataset!r} is not a dataset of this config (one of {names})")
    trainable = trainable_methods(cfg)
    for name in trainable:
        method = cfg["methods"][name]
        if method.get("t") is not None:
            if method.get("t_search"):
                raise ConfigError(f"methods.{name}: t and t_search both give its t; a searched method's fixed t is "
                                  f"t_search.unsearched, so remove t")
            if "train_threshold" in ((method.get("run") or {}).get("loss") or {}):
                raise ConfigError(f"methods.{name}: t and run.loss.train_threshold both give its t; keep t")
        first, kind = method.get("stage_one"), _decouple_method(method.get("run"))
        if method.get("exits") is False and ((method.get("run") or {}).get("model") or {}).get("layout"):
            raise ConfigError(f"methods.{name}: exits false and run.model.layout both set the layout; keep one")
        if not first:
            if kind != "none":
                raise ConfigError(f"methods.{name}: run.decouple.method {kind} needs stage_one, the method whose "
                                  f"runs stage two starts from")
            continue
        where = f"methods.{name}.stage_one: {first!r}"
        if first not in cfg["methods"]:
            raise ConfigError(f"{where} is not a method of this config; name the method whose runs stage two "
                              f"starts from (one of {[m for m in trainable if m != name]})")
        if first not in trainable:
            raise ConfigError(f"{where} is not trained (trainable: false); stage two needs its runs")
        if cfg["methods"][first].get("stage_one"):
            raise ConfigError(f"{where} is itself decoupled (stage_one {cfg['methods'][first]['stage_one']!r}); "
                              f"stage two starts from a plain run")
        if kind == "none":
            raise ConfigError(f"methods.{name}: stage_one needs run.decouple.method (crt, lws or tau_norm)")
        for key in ("t_search", "exits"):
            if key in method:
                raise ConfigError(f"methods.{name}: a decoupled method has no {key}: it takes the model of its "
                                  f"stage one ({first}) and trains only the classifier")
        if layouts.get("method") == name:
            raise ConfigError(f"layouts.method: {name} is decoupled: its layout is its stage one's; compare the "
                              f"layouts of {first} instead")


def split_data(cfg: dict, dataset: str, ratio: float) -> dict:
    """The `data` fields of a split's runs: the dataset's run fields, `run_overrides`, the split itself."""
    values = _merge((_dataset(cfg, dataset).get("run") or {}).get("data") or {},
                    (cfg.get("run_overrides") or {}).get("data") or {})
    point: dict[str, Any] = {"dataset": dataset}
    if cfg.get("data_root") is not None:
        point["root"] = cfg["data_root"]
    if not is_list_dataset(dataset):
        point["ratio"] = ratio
    return _merge(values, point)


def _stage_one_model(cfg: dict, first: RunSpec) -> dict:
    """The stage-one run's model fields, its classifier resolved: stage two must rebuild exactly that model."""
    resolved = from_dict(run_config(cfg, first))
    return {**to_dict(resolved)["model"], "classifier": resolved.classifier}


def run_config(cfg: dict, spec: RunSpec, train_threshold: float | None = None) -> dict:
    """The complete, validated `har` run config of one grid point, as plain values.

    Precedence, lowest first: the package defaults, the dataset's `run` fields, (for a decoupled method: its stage
    one's model), the method's `run` fields (and `exits: false`), the layout of a Table V variant, the config's
    `run_overrides` (the quick configuration shortens training there), the grid point itself (dataset, ratio,
    seed, t, the stage-one folder). t: a search run's grid value; a final run fed by the line search, the
    `train_threshold` given; otherwise `fixed_t` (the method's `t`, or `t_search.unsearched`).
    """
    method = cfg["methods"][spec.base_method]
    overrides = cfg.get("run_overrides") or {}
    values = copy.deepcopy(_dataset(cfg, spec.dataset).get("run") or {})
    first = stage_one_run(cfg, spec)
    if first is not None:
        values = _merge(values, {"model": _stage_one_model(cfg, first)})
    values = _merge(values, method.get("run") or {})
    if method.get("exits") is False:
        name = (_merge(values, overrides).get("model") or {}).get("name") or ModelConfig.name
        values = _merge(values, {"model": {"layout": _bare_layout(name)}})
    if spec.layout:
        values = _merge(values, {"model": {"layout": spec.layout}})
    values = _merge(values, overrides)
    values = _merge(values, {"data": split_data(cfg, spec.dataset, spec.ratio), "train": {"seed": spec.seed}})
    if first is not None:
        values = _merge(values, {"decouple": {"stage_one": first.run_dir}})
    if spec.t_point is not None:
        train_threshold = t_value(cfg, spec.base_method, spec.t_point, NUM_CLASSES[spec.dataset])
    elif train_threshold is None:
        train_threshold = fixed_t(cfg, spec)
    if train_threshold is not None:
        values = _merge(values, {"loss": {"train_threshold": train_threshold}})
    pending = train_threshold is None and needs_selected_t(cfg, spec)  # t comes from the selection job
    return to_dict(from_dict(values, t_pending=pending))


def run_tables(cfg: dict, spec: RunSpec) -> list[str]:
    """The tables with a line of the run, in order: a search run Table I's, a layout variant Table V's; a final run
    the tables its method lists that its dataset serves, and Table V on the layout method's datasets (its default
    layout is the reference line there)."""
    if spec.role == "tsearch":
        return ["I"]
    if spec.layout:
        return ["V"]
    served = set(dataset_tables(cfg, spec.dataset))
    tables = {t for t in cfg["methods"][spec.base_method].get("tables") or () if t in served}
    if spec.base_method == (cfg.get("layouts") or {}).get("method") and layout_variants(cfg) \
            and spec.dataset in layout_datasets(cfg):
        tables.add("V")
    return [t for t in TABLES if t in tables]


def describe(cfg: dict, spec: RunSpec) -> dict[str, Any]:
    """A run's record for aggregation: where it is and what it is, as the tables and figures need."""
    display = cfg["methods"][spec.base_method].get("display", spec.base_method)
    if spec.layout:
        display = f"{display} [{spec.layout}]"
    return {"dataset": spec.dataset, "ratio": spec.ratio, "split": spec.split, "method": spec.method,
            "base_method": spec.base_method, "display": display, "tables": run_tables(cfg, spec), "seed": spec.seed,
            "t_point": spec.t_point, "role": spec.role, "run_dir": spec.run_dir}


def benchmark_file(job: str, kind: str) -> str:
    """Where Snakemake writes the benchmark of a job (its wall time, CPU time, memory): `job` is a run folder, or
    `packs/<pack name>` for a pack job; `kind` is train or evaluate. The rules' `benchmark:` and the cost report
    (`har.reporting.cost`) both take it from here."""
    return f"logs/{job}/{kind}.benchmark.tsv"


def pack_size(cfg: dict) -> int:
    """The most runs one pack job trains (`pack.size`; absent: 1, every run its own job as before packs)."""
    return int((cfg.get("pack") or {}).get("size", 1))


def pack_resources(cfg: dict, members: list[RunSpec]) -> dict[str, int]:
    """What a pack job asks for: its dataset's train resources (one GPU at most: packs are only made of such
    runs) with `pack.resources` on top (a pack of K runs takes longer than one)."""
    return {**run_resources(cfg, members[0], "train"), **((cfg.get("pack") or {}).get("resources") or {})}


def _pack_key(cfg: dict, spec: RunSpec) -> str | None:
    """What a run must share with the other members of its pack, as text (None: it trains alone).

    Runs share a pack when they have the same split and role (t search, final), wait on the same selection of t
    (or none) and have the same `har.engine.membership.pack_shape`. Runs `pack_refusal` refuses (decoupled stage two,
    list datasets, Manifold Mixup) and runs whose train job asks for several GPUs (torchrun) train alone.
    """
    pending = needs_selected_t(cfg, spec)
    run_cfg = from_dict(run_config(cfg, spec), t_pending=pending)
    if pack_refusal(run_cfg) is not None or run_resources(cfg, spec, "train")["gpu"] > 1:
        return None
    waits_on = spec.base_method if pending else None
    return json.dumps({"split": spec.split, "role": spec.role, "waits_on": waits_on, "shape": pack_shape(run_cfg)},
                      sort_keys=True)


def packs(cfg: dict) -> dict[str, list[RunSpec]]:
    """Pack name -> its member runs, each pack trained by one job (`har.engine.pack.train_pack`).

    Runs of one `_pack_key` (split, role, the selection of t they wait on, shape), ordered by method, t point and
    seed, are cut into the fewest packs of at most `pack.size` runs, of sizes that differ by one at most (so that
    they finish together). A pack of one would be a single run: such a run, and every run when `pack.size` is 1,
    trains alone (its own `run_train` job). Names, `<split>/<role>-<hash of the key, 8 hex digits>-<index>`,
    depend only on the key and the order, so the same config gives the same packs.
    """
    size = pack_size(cfg)
    if size <= 1:
        return {}
    groups: dict[str, list[RunSpec]] = {}
    for spec in final_runs(cfg) + tsearch_runs(cfg):
        key = _pack_key(cfg, spec)
        if key is not None:
            groups.setdefault(key, []).append(spec)
    out: dict[str, list[RunSpec]] = {}
    for key, specs in sorted(groups.items()):
        specs = sorted(specs, key=lambda s: (s.method, s.t_point or 0.0, s.seed))  # one role: t all None or none
        count = -(-len(specs) // size)  # ceil
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        start = 0
        for index in range(count):
            stop = start + len(specs) // count + (index < len(specs) % count)
            if stop - start > 1:
                out[f"{specs[0].split}/{specs[0].role}-{digest}-{index}"] = specs[start:stop]
            start = stop
    return out
