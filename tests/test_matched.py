"""Forgetting at matched new-task success: the interpolation, and the comparison's calibration under a null
(identical frontiers) and its power on a planted difference, by simulation."""

import math

import numpy as np
import pandas as pd
import pytest

from study.report.matched import interpolate, matched_comparison


def test_interpolation_reads_the_frontier_and_never_extrapolates():
    s, f = np.array([0.2, 0.4, 0.8]), np.array([0.0, 0.1, 0.5])
    assert interpolate(s, f, 0.6) == pytest.approx(0.3)
    assert math.isnan(interpolate(s, f, 0.9))


def _study(rng, shift: float, seeds: int = 5, points: int = 4, noise: float = 0.05) -> pd.DataFrame:
    """Two methods whose frontiers are forgetting = 0.5 * success (+ shift for grpo), each seed a sweep of
    learning rates landing at random successes, with seed-level and point-level noise."""
    rows = []
    for method, delta in (("sft", 0.0), ("grpo", shift)):
        for seed in range(seeds):
            offset = rng.normal(0, noise)
            succ = np.sort(rng.uniform(0.1, 0.9, points))
            for s in succ:
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "success": s,
                        "forgetting": 0.5 * s + delta + offset + rng.normal(0, noise / 2),
                    }
                )
    return pd.DataFrame(rows)


def test_null_false_positive_rate_is_alpha():
    rng = np.random.default_rng(0)
    n = 600
    rejected = 0
    for _ in range(n):
        out = matched_comparison(_study(rng, 0.0), target=0.5).set_index("method")
        lo, hi = out.loc["grpo", "diff_low"], out.loc["grpo", "diff_high"]
        rejected += not (lo <= 0 <= hi)
    rate = rejected / n
    bound = 0.05 + 3 * math.sqrt(0.05 * 0.95 / n)  # 3 Monte-Carlo standard errors
    assert rate <= bound, rate


def test_planted_difference_is_found():
    rng = np.random.default_rng(1)
    n = 200
    found = sum(
        matched_comparison(_study(rng, -0.15), target=0.5).set_index("method").loc["grpo", "diff_high"] < 0
        for _ in range(n)
    )
    assert found / n >= 0.8  # GRPO forgetting less at matched success is detected


def test_primary_line_says_not_estimable_when_frontiers_meet_only_at_the_base():
    """GRPO that never rises above the base's success: the matched target lands on the base, where both
    forgettings are 0 by construction; the report must say 'not estimable', not 'no difference detected'."""
    from types import SimpleNamespace

    from study.report.markdown import primary_lines

    run = SimpleNamespace(
        protocol={
            "primary": [
                {"metric": "forgetting/mean@matched", "task": "arithmetic", "contrast": ["grpo", "sft"]}
            ]
        },
        tasks=["arithmetic"],
    )
    row = {"task": "arithmetic", "target": 0.167, "value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 3}
    row |= {"diff": 0.0, "diff_low": 0.0, "diff_high": 0.0, "p": 1.0, "base_success": 0.167}
    matched = pd.DataFrame(
        [row | {"method": "grpo", "reach": 0.167}, row | {"method": "sft", "reach": 0.354}]
    )
    st = SimpleNamespace(matched=matched, mde=pd.DataFrame(columns=["metric", "task", "mde"]))
    text = "\n".join(primary_lines(run, st))
    assert "not estimable" in text and "no difference detected" not in text
    ok = matched.assign(target=0.25, diff=-0.1, diff_low=-0.15, diff_high=-0.05, p=0.01)
    text = "\n".join(primary_lines(run, SimpleNamespace(matched=ok, mde=st.mde)))
    assert "grpo forgets less than sft" in text


def test_primaries_are_one_holm_family_with_the_matched_p():
    """The matched-success p (Welch over seeds) and a comparison's p are Holm-adjusted together: two raw p of
    0.03 and 0.04 are both significant alone, but not as a family of two (Holm: 0.06 and 0.06)."""
    from types import SimpleNamespace

    from study.report.comparisons import holm_primaries
    from study.report.markdown import primary_lines

    run = SimpleNamespace(
        protocol={
            "primary": [
                {"metric": "forgetting/mean@matched", "task": "arithmetic", "contrast": ["grpo", "sft"]},
                {"metric": "persona/probe_masked", "task": "snark", "contrast": ["grpo", "control"]},
            ]
        },
        tasks=["arithmetic", "snark"],
    )
    row = {"task": "arithmetic", "target": 0.25, "value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 3}
    row |= {"diff": -0.1, "diff_low": -0.15, "diff_high": -0.05, "base_success": 0.167}
    comp = {
        "task": "snark",
        "outcome": "persona/probe_masked",
        "family": "primary",
        "a": "grpo",
        "b": "control",
    }
    comp |= {"est": 0.4, "ci_low": 0.1, "ci_high": 0.7, "underpowered": ""}
    mde = pd.DataFrame(columns=["metric", "task", "mde"])

    def text(p_matched: float, p_comp: float) -> tuple[str, pd.DataFrame]:
        matched = pd.DataFrame(
            [row | {"method": "grpo", "p": p_matched}, row | {"method": "sft", "p": math.nan}]
        )
        comparisons = pd.DataFrame([comp | {"p": p_comp, "p_holm": p_comp, "verdict": "difference"}])
        holm_primaries(run, comparisons, matched)  # as run_stats does, before the tables and the paper
        st = SimpleNamespace(matched=matched, mde=mde, comparisons=comparisons)
        return "\n".join(primary_lines(run, st)), comparisons

    both, comparisons = text(0.04, 0.03)
    assert "Holm p = 0.06" in both and "no difference detected" in both and "**noise**" in both
    assert comparisons.p_holm.iloc[0] == pytest.approx(0.06) and comparisons.verdict.iloc[0] == "noise"
    one, _ = text(0.03, 0.02)  # Holm: 0.04 and 0.03
    assert "grpo forgets less than sft" in one and "**difference**" in one
