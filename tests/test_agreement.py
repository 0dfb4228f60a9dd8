"""The fidelity verdict's rule: its false-alarm rate under a faithful reproduction, simulated, is at most its stated
level; an unfaithful reproduction is flagged; the schema's defaults are the rule's."""

from dataclasses import fields

import numpy as np
import pytest
import yaml
from conftest import REPO

from har.reporting.agreement import Rule

DRAWS = 2000
SEEDS = (2, 3, 5, 10)
STDS = (0.3, 1.0, 3.0)  # points: our seeds' true spread


def allowed(level: float) -> float:
    """The stated rate plus 3 standard errors of a rate estimated from DRAWS draws."""
    return level + 3 * (level * (1 - level) / DRAWS) ** 0.5


def seeds_and_paper(rng, n, std, offset, paper_spread):
    """DRAWS reproductions of n seeds around 0 + offset, and DRAWS paper values around 0 with the paper's spread."""
    ours = rng.normal(offset, std, size=(DRAWS, n))
    return ours.mean(1), ours.std(1, ddof=1), rng.normal(0.0, paper_spread, size=DRAWS)


@pytest.mark.parametrize("rule", [Rule(), Rule(sigma_paper=0.5, level=0.01), Rule(sigma_paper=0.0)])
@pytest.mark.parametrize("n", SEEDS)
def test_a_faithful_reproduction_fails_a_cell_at_most_at_the_stated_rate(rule, n):
    rng = np.random.default_rng(n)
    for std in STDS:
        mean, s, paper = seeds_and_paper(rng, n, std, 0.0, rule.sigma_paper)
        false_alarms = np.mean(np.abs(mean - paper) > rule.cell_tolerance(s, n))
        assert false_alarms <= allowed(rule.level), (n, std, false_alarms)


@pytest.mark.parametrize("n", SEEDS)
def test_a_faithful_claim_disagrees_or_resolves_a_zero_gain_at_most_at_the_stated_rate(n):
    """Paired differences around the paper's true gain; the paper's difference is two single runs."""
    rule, rng = Rule(), np.random.default_rng(100 + n)
    for std in STDS:
        mean, s, paper = seeds_and_paper(rng, n, std, 0.0, rule.sigma_paper * 2 ** 0.5)
        assert np.mean(np.abs(mean - paper) > rule.claim_tolerance(s, n)) <= allowed(rule.level)
        low, high = rule.interval(mean, s, n)  # the true gain is 0 here
        assert np.mean((low > 0) | (high < 0)) <= allowed(rule.level)


@pytest.mark.parametrize("n", (3, 5, 10))
def test_an_unfaithful_reproduction_is_flagged_most_of_the_time(n):
    """Ours off by 6 std of (our mean - the paper's run)."""
    rule, rng = Rule(), np.random.default_rng(200 + n)
    for std in STDS[:2]:
        offset = 6 * (std ** 2 / n + rule.sigma_paper ** 2) ** 0.5
        mean, s, paper = seeds_and_paper(rng, n, std, offset, rule.sigma_paper)
        assert np.mean(np.abs(mean - paper) > rule.cell_tolerance(s, n)) > 0.5, (n, std)


def test_the_old_two_std_rule_failed_a_faithful_reproduction_far_more_often():
    """Within 2 sample std of 3 seeds: about one faithful cell in four (the paper's run exactly ours in law)."""
    mean, s, paper = seeds_and_paper(np.random.default_rng(7), 3, 1.0, 0.0, 1.0)
    assert np.mean(np.abs(mean - paper) > 2 * s) > 0.15


def test_seeds_to_resolve_a_point_at_the_observed_spread():
    rule = Rule()
    assert rule.seeds_to_resolve(0.0) == 2
    assert rule.seeds_to_resolve(1.0) == 7  # t(0.975, 5) / sqrt(6) = 1.05, t(0.975, 6) / sqrt(7) = 0.92
    assert rule.seeds_to_resolve(1000.0) is None


def test_the_schema_defaults_are_the_rules_and_a_config_overrides_them():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    section = schema["properties"]["fidelity"]["properties"]
    assert {f.name: section[f.name]["default"] for f in fields(Rule)} == {f.name: f.default for f in fields(Rule)}
    assert Rule.from_config({}) == Rule()
    assert Rule.from_config({"fidelity": {"sigma_paper": 0.5}}) == Rule(sigma_paper=0.5)
