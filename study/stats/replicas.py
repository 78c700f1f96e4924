"""The data-generating processes of the calibration simulations, and replicas of the rules the statistics
replaced ("before"), next to the ones in use ("after"): what study.stats.calibrate and tests/test_calibration.py
run under a null and with a planted effect.
"""

from __future__ import annotations

import math

import numpy as np

from study.stats.core import ALPHA, t_interval
from study.stats.forgetting import hierarchical_means
from study.stats.items import crossed_mean_t, crossed_parts
from study.stats.onsets import first_significant


def simulate_onset_data(n_sims: int, seed: int = 0, shift: float = 0.0, looks: int = 3, n_prompts: int = 78):
    """Per-prompt values of 4 indicators (3 continuous, correlated through a shared prompt effect; 1 rare
    binary marker at ~2 %) for the base and an adapter at `looks` checkpoints. Adapter values share the
    prompt effect and a per-cell prompt component across looks (checkpoints of one run are correlated).
    `shift` (in SDs of a per-prompt difference) is planted on indicator 1 from look 1 on.
    Returns (base (S, 4, n), adapter (S, 4, K, n), sd of a continuous per-prompt difference)."""
    rng = np.random.default_rng(seed)
    S, I, K, n = n_sims, 4, looks, n_prompts  # noqa: E741
    prompt = 0.6 * rng.normal(size=(S, 1, 1, n)) + 0.8 * rng.normal(size=(S, I, 1, n))
    base = prompt[:, :, 0, :] + 0.7 * rng.normal(size=(S, I, n))
    adapter = prompt + 0.4 * rng.normal(size=(S, I, 1, n)) + 0.7 * rng.normal(size=(S, I, K, n))
    sd_diff = math.sqrt(0.4**2 + 2 * 0.7**2)
    adapter[:, 1, 1:, :] += shift * sd_diff
    # indicator 0: a rare binary marker; the adapter keeps the base's answer with prob 0.7, else redraws
    b = (rng.random((S, n)) < 0.02).astype(float)
    keep = rng.random((S, K, n)) < 0.7
    a = np.where(keep, b[:, None, :], (rng.random((S, K, n)) < 0.02).astype(float))
    base[:, 0, :], adapter[:, 0, :, :] = b, a
    return base, adapter, sd_diff


def onset_before(base, adapter, alpha: float = ALPHA) -> np.ndarray:
    """Replica of runner.onset_rows: the first look whose 95 % CI of the adapter's mean excludes the base's
    point value (Wilson for the binary marker, as the persona stage's marker_rate CI; t for the others, as
    close to the stages' bootstrap CIs); (S, I) look indices, NaN for none."""
    from scipy import stats as st
    from statsmodels.stats.proportion import proportion_confint

    n = adapter.shape[-1]
    m = adapter.mean(-1)  # (S, I, K)
    half = st.t.ppf(1 - alpha / 2, n - 1) * adapter.std(-1, ddof=1) / math.sqrt(n)
    lo, hi = m - half, m + half
    wl, wh = proportion_confint(adapter[:, 0].sum(-1), n, alpha=alpha, method="wilson")
    lo[:, 0], hi[:, 0] = wl, wh
    ref = base.mean(-1)[..., None]
    out = (lo > ref) | (hi < ref)
    first = np.argmax(out, -1).astype(float)
    first[~out.any(-1)] = np.nan
    return first


def onset_after(base, adapter, alpha: float = ALPHA, min_effect=0.0) -> np.ndarray:
    """study.stats.onsets' rule: paired one-sided t per look and indicator, Bonferroni over looks x indicators."""
    I, K = adapter.shape[1], adapter.shape[2]  # noqa: E741
    return first_significant(adapter - base[:, :, None, :], min_effect, alpha / (I * K))


def simulate_item_data(
    n_sims: int,
    cell_sd: float,
    seed: int = 0,
    effect: float = 0.0,
    methods: int = 4,
    cells: int = 3,
    n_items: int = 40,
):
    """Base and adapters on the same items: y = difficulty + method effect (method 0 gets `effect`) + cell
    deviation (SD cell_sd) + item noise (SD 0.3). Returns (base (S, n), y (S, M, C, n))."""
    rng = np.random.default_rng(seed)
    S, M, C, n = n_sims, methods, cells, n_items
    diff = rng.normal(size=(S, 1, 1, n))
    base = diff[:, 0, 0, :] + 0.3 * rng.normal(size=(S, n))
    y = diff + cell_sd * rng.normal(size=(S, M, C, 1)) + 0.3 * rng.normal(size=(S, M, C, n))
    y[:, 0] += effect
    return base, y


def items_after(base, y) -> np.ndarray:
    """(S, M) p of each method vs the base (study.stats.items.crossed_mean_t)."""
    return crossed_mean_t(y - base[:, None, None, :])[3]


def items_before(base, y) -> np.ndarray:
    """The old report.items model (commit 06540a4), refitted: y ~ method + (1|item) + (1|seed) as variance
    components of one group (statsmodels MixedLM, REML), the base its own seed level, the cell (method x seed)
    deviation left in the residual; Wald p-values. (S, M) p-values. ~1-4 s per study: few simulations."""
    import warnings

    import pandas as pd
    import statsmodels.formula.api as smf

    S, M, cells, n = y.shape  # no local `C`: patsy evaluates C(...) in this frame
    out = np.full((S, M), np.nan)
    for s in range(S):
        rows = [("base", "base", i, v) for i, v in enumerate(base[s])]
        rows += [
            (f"m{m}", str(c), i, y[s, m, c, i]) for m in range(M) for c in range(cells) for i in range(n)
        ]
        d = pd.DataFrame(rows, columns=["method", "seed", "item", "y"]).assign(one=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = smf.mixedlm(
                "y ~ C(method, Treatment('base'))",
                d,
                groups="one",
                vc_formula={"item": "0 + C(item)", "seed": "0 + C(seed)"},
            ).fit(reml=True)
        out[s] = [res.pvalues[f"C(method, Treatment('base'))[T.m{m}]"] for m in range(M)]
    return out


def simulate_forgetting(
    n_sims: int,
    seed: int = 0,
    forgetting: float = 0.0,
    seeds: int = 3,
    n_items: int = 100,
    p: float = 0.6,
    flip: float = 0.15,
    seed_sd: float = 0.03,
    continuous: bool = False,
    suites: int = 0,
):
    """Base and adapters on the same items, a seed's expected forgetting delta_s ~ N(forgetting, seed_sd).
    Binary (0/1 items): the base right with prob p (a fresh item sample per study); each seed's adapter flips
    right answers with prob flip + delta_s / p and wrong ones with prob flip p / (1 - p). Continuous (p_gold-
    like): base b ~ Beta(3, 2); adapter (b + u) / 2, u ~ Beta(4 m, 4 (1 - m)), m = 0.6 - 2 delta_s. Returns
    (base (S, n), adapters (S, seeds, n)); with `suites` = K > 0, a list of K such pairs sharing delta_s (the
    mean over suites). `forgetting_truth` is the expected forgetting (clipping aside: `forgetting`)."""
    rng = np.random.default_rng(seed)
    S = n_sims
    delta = forgetting + seed_sd * rng.normal(size=(S, seeds, 1))
    out = []
    for _ in range(max(suites, 1)):
        if continuous:
            b = rng.beta(3, 2, size=(S, n_items))
            m = np.broadcast_to(np.clip(0.6 - 2 * delta, 0.02, 0.98), (S, seeds, n_items))
            adapters = (b[:, None, :] + rng.beta(4 * m, 4 * (1 - m))) / 2
        else:
            b = (rng.random((S, n_items)) < p).astype(float)
            lose = np.clip(flip + delta / p, 0, 1)
            u = rng.random((S, seeds, n_items))
            right = b[:, None, :] == 1
            adapters = np.where(right, (u >= lose).astype(float), (u < flip * p / (1 - p)).astype(float))
        out.append((b, adapters))
    return out if suites else out[0]


def forgetting_truth(
    forgetting: float = 0.0,
    p: float = 0.6,
    flip: float = 0.15,
    seed_sd: float = 0.03,
    continuous: bool = False,
    **_,
) -> float:
    """The expected forgetting of simulate_forgetting's seeds (Gauss-Hermite over delta_s; clipping of the
    flip probabilities or of m makes it differ from `forgetting` by a little at large seed SDs)."""
    x, w = np.polynomial.hermite_e.hermegauss(81)
    d = forgetting + seed_sd * x
    if continuous:
        e = 0.5 * (0.6 - np.clip(0.6 - 2 * d, 0.02, 0.98))
    else:
        e = p * np.clip(flip + d / p, 0, 1) - flip * p
    return float((w * e).sum() / w.sum())


def _diffs(data) -> list[np.ndarray]:
    """(S, seeds, n) base − adapter matrices of one suite or of a list of suites."""
    pairs = data if isinstance(data, list) else [data]
    return [b[:, None, :] - a for b, a in pairs]


def forgetting_after(data):
    """study.stats.items.crossed_mean_t (as study.stats.forgetting uses it): (low, high)."""
    _, lo, hi, _, _ = crossed_mean_t(_diffs(data))
    return lo, hi


def forgetting_crossed_t(data):
    """Replica of crossed_mean_t up to this change: the same crossed variance, t on cells − 1 df for all of it
    (the item part included)."""
    est, v_cell, v_item, _, C = crossed_parts(_diffs(data))
    lo, hi = t_interval(est, np.sqrt(v_cell + v_item), C - 1)
    return lo, hi


def forgetting_satterthwaite(data):
    """The rejected alternative: the same variance, Satterthwaite df (at least cells − 1)."""
    est, v_cell, v_item, den, C = crossed_parts(_diffs(data))
    v = v_cell + v_item
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.maximum(v**2 / (v_cell**2 / (C - 1) + den), C - 1)
    return t_interval(est, np.sqrt(v), np.nan_to_num(df, nan=C - 1))


def forgetting_before(data):
    """Replica of report summarise over cells: a t-interval over the cells' forgetting values (df cells − 1);
    item sampling, shared by every cell, is not counted."""
    from scipy import stats as st

    f = sum(d.mean(-1) for d in _diffs(data)) / len(_diffs(data))
    k = f.shape[1]
    half = st.t.ppf(0.975, k - 1) * f.std(1, ddof=1) / math.sqrt(k)
    return f.mean(1) - half, f.mean(1) + half


def forgetting_bootstrap(data, n_boot: int = 1000):
    """The two-stage (seeds, then items) percentile bootstrap, for comparison."""
    Ds = _diffs(data)
    reps = np.stack([hierarchical_means([d[s] for d in Ds], n_boot, seed=s) for s in range(len(Ds[0]))])
    return np.quantile(reps, 0.025, 1), np.quantile(reps, 0.975, 1)


def simulate_floor(n_sims: int, seed: int = 0, score: float = 0.25, n_items: int = 60):
    """(S, n) 0/1 answers of a base right with prob `score` on each item."""
    return (np.random.default_rng(seed).random((n_sims, n_items)) < score).astype(float)


def simulate_law(rng, slope: float = 0.0, methods: int = 4, cells: int = 9, looks: int = 4):
    """Points of 4 methods x 9 cells x 4 checkpoints with a method-level confound (method means of x and y
    both rise with the method's index) and `slope` within methods. Returns (x, y, method, cell)."""
    m = np.repeat(np.arange(methods), cells * looks)
    c = np.repeat(np.arange(methods * cells), looks)
    mx = m * 1.0
    x = mx + 0.3 * rng.normal(size=methods * cells)[c] + 0.3 * rng.normal(size=len(m))
    y = (
        0.5 * mx
        + slope * (x - mx)
        + 0.3 * rng.normal(size=methods * cells)[c]
        + 0.3 * rng.normal(size=len(m))
    )
    return x, y, m, c


def law_before(x, y, cell, n_boot: int = 300, rng=None) -> float:
    """Replica of report.stats.poly_fit (degree 1): the pooled R²'s cluster-bootstrap (cells) lower bound."""
    codes = np.unique(cell, return_inverse=True)[1]
    k = codes.max() + 1
    W = rng.multinomial(k, np.full(k, 1 / k), size=n_boot)[:, codes].astype(float)
    sw = W.sum(1, keepdims=True)
    mx, my = (W * x).sum(1, keepdims=True) / sw, (W * y).sum(1, keepdims=True) / sw
    sxy = (W * (x - mx) * (y - my)).sum(1)
    r2 = sxy**2 / ((W * (x - mx) ** 2).sum(1) * (W * (y - my) ** 2).sum(1))
    return float(np.quantile(r2, 0.025))
