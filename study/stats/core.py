"""Thin wrappers around scipy / statsmodels / pingouin, each written once, and the typed metric row.

    from study.stats.core import bootstrap_ci, holm, wilson, pearson_ci, paired_t, kendall_w, cronbach_alpha

Why wrappers at all: the libraries raise or warn on the degenerate inputs a small study produces (one cell, a
constant column, NaN p-values of untestable comparisons); each wrapper turns those into NaN in one place, so
callers do not each grow their own guard. No hand-written statistics here: every number comes from a library.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

ALPHA = 0.05


# ------------------------------------------------------------------------------------------- the row


@dataclass
class MetricRow:
    """One row of the tidy metrics table (metrics.csv): a value with its 95% interval for one cell
    (or `base-<task>`, or `stats`) at one checkpoint. `flag` says why a value is not to be read at face value
    (e.g. `floor`: the base scores at chance on this suite); empty when there is nothing to say."""

    cell: str
    method: str
    seed: int | None
    checkpoint: int | None
    metric: str
    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan
    task: str = ""
    n: int | None = None
    flag: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ intervals


def bootstrap_ci(
    values,
    statistic=np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
) -> tuple[float, float]:
    """`scipy.stats.bootstrap` CI of `statistic` over the values (resampled with replacement). One value: its
    own value twice (no spread to resample); none: NaN. `statistic` must take `axis=`."""
    from scipy import stats as st

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return (math.nan, math.nan)
    if len(x) == 1 or np.all(x == x[0]):
        v = float(statistic(x, axis=-1))
        return (v, v)
    res = st.bootstrap(
        (x,),
        statistic,
        n_resamples=n_resamples,
        confidence_level=level,
        method=method,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def bootstrap_mean_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (the measurement stages' per-prompt CIs)."""
    return bootstrap_ci(values, np.mean, n_resamples=n_boot, seed=seed, level=level)


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (`statsmodels proportion_confint`); NaN for n = 0."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return (math.nan, math.nan)
    lo, hi = proportion_confint(k, n, alpha=1 - level, method="wilson")
    return (max(0.0, float(lo)), min(1.0, float(hi)))


def t_interval(est, se, df, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """est ± t_{df} · se (arrays broadcast); NaN where df < 1 or se is not finite."""
    from scipy import stats as st

    est, se, df = (np.asarray(v, float) for v in (est, se, df))
    with np.errstate(invalid="ignore"):
        q = np.where(df >= 1, st.t.ppf(0.5 + level / 2, np.maximum(df, 1)), np.nan)
    return est - q * se, est + q * se


# ---------------------------------------------------------------------------------------------- tests


def holm(pvals) -> np.ndarray:
    """Holm-adjusted p-values (`pingouin.multicomp`, equal to statsmodels' `multipletests(method="holm")`,
    which the tests check; statsmodels 0.15 runs `gc.collect()` on every call, ~0.1 s, too slow for the null
    simulations); NaNs stay NaN and do not count in the family."""
    import pingouin as pg

    p = np.asarray(pvals, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = pg.multicomp(p[ok], method="holm")[1]
    return out


def paired_t(
    a, b, axis: int = -1, alternative: str = "two-sided", delta: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """`scipy.stats.ttest_rel` of a − b along `axis`, against a difference of `delta` (a minimum effect:
    H0 mean(a − b) <= delta for alternative 'greater'). Returns (t, p) arrays (NaN where the differences are
    constant or fewer than 2)."""
    from scipy import stats as st

    a, b = np.asarray(a, float), np.asarray(b, float)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        res = st.ttest_rel(a - delta, b, axis=axis, alternative=alternative)
    return np.asarray(res.statistic, float), np.asarray(res.pvalue, float)


def pearson_ci(x, y, level: float = 0.95) -> tuple[float, float, float, float]:
    """(r, low, high, p) from `scipy.stats.pearsonr` and its Fisher-z `confidence_interval`; NaN with fewer
    than 4 pairs or a constant variable."""
    from scipy import stats as st

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return (math.nan, math.nan, math.nan, math.nan)
    res = st.pearsonr(x, y)
    ci = res.confidence_interval(confidence_level=level)
    return (float(res.statistic), float(ci.low), float(ci.high), float(res.pvalue))


# ----------------------------------------------------------------------------------------- agreement


def kendall_w(ratings) -> float:
    """Kendall's W of an (n subjects × m raters) matrix, tie-corrected (`pingouin.friedman`): 1 = the raters
    rank the subjects identically, 0 = no agreement. Rows with a NaN are dropped; NaN below 2 × 2."""
    import pandas as pd
    import pingouin as pg

    R = np.asarray(ratings, float)
    R = R[~np.isnan(R).any(1)] if R.ndim == 2 else R
    if R.ndim != 2 or R.shape[0] < 2 or R.shape[1] < 2:
        return math.nan
    n, m = R.shape
    d = pd.DataFrame(
        {"subject": np.repeat(np.arange(n), m), "rater": np.tile(np.arange(m), n), "v": R.ravel()}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = pg.friedman(d, dv="v", within="subject", subject="rater")["W"].iloc[0]
    return float(w) if np.isfinite(w) else math.nan


def cronbach_alpha(items) -> tuple[float, float, float]:
    """(alpha, low, high) of an (n respondents × k items) matrix (`pingouin.cronbach_alpha`, its 95% CI);
    NaN with fewer than 2 items or 3 respondents, or no variance."""
    import pandas as pd
    import pingouin as pg

    X = np.asarray(items, float)
    if X.ndim != 2 or X.shape[1] < 2 or X.shape[0] < 3 or np.nanvar(X.sum(1)) == 0:
        return (math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, ci = pg.cronbach_alpha(data=pd.DataFrame(X))
    return (float(a), float(ci[0]), float(ci[1]))
