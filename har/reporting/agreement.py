"""When a reproduced number agrees with a published one: a rule whose false-alarm rate is stated.

A published cell is one run; ours are n seeds with mean m and sample std s. If the reproduction is faithful, the
paper's run is a draw from the same distribution as ours, spread further by what differs between two labs
(hardware, library versions, the run itself) by a single-run std `sigma_paper`. Then m - paper has std
sqrt(sigma^2 / n + sigma_paper^2), and a cell agrees when

    |m - paper| <= t(1 - level / 2, n - 1) * sqrt(s^2 / n + sigma_paper^2),

which a faithful reproduction fails with probability at most `level` (exactly `level` when sigma_paper is 0, a
t-test; less as sigma_paper grows, since the t quantile exceeds the normal one): `tests/test_agreement.py`
checks it by simulation. A claim (HAR minus its baseline) is a paired difference seed by seed: its t-interval
says whether our gain excludes 0, and the paper's difference, two single runs, agrees when within
t * sqrt(s_d^2 / n + 2 sigma_paper^2) of our mean difference.

sigma_paper defaults to 1 point, the single-run spread reported for LDAM-DRW's CIFAR-LT recipes: two single ERM
runs on CIFAR-10-LT-100 2.8 points apart (kaidic/LDAM-DRW#4; a difference of two runs has std sigma * sqrt(2), so
about 1-2 points), +/- 0.3 over seeds for CE on CIFAR-100-LT (naver-ai/cmo#4), at least 1.5 points across sampled
long-tailed training sets (KaihuaTang/Long-Tailed-Recognition.pytorch#9; neither the paper nor we resample the
set, so an upper bound). Larger test sets (ImageNet-LT, iNaturalist) vary less: 1 point is conservative there,
it raises no more false alarms, it only lets larger differences pass.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import stats

MAX_SEEDS = 10_000  # seeds_to_resolve gives up beyond this


@dataclass(frozen=True)
class Rule:
    """The verdict rule's settings, as the pipeline config's `fidelity` section gives them (percentage points)."""

    sigma_paper: float = 1.0  # single-run std of a published value
    level: float = 0.05  # false-alarm rate under a faithful reproduction
    resolution: float = 1.0  # the difference whose resolution `seeds_to_resolve` counts seeds for

    @classmethod
    def from_config(cls, cfg: dict) -> Rule:
        """From `cfg["fidelity"]`; absent fields keep the defaults (the schema's, which a test holds equal)."""
        given = cfg.get("fidelity") or {}
        return cls(**{f.name: float(given[f.name]) for f in fields(cls) if f.name in given})

    def quantile(self, n: int | np.ndarray) -> float | np.ndarray:
        """t(1 - level / 2, n - 1): the two-sided critical value with n - 1 degrees of freedom."""
        return stats.t.ppf(1 - self.level / 2, np.asarray(n) - 1)

    def cell_tolerance(self, std: float | np.ndarray, n: int | np.ndarray) -> float | np.ndarray:
        """The largest |our mean - paper| that agrees, for our seeds' sample std and count."""
        return self.quantile(n) * np.sqrt(np.square(std) / n + self.sigma_paper ** 2)

    def claim_tolerance(self, std: float | np.ndarray, n: int | np.ndarray) -> float | np.ndarray:
        """The largest |our mean paired difference - the paper's difference| that agrees (the paper's difference
        is two single runs: variance 2 sigma_paper^2)."""
        return self.quantile(n) * np.sqrt(np.square(std) / n + 2 * self.sigma_paper ** 2)

    def interval(self, mean: float, std: float, n: int) -> tuple[float, float]:
        """The t-interval of our mean at 1 - level."""
        half = float(self.quantile(n)) * std / np.sqrt(n)
        return mean - half, mean + half

    def seeds_to_resolve(self, std: float) -> int | None:
        """The fewest seeds (>= 2) whose t-interval of the mean, at the observed std, is at most `resolution` wide
        on each side; None beyond MAX_SEEDS."""
        n = np.arange(2, MAX_SEEDS + 1)
        enough = np.flatnonzero(self.quantile(n) * std / np.sqrt(n) <= self.resolution)
        return int(n[enough[0]]) if len(enough) else None

    def describe(self) -> str:
        """The rule in words, for captions."""
        return (f"a cell agrees when |ours - paper| <= t(1 - {self.level:g}/2, n - 1) * sqrt(s^2/n + "
                f"{self.sigma_paper:g}^2), s our seeds' std and {self.sigma_paper:g} point the paper's single-run "
                f"spread (fidelity.sigma_paper): a faithful reproduction fails a cell with probability at most "
                f"{self.level:g} (fidelity.level)")
