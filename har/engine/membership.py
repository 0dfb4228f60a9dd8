"""Which runs may train together in one pack: the one place for the rules that the pipeline (grouping its runs,
`har.pipeline.grid.packs`) and the pack trainer (`har.engine.pack.train_pack`, refusing a bad pack) both apply.

Members share everything but `MEMBER_FIELDS` (their "shape"); `pack_refusal` names the runs that train alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from har.config import RunConfig, config_diff, to_dict
from har.errors import ConfigError

# Fields in which the members of one pack may differ (a whole section when None); all others make the shape.
MEMBER_FIELDS: dict[str, tuple[str, ...] | None] = {
    "loss": None, "train": ("seed", "mixup", "mixup_alpha"),
    "eval": ("exit_thresholds", "target_savings", "histogram_bins"),
}


def pack_shape(cfg: RunConfig) -> dict[str, Any]:
    """What the members of a pack must share: the config without `MEMBER_FIELDS`, with the resolved classifier
    kind (the exits' layers) and `train.compile` (one way of computing all)."""
    values = to_dict(cfg)
    for section, names in MEMBER_FIELDS.items():
        if names is None:
            values.pop(section)
        else:
            for name in names:
                values[section].pop(name)
    values["model"]["classifier"] = cfg.classifier
    return values


def pack_refusal(cfg: RunConfig) -> str | None:
    """Why a run cannot be a pack member (None when it can): it must train a CIFAR split from scratch with no
    Manifold Mixup (whose mixing layer is drawn per member and step)."""
    if cfg.decouple.method != "none":
        return f"decouple.method {cfg.decouple.method!r}: a decoupled stage two trains alone from its stage one"
    if cfg.data.is_list_dataset:
        return f"data.dataset {cfg.data.dataset!r}: list datasets train alone (one run fills a GPU, or several)"
    if cfg.train.mixup == "manifold":
        return "train.mixup 'manifold': each member would mix at its own layer"
    return None


def check_pack(members: Sequence[tuple[RunConfig, Path]]) -> None:
    """Refuse, naming the member and the field, runs that cannot be trained as one pack."""
    if not members:
        raise ConfigError("a pack needs at least one member")
    outs = [Path(out).resolve() for _, out in members]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"two pack members share a run folder: {sorted({str(o) for o in outs if outs.count(o) > 1})}")
    first = pack_shape(members[0][0])
    for cfg, out in members:
        reason = pack_refusal(cfg)
        if reason is not None:
            raise ConfigError(f"{out} cannot train in a pack: {reason}; train it alone with har train")
        diff = config_diff(first, pack_shape(cfg))
        if diff:
            raise ConfigError(f"{out} has another shape than {members[0][1]} and cannot share its pack (members may "
                              f"differ only in {member_fields()}):\n  " + "\n  ".join(diff))


def member_fields() -> str:
    return ", ".join(s if n is None else ", ".join(f"{s}.{f}" for f in n) for s, n in MEMBER_FIELDS.items())
