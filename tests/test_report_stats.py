"""The report's statistics against known values, and the null check that can fail.

    .venv/bin/python -m pytest -q tests/test_report_stats.py

The null check simulates whole studies with no true difference between methods and runs the report's
decision rule (seed-stratified permutation tests, Holm over the method pairs) on all of them at once: the
family-wise rejection rate must stay within α plus Monte Carlo error. A planted difference must be found.
"""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from study.report import stats as S
from study.report.analysis import compare_methods

METHODS = ["sft", "dpo", "kto", "grpo"]


# ------------------------------------------------------------------------------------------- known values


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.01, 0.04, 0.03, 0.2, 0.005, 0.5])
    assert np.allclose(S.holm(p), multipletests(p, method="holm")[1])
    with_nan = S.holm([0.01, np.nan, 0.04])
    assert np.isnan(with_nan[1]) and np.allclose(
        with_nan[[0, 2]], multipletests([0.01, 0.04], method="holm")[1]
    )


def test_hedges_g_matches_pingouin_and_ci_covers_it():
    import pingouin as pg

    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1, 12), rng.normal(0.0, 1, 9)
    assert S.hedges_g(a, b) == pytest.approx(pg.compute_effsize(a, b, eftype="hedges"), rel=1e-9)
    g, lo, hi = S.hedges_g_ci(a, b, n_boot=2000)
    assert lo < g < hi
    assert math.isnan(S.hedges_g([1.0], [2.0, 3.0]))


def test_permutation_exact_matches_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.8, 1, 5), rng.normal(0, 1, 5)
    ref = st.permutation_test(
        (a, b),
        lambda x, y: x.mean() - y.mean(),
        permutation_type="independent",
        n_resamples=np.inf,
        alternative="two-sided",
    ).pvalue
    p = S.perm_test(np.r_[a, b], np.r_[np.ones(5, bool), np.zeros(5, bool)])
    assert p == pytest.approx(ref, abs=1e-12)


def test_stratified_permutation_by_hand():
    # Two seeds, one cell per method each: 4 relabelings (swap within each seed or not).
    y = np.array([3.0, 1.0, 5.0, 4.0])
    is_a = np.array([True, False, True, False])
    seeds = np.array([0, 0, 1, 1])
    diffs = []
    for s0, s1 in itertools.product([0, 1], repeat=2):
        lab = is_a.copy()
        if s0:
            lab[[0, 1]] = lab[[1, 0]]
        if s1:
            lab[[2, 3]] = lab[[3, 2]]
        diffs.append(y[lab].mean() - y[~lab].mean())
    obs = y[is_a].mean() - y[~is_a].mean()
    expect = np.mean(np.abs(diffs) >= abs(obs) - 1e-12)
    assert S.perm_test(y, is_a, seeds) == pytest.approx(expect)
    assert S.min_attainable_p(is_a, seeds) == pytest.approx(0.5)


def test_monte_carlo_permutation_close_to_exact():
    rng = np.random.default_rng(3)
    y = rng.normal(size=18) + np.r_[np.full(9, 0.6), np.zeros(9)]
    is_a = np.r_[np.ones(9, bool), np.zeros(9, bool)]
    seeds = np.tile([0, 1, 2], 6)
    exact = S.perm_test(y, is_a, seeds)  # 20^3 = 8000 relabelings: exact
    mc = S.perm_test(y, is_a, seeds, n_perm=20000, exact_limit=10)
    assert mc == pytest.approx(exact, abs=0.015)


def test_poly_fit_against_scipy_and_numpy():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 3, 40)
    y = 0.5 + 0.2 * x + 0.05 * x**2 + rng.normal(0, 0.05, 40)
    lin = S.poly_fit(x, y, degree=1, n_boot=500)
    assert lin.r2 == pytest.approx(st.linregress(x, y).rvalue ** 2, rel=1e-9)
    assert lin.coef == pytest.approx(list(np.polyfit(x, y, 1)[::-1]), rel=1e-9)
    assert lin.r2_low <= lin.r2 <= lin.r2_high and lin.slope_low < lin.coef[1] < lin.slope_high
    quad = S.poly_fit(x, y, degree=2, n_boot=500)
    resid = y - np.polyval(np.polyfit(x, y, 2), x)
    assert quad.r2 == pytest.approx(1 - (resid**2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-9)
    assert quad.r2 >= lin.r2
    pred, lo, hi = lin.band(np.array([1.0, 2.0]))
    assert np.all(lo <= pred) and np.all(pred <= hi)


def test_cluster_bootstrap_keeps_checkpoints_together():
    # 5 cells x 4 checkpoints: with cell-level noise, the cluster bootstrap must resample 5 units, not 20.
    rng = np.random.default_rng(5)
    cells = np.repeat(np.arange(5), 4)
    W = S.cluster_weights(cells, 200, rng)
    assert W.shape == (200, 20)
    for row in W[:20]:  # every checkpoint of a cell gets the same weight
        assert np.all(row.reshape(5, 4) == row.reshape(5, 4)[:, :1])
    assert np.allclose(W.sum(1), 20)
    fit = S.poly_fit(rng.normal(size=20), rng.normal(size=20), cells, degree=2, n_boot=100)
    assert fit.n_clusters == 5 and math.isfinite(fit.r2)
    assert "too few" in S.poly_fit([1, 2, 3], [1, 2, 3], [0, 0, 1], degree=2).note


def test_mixed_contrasts_match_statsmodels_formula():
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(6)
    d = pd.DataFrame(
        [
            (m, s, i + rng.normal(0, 0.5) + 0.3 * s)
            for i, m in enumerate(METHODS)
            for s in range(4)
            for _ in range(2)
        ],
        columns=["method", "seed", "value"],
    )
    table, model = S.mixed_contrasts(d, levels=METHODS)
    assert model.startswith("MixedLM")
    ref = smf.mixedlm("value ~ C(method, Treatment('sft'))", d, groups=d["seed"]).fit(reml=True)
    coef = {m: ref.fe_params.get(f"C(method, Treatment('sft'))[T.{m}]", 0.0) for m in METHODS}
    row = table[(table.a == "dpo") & (table.b == "grpo")].iloc[0]
    assert row.estimate == pytest.approx(coef["dpo"] - coef["grpo"], abs=1e-4)
    assert row.ci_low < row.estimate < row.ci_high and len(table) == 6
    one_seed = d[d.seed == 0]
    _, model = S.mixed_contrasts(one_seed, levels=METHODS)
    assert model.startswith("OLS")


def test_kendall_w_and_pareto():
    assert S.kendall_w(np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3.0]])) == pytest.approx(1.0)
    assert S.kendall_w(np.array([[1, 3], [2, 2], [3, 1.0]])) == pytest.approx(0.0)
    front = S.pareto_front([0.1, 0.5, 0.4, 0.9], [0.9, 0.5, 0.4, 0.1])
    assert front.tolist() == [True, True, False, True]


def test_verdicts():
    assert S.verdict(-0.1, 0.2, 0.01) == "noise"
    assert S.verdict(0.1, 0.2, 0.2) == "noise"
    assert S.verdict(0.1, 0.2, 0.01) == "difference"
    assert S.verdict(0.1, 0.2, 0.01, underpowered="2 seeds") == "underpowered"


# ---------------------------------------------------------------------------------- the null check


def _design(seeds=3, sweep=3):
    """Cells of 4 methods x seeds x sweep points; returns (method labels, seed labels)."""
    methods = np.repeat(METHODS, seeds * sweep)
    seed = np.tile(np.repeat(np.arange(seeds), sweep), len(METHODS))
    return methods, seed


def _simulate(n_sims, shift=None, seed=0, seeds=3, sweep=3):
    """Simulated studies: a seed effect shared by all methods (what seed-stratification is for) + heavy-tailed
    noise of unit variance (t with 5 degrees of freedom, rescaled)."""
    rng = np.random.default_rng(seed)
    methods, seed_lab = _design(seeds, sweep)
    noise = rng.standard_t(5, (n_sims, len(methods))) * math.sqrt(3 / 5)
    Y = rng.normal(0, 1, (n_sims, seeds))[:, seed_lab] + noise
    for m, delta in (shift or {}).items():
        Y[:, methods == m] += delta
    return Y, methods, seed_lab


def _pipeline_rejections(Y, methods, seed_lab, alpha=S.ALPHA):
    """The report's decision rule on every simulated study at once: (S, pairs) rejections after Holm."""
    pairs = list(itertools.combinations(METHODS, 2))
    P = np.empty((len(Y), len(pairs)))
    for j, (a, b) in enumerate(pairs):
        keep = np.isin(methods, [a, b])
        P[:, j] = S.perm_test(Y[:, keep], methods[keep] == a, seed_lab[keep], n_perm=2000)
    adj = np.apply_along_axis(S.holm, 1, P)
    return adj < alpha, pairs, P


def test_null_rejection_rate_within_alpha():
    n = 600
    Y, methods, seed_lab = _simulate(n, seed=11)
    reject, _, P = _pipeline_rejections(Y, methods, seed_lab)
    mc = 3 * math.sqrt(S.ALPHA * (1 - S.ALPHA) / n)
    fwer = reject.any(1).mean()
    per_test = (P < S.ALPHA).mean()
    assert fwer <= S.ALPHA + mc, f"family-wise rejection rate {fwer:.3f} > {S.ALPHA} + {mc:.3f}"
    assert per_test <= S.ALPHA + mc, f"uncorrected per-test rate {per_test:.3f} too high: the test is invalid"
    # The check has teeth: without Holm, six tests per study reject far more often than α.
    assert (P < S.ALPHA).any(1).mean() > S.ALPHA + mc


def test_planted_difference_is_found():
    n = 300
    Y, methods, seed_lab = _simulate(n, shift={"grpo": 2.0}, seed=12)
    reject, pairs, _ = _pipeline_rejections(Y, methods, seed_lab)
    with_grpo = [j for j, p in enumerate(pairs) if "grpo" in p]
    without = [j for j, p in enumerate(pairs) if "grpo" not in p]
    assert reject[:, with_grpo].mean() >= 0.8, "a 2-SD difference should be found in most simulated studies"
    assert reject[:, without].any(1).mean() <= S.ALPHA + 3 * math.sqrt(S.ALPHA * (1 - S.ALPHA) / n)


def _frame(y, methods, seed_lab):
    return pd.DataFrame({"method": methods, "seed": seed_lab, "value": y, "cell": range(len(y))})


def test_full_pipeline_verdicts_null_and_planted():
    # compare_methods end to end (mixed model + permutations + Holm + verdict) on a few studies.
    Y, methods, seed_lab = _simulate(20, seed=13)
    false = sum(
        (
            compare_methods(_frame(y, methods, seed_lab), METHODS, n_perm=500, n_boot=200)[0]["verdict"]
            == "difference"
        ).any()
        for y in Y
    )
    assert false <= 4  # P(X >= 5) < 0.003 for Binomial(20, 0.05)
    Y, _, _ = _simulate(1, shift={"sft": 3.0}, seed=14)
    out, _ = compare_methods(_frame(Y[0], methods, seed_lab), METHODS, n_perm=2000, n_boot=500)
    sft = out[(out.a == "sft")]
    assert (sft["verdict"] == "difference").all() and (sft["est"] > 0).all()


def test_fewer_than_three_seeds_is_underpowered():
    Y, methods, seed_lab = _simulate(1, shift={"sft": 5.0}, seed=15, seeds=2, sweep=3)
    out, _ = compare_methods(_frame(Y[0], methods, seed_lab), METHODS, n_perm=500, n_boot=200)
    assert (out["verdict"] == "underpowered").all()
    assert out["underpowered"].str.contains("2 seed").all()
    # Three seeds, one cell per method and seed: no permutation p can pass Holm, so the paired t over seeds.
    Y, methods, seed_lab = _simulate(1, shift={"sft": 5.0}, seed=16, seeds=3, sweep=1)
    out, _ = compare_methods(_frame(Y[0], methods, seed_lab), METHODS, n_perm=500, n_boot=200)
    assert (out["underpowered"] == "").all() and out["test"].str.startswith("paired t").all()


def test_blocked_t_matches_scipy_and_holds_alpha():
    rng = np.random.default_rng(17)
    y = rng.normal(size=6)
    is_a = np.array([True, False] * 3)
    seeds = np.repeat([0, 1, 2], 2)
    assert S.blocked_t_test(y, is_a, seeds) == pytest.approx(st.ttest_rel(y[is_a], y[~is_a]).pvalue)
    # The small-design path (3 seeds, one cell each) under the null, all studies at once.
    n = 600
    Y, methods, seed_lab = _simulate(n, seed=18, seeds=3, sweep=1)
    pairs = list(itertools.combinations(METHODS, 2))
    P = np.column_stack(
        [
            S.blocked_t_test(
                Y[:, np.isin(methods, p)], methods[np.isin(methods, p)] == p[0], seed_lab[np.isin(methods, p)]
            )
            for p in pairs
        ]
    )
    fwer = (np.apply_along_axis(S.holm, 1, P) < S.ALPHA).any(1).mean()
    assert fwer <= S.ALPHA + 3 * math.sqrt(S.ALPHA * (1 - S.ALPHA) / n)
