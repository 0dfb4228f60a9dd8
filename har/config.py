"""The one place for run defaults (the paper's and LDAM-DRW's values), loading, validation and hashing.

A run is described by a YAML file with the sections below; every field has the default used for the
paper's CIFAR-LT experiments, so a config file only lists what differs. Loading rejects unknown keys,
wrong types and out-of-range values with a message naming the key, the value and what is allowed,
before any data is read or any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from har.errors import ConfigError
from har.facts import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASET_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LIST_DATASETS,
    check_layout,
    confidence_ceiling,
    default_layout,
)

log = logging.getLogger(__name__)

# Seeds: numpy's RandomState takes [0, 2**32); the epoch generators seed torch with seed * 1_000_003 + epoch,
# which must stay below 2**64, and numpy's default_rng refuses negative seeds.
SEED_LIMIT = 2**32
# A float written with an exponent but no dot (1e-3, 5E-4): YAML 1.1 (PyYAML) reads it as a string.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")



@dataclass
class DataConfig:
    """Which long-tailed dataset to build and from where."""

    dataset: Literal["cifar10", "cifar100", "imagenet_lt", "inat2018"] = "cifar10"
    root: str | None = None  # None: the HAR_DATA environment variable, else ./data
    download: bool = True  # CIFAR: download through torchvision when the files are missing
    bundle: str | None = None  # CIFAR: file from `har export-data` read instead of the dataset files (GPU machines)
    ratio: float = 100.0  # CIFAR: imbalance ratio n_max / n_min (>= 1); the list datasets have theirs fixed
    seed: int = 0  # CIFAR: shuffles each class before the first n_i are kept (LDAM-DRW: 0); in [0, 2**32)
    val_per_class: int = 50  # CIFAR: balanced validation images per class, from the images the LT subset leaves out
    lists: str | None = None  # list datasets: folder with the published split lists; None: <root>/splits
    images: str | None = None  # list datasets: folder the listed paths are relative to; None: <root>/<dataset>
    strict_lists: bool = True  # list datasets: refuse a list whose git blob id is not the published one
    image_size: int = 224  # list datasets: training crop and evaluation centre crop
    workers: int = 8  # list datasets: data-loader worker processes per training process
    pin_memory: bool = True  # list datasets: page-locked batches for faster copies to the GPU
    train_fraction: float = 1.0  # < 1 keeps that share of every class (quick CPU runs only)
    eval_fraction: float = 1.0  # < 1 evaluates on that share of every class of val and test (quick runs only)
    mean: tuple[float, float, float] | None = None  # None: LDAM-DRW's CIFAR statistics, or ImageNet's for lists
    std: tuple[float, float, float] | None = None

    @property
    def is_list_dataset(self) -> bool:
        return self.dataset in LIST_DATASETS

    def normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The (mean, std) images are normalised with: the configured values, else the dataset's defaults."""
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.is_list_dataset else (CIFAR_MEAN, CIFAR_STD)
        return tuple(self.mean or mean), tuple(self.std or std)


@dataclass
class ModelConfig:
    """Backbone and exits."""

    name: str = "resnet32"  # a name registered in har.models
    layout: str | None = None  # Table V notation, e.g. CEBEBEBE; None: an exit before each block group
    exit_channels: int | None = None  # kernels of each exit-head convolution; None: the model's (ResNet-32: 64, paper)
    exit_stride: int = 2  # stride of those convolutions (not in the paper; 1 makes heads dearer than the backbone)
    classifier: Literal["auto", "linear", "cosine"] = "auto"  # auto: cosine for LDAM, linear otherwise


@dataclass
class LossConfig:
    """The per-exit loss, its class weights and the HAR wrapper."""

    name: Literal["ce", "focal", "ldam"] = "ce"
    focal_gamma: float = 0.5  # HAR's focal baselines use 0.5
    ldam_max_margin: float = 0.5  # largest LDAM margin (on the rarest class)
    ldam_scale: float = 30.0  # LDAM logit scale s
    reweight: Literal["none", "cb", "drw"] = "none"  # class-balanced weights: never, always, or from drw_epoch
    cb_beta: float = 0.9999  # effective-number beta of the class-balanced weights
    drw_epoch: int = 160  # first epoch (0-based) with weights under DRW; at or past train.epochs warns (never on)
    har: bool = True  # HAR accumulation over exits; False trains every exit on every example
    train_threshold: float = 0.9  # t: an example exits where it is right with true-class probability > t; below
    # the classifier's confidence ceiling (cosine: e / (e + (C - 1) / e), so LDAM uses about 2 / C)


@dataclass
class TrainConfig:
    """Optimisation as in LDAM-DRW (SGD, warm-up, two step decays, 200 epochs); ImageNet-scale runs set theirs."""

    epochs: int = 200  # >= 1
    batch_size: int = 128  # global: split evenly over the processes of a distributed run
    lr: float = 0.1
    lr_batch: int | None = None  # the global batch `lr` is meant for; set, lr is scaled by batch_size / lr_batch
    momentum: float = 0.9
    weight_decay: float = 2e-4
    warmup_epochs: int = 5  # linear warm-up: lr * (epoch + 1) / warmup_epochs
    schedule: Literal["step", "cosine"] = "step"  # step: x lr_decay at each milestone; cosine: to 0 over the epochs
    lr_milestones: tuple[int, ...] = (160, 180)  # epochs at which the lr is multiplied by lr_decay
    lr_decay: float = 0.01
    mixup: Literal["off", "input", "manifold"] = "off"  # Mixup on the images, or Manifold Mixup at a random layer
    mixup_alpha: float = 1.0  # lambda ~ Beta(alpha, alpha)
    seed: int = 0  # model initialisation, data order and augmentation; in [0, 2**32)
    device: str = "auto"  # auto: CUDA when present, else CPU
    deterministic: bool = True  # deterministic algorithms on the CPU (exact resume); GPUs run their fast kernels
    # bf16 autocast (convolutions in bf16; exit classifiers and losses in fp32); None: on for CUDA and for a CPU with
    # native bf16 (AVX512-BF16 or AMX flags), off for other CPUs, where true computes the convolutions in float32 from
    # bf16 operands (the same arithmetic, no faster than fp32); the run records what it resolved to (machine.jsonl)
    amp: bool | None = None
    channels_last: bool | None = None  # channels-last memory format; None: as amp (on with bf16 autocast)
    sync_batchnorm: bool = False  # distributed CUDA runs: batch statistics over all processes
    compile: Literal["off", "default", "reduce-overhead"] = "off"  # torch.compile mode; reduce-overhead: CUDA graphs
    log_every: int = 50  # steps between progress updates when stderr is not a terminal
    # after these epochs (counted from 1; 160 is the last before LDAM-DRW's DRW) the checkpoint is also kept as
    # snapshots/epoch<N>.pt, e.g. to look at or branch from the model where the schedule changes
    keep_epochs: tuple[int, ...] = ()
    # each epoch's metrics.jsonl row records every class's training top-1 (last exit, as train_top1) when the data
    # have at most this many classes (CIFAR's 10 and 100, not ImageNet-LT's 1000 numbers a row); 0: never
    record_per_class_up_to: int = 100
    # how har train-pack computes its members (a single run ignores it): fused, one K-wide network; serial, each
    # member's own step in turn; auto: fused on CUDA, serial on the CPU (measured: docs/benchmarks.md, Packs)
    pack_executor: Literal["auto", "fused", "serial"] = "auto"

    @property
    def scaled_lr(self) -> float:
        """The lr actually used: `lr`, scaled linearly when `lr_batch` names the batch it was tuned for."""
        return self.lr if self.lr_batch is None else self.lr * self.batch_size / self.lr_batch


@dataclass
class DecoupleConfig:
    """Stage two of Kang et al.'s decoupled methods, on a stage-one model of this package (Table III)."""

    method: Literal["none", "crt", "lws", "tau_norm"] = "none"  # none: ordinary (stage-one) training
    stage_one: str | None = None  # the stage-one run folder, whose last.pt is the starting model
    taus: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))  # tau-norm: candidates (val; test halves)


@dataclass
class EvalConfig:
    """Static and dynamic evaluation."""

    batch_size: int = 500
    exit_thresholds: tuple[float, ...] | None = None  # s sweep; None: fine steps over the confidence's range
    # (at least one value must lie below the confidence ceiling; one above it means no early exit)
    target_savings: tuple[float, ...] = (0.25,)  # MACs savings at which s is chosen (har.evaluation.selection)
    histogram_bins: int = 20  # confidence histograms (the paper's Fig. 3)
    # 0-based epoch from which training records static test top-1 (final exit) as metrics.jsonl's test_top1 (the
    # LDAM-DRW protocol keeps the best of these; ours stays the last epoch); None: the first lr milestone on CIFAR,
    # off for the list datasets (a full test pass per epoch there; the protocol is CIFAR's); -1: off
    record_test_from: int | None = None


@dataclass
class RunConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decouple: DecoupleConfig = field(default_factory=DecoupleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def classifier(self) -> str:
        """The exit classifier actually used: cosine for LDAM (as LDAM-DRW's NormedLinear), else linear."""
        if self.model.classifier != "auto":
            return self.model.classifier
        return "cosine" if self.loss.name == "ldam" else "linear"


# Fields that change where or how fast a run goes, not what it computes: left out of the hash.
RUNTIME_FIELDS = {("data", "root"), ("data", "download"), ("data", "bundle"), ("data", "lists"), ("data", "images"),
                  ("data", "strict_lists"), ("data", "workers"), ("data", "pin_memory"), ("train", "device"),
                  ("train", "log_every"), ("train", "keep_epochs"), ("train", "record_per_class_up_to"),
                  ("train", "compile"),
                  ("train", "pack_executor")}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it in the field's own type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        for option in options:
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        real = [o for o in options if o is not type(None)]
        if value is not None and len(real) == 1:  # `X | None`: say what was wrong with it as an X
            _coerce(key, value, real[0])
    elif origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:  # YAML 1.1 reads a bare off as false
            return "on" if value else "off"
        if value is True and "off" in choices:  # a bare `on` in a field whose other choices are modes
            modes = " or ".join(str(c) for c in choices if c != "off")
            raise ConfigError(f"{key}: on is not a mode; choose {modes} (or off)")
        if value in choices:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(typing.get_args(tp))}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}")
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number; give an ordinary number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: {value!r} ({type(value).__name__}) is not a valid {_type_name(tp)}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{dotted}: unknown field{hint}; allowed: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def _check_ranges(cfg: RunConfig, t_pending: bool = False) -> None:
    """Values that have the right type but no meaning."""
    checks: list[tuple[str, Any, bool, str]] = [
        ("data.ratio", cfg.data.ratio, cfg.data.ratio >= 1, ">= 1"),
        ("data.seed", cfg.data.seed, 0 <= cfg.data.seed < SEED_LIMIT, "in [0, 2**32)"),
        ("data.val_per_class", cfg.data.val_per_class, cfg.data.val_per_class >= 0, ">= 0"),
        ("data.train_fraction", cfg.data.train_fraction, 0 < cfg.data.train_fraction <= 1, "in (0, 1]"),
        ("data.eval_fraction", cfg.data.eval_fraction, 0 < cfg.data.eval_fraction <= 1, "in (0, 1]"),
        ("data.std", cfg.data.std, all(s > 0 for s in cfg.data.std or (1,)), "all > 0"),
        ("data.image_size", cfg.data.image_size, cfg.data.image_size >= 8, ">= 8"),
        ("data.workers", cfg.data.workers, cfg.data.workers >= 0, ">= 0"),
        ("model.exit_channels", cfg.model.exit_channels,
         cfg.model.exit_channels is None or cfg.model.exit_channels >= 1, ">= 1 or null"),
        ("model.exit_stride", cfg.model.exit_stride, cfg.model.exit_stride >= 1, ">= 1"),
        ("loss.focal_gamma", cfg.loss.focal_gamma, cfg.loss.focal_gamma >= 0, ">= 0"),
        ("loss.ldam_max_margin", cfg.loss.ldam_max_margin, cfg.loss.ldam_max_margin > 0, "> 0"),
        ("loss.ldam_scale", cfg.loss.ldam_scale, cfg.loss.ldam_scale > 0, "> 0"),
        ("loss.cb_beta", cfg.loss.cb_beta, 0 <= cfg.loss.cb_beta < 1, "in [0, 1)"),
        ("loss.drw_epoch", cfg.loss.drw_epoch, cfg.loss.drw_epoch >= 0, ">= 0"),
        ("loss.train_threshold", cfg.loss.train_threshold, 0 < cfg.loss.train_threshold < 1, "in (0, 1)"),
        ("train.epochs", cfg.train.epochs, cfg.train.epochs >= 1, ">= 1"),
        ("train.seed", cfg.train.seed, 0 <= cfg.train.seed < SEED_LIMIT, "in [0, 2**32)"),
        ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size >= 1, ">= 1"),
        ("train.lr", cfg.train.lr, cfg.train.lr > 0, "> 0"),
        ("train.lr_batch", cfg.train.lr_batch,
         cfg.train.lr_batch is None or cfg.train.lr_batch >= 1, ">= 1 or null"),
        ("train.mixup_alpha", cfg.train.mixup_alpha, cfg.train.mixup_alpha > 0, "> 0"),
        ("train.momentum", cfg.train.momentum, 0 <= cfg.train.momentum < 1, "in [0, 1)"),
        ("train.weight_decay", cfg.train.weight_decay, cfg.train.weight_decay >= 0, ">= 0"),
        ("train.warmup_epochs", cfg.train.warmup_epochs, cfg.train.warmup_epochs >= 0, ">= 0"),
        ("train.lr_milestones", cfg.train.lr_milestones,
         list(cfg.train.lr_milestones) == sorted(cfg.train.lr_milestones)
         and all(m >= 0 for m in cfg.train.lr_milestones), "non-negative and increasing"),
        ("train.lr_decay", cfg.train.lr_decay, cfg.train.lr_decay > 0, "> 0"),
        ("train.keep_epochs", cfg.train.keep_epochs, all(1 <= k <= cfg.train.epochs for k in cfg.train.keep_epochs),
         "epochs counted from 1, each at most train.epochs"),
        ("train.log_every", cfg.train.log_every, cfg.train.log_every >= 1, ">= 1"),
        ("train.record_per_class_up_to", cfg.train.record_per_class_up_to, cfg.train.record_per_class_up_to >= 0,
         ">= 0"),
        ("eval.batch_size", cfg.eval.batch_size, cfg.eval.batch_size >= 1, ">= 1"),
        ("eval.exit_thresholds", cfg.eval.exit_thresholds, cfg.eval.exit_thresholds is None or (
            len(cfg.eval.exit_thresholds) > 0 and all(s >= 0 for s in cfg.eval.exit_thresholds)), "non-empty, >= 0"),
        ("eval.target_savings", cfg.eval.target_savings, all(s < 1 for s in cfg.eval.target_savings), "< 1"),
        ("eval.histogram_bins", cfg.eval.histogram_bins, cfg.eval.histogram_bins >= 1, ">= 1"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {allowed}")
    try:  # the name first, so that what check_layout refuses afterwards is the layout
        default_layout(cfg.model.name)
    except ValueError as exc:
        raise ConfigError(f"model.name: {exc}") from exc
    try:
        check_layout(cfg.model.name, cfg.model.layout)
    except ValueError as exc:
        raise ConfigError(f"model.layout: {exc}") from exc
    if cfg.decouple.method != "none" and not cfg.decouple.stage_one:
        raise ConfigError(f"decouple.stage_one: {cfg.decouple.method} needs the stage-one run folder; set "
                          f"decouple.stage_one to the folder a plain run trained into")
    if cfg.decouple.method != "none" and cfg.train.mixup != "off":
        raise ConfigError("train.mixup: stage two of a decoupled method trains without mixup; set it to off")
    if cfg.decouple.method == "tau_norm" and cfg.classifier != "linear":
        raise ConfigError(f"model.classifier: tau-norm rescales a linear classifier's weight norms, not a "
                          f"{cfg.classifier} one; use a stage one with model.classifier: linear (and loss ce/focal)")
    if cfg.data.bundle and cfg.data.is_list_dataset:
        raise ConfigError(f"data.bundle: {cfg.data.dataset} is read from split lists and images; unset data.bundle")
    if cfg.decouple.method == "tau_norm" and not cfg.decouple.taus:
        raise ConfigError("decouple.taus: tau-norm needs at least one candidate tau")
    if cfg.train.device not in ("auto", "cpu") and not cfg.train.device.startswith("cuda"):
        raise ConfigError(f"train.device: {cfg.train.device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    _check_thresholds(cfg, t_pending)
    _check_path_kinds(cfg.data)
    if cfg.loss.reweight == "drw" and cfg.loss.drw_epoch >= cfg.train.epochs:
        log.warning("loss.drw_epoch %d is not below train.epochs %d: DRW never switches its weights on, so this "
                    "run trains without re-weighting; lower loss.drw_epoch (0-based) to re-weight",
                    cfg.loss.drw_epoch, cfg.train.epochs)


def _check_thresholds(cfg: RunConfig, t_pending: bool) -> None:
    """Thresholds no exit confidence can exceed turn HAR into plain deep supervision, or s into no early exit."""
    num_classes = DATASET_CLASSES[cfg.data.dataset]
    ceiling = confidence_ceiling(num_classes, cfg.classifier)
    bound = (f"a {cfg.classifier} classifier's softmax on {num_classes} classes ({cfg.data.dataset}) never exceeds "
             f"{ceiling:.4g}")
    if cfg.loss.har and not t_pending and cfg.loss.train_threshold >= ceiling:
        raise ConfigError(f"loss.train_threshold: {cfg.loss.train_threshold!r} can never be exceeded: {bound}, so "
                          f"no example would exit early; choose a value below it, e.g. 2.0/C = {2.0 / num_classes:.4g}")
    grid = cfg.eval.exit_thresholds
    if grid is not None and min(grid) >= ceiling:
        raise ConfigError(f"eval.exit_thresholds: none of {list(grid)} can be exceeded: {bound}; put values below it "
                          f"(e.g. from 1/C = {1.0 / num_classes:.4g} up, or 2.0/C = {2.0 / num_classes:.4g}), one "
                          f"value above it means no early exit, or unset it for the default sweep")


def _check_path_kinds(data: DataConfig) -> None:
    """A path that exists but is the wrong kind of thing is named now, before a run folder is written."""
    kinds = [("data.root", data.root, True, "the folder holding the datasets"),
             ("data.bundle", data.bundle, False, "the file `har export-data` wrote"),
             ("data.lists", data.lists, True, "the folder holding the published split lists"),
             ("data.images", data.images, True, "the folder the listed image paths are relative to")]
    for key, value, folder, wanted in kinds:
        if not value:
            continue
        path = Path(value).expanduser()
        if folder and path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: {path} is a file, not a folder; set it to {wanted}")
        if not folder and path.is_dir():
            raise ConfigError(f"{key}: {path} is a folder, not a file; set it to {wanted} (a .npz or .npz.xz)")


def from_dict(values: dict[str, Any] | None, *, t_pending: bool = False) -> RunConfig:
    """Build and validate a run config from nested plain values (as parsed from YAML).

    `t_pending`: `loss.train_threshold` is a placeholder that a later step replaces (the pipeline's final runs
    before the t line search has selected theirs), so it is not checked against the confidence ceiling.
    """
    cfg = _build(RunConfig, values or {}, "")
    _check_ranges(cfg, t_pending)
    return cfg


def set_override(values: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to nested plain values."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected section.key=value, e.g. train.epochs=2")
    dotted, raw = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    if not raw.strip() and _is_section(dotted.strip()):
        raise ConfigError(f"{dotted.strip()}: empty value; name a field, e.g. train.epochs=2 (an empty section "
                          f"would reset all its fields to their defaults)")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _is_section(dotted: str) -> bool:
    """Whether a dotted key names a whole section (a dataclass) of the run config."""
    tp: Any = RunConfig
    for part in dotted.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return False
        tp = hints[part]
    return dataclasses.is_dataclass(tp)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config (None: all defaults), apply `key=value` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; give the path of a YAML run config")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); give a "
                              f"YAML run config, e.g. one of config/runs/*.yaml") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(values).__name__}")
    for assignment in overrides:
        set_override(values, assignment)
    return from_dict(values)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested values (tuples as lists), ready for YAML or JSON."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every field spelled out."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Part of every config hash. Bump it when a default changes what runs compute: the hash leaves out fields at their
# defaults, so that a new field (whose default keeps the old behaviour) leaves existing run folders resumable.
HASH_VERSION = 2  # 2: decoupled stage two and Manifold Mixup as their sources run them


def config_hash(cfg: RunConfig) -> str:
    """sha256 of what decides what a run computes: the fields that differ from their defaults, without those
    that only say where or how fast it runs (`RUNTIME_FIELDS`) or how it is evaluated (`eval`)."""
    values, defaults = to_dict(cfg), to_dict(RunConfig())
    decisive: dict[str, Any] = {"hash_version": HASH_VERSION}
    for section, fields in values.items():
        if section == "eval":
            continue
        changed = {key: value for key, value in fields.items()
                   if (section, key) not in RUNTIME_FIELDS and value != defaults[section][key]}
        if changed:
            decisive[section] = changed
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def stored_config_hash(values: Any) -> str | None:
    """The hash, by this version's rules, of a config stored as plain values (a run folder's config.yaml, a
    checkpoint's config); None when the values are no longer a valid config.

    Comparing this, not a stored sha256, keeps folders written by an older `har` usable when the hashing rules
    change or fields are added (at defaults that keep the old behaviour).
    """
    if not isinstance(values, dict):
        return None
    try:
        return config_hash(from_dict(values))
    except ConfigError:
        return None


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts, as `key: a -> b` lines."""
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            lines += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            lines.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return lines
