"""Statistical primitives for the report: polynomial fits with cluster-bootstrap R², permutation tests,
Hedges' g with bootstrap CIs, mixed-model contrasts (t intervals), Pareto fronts. Holm, Kendall's W and the
paired t come from `study.stats.core` (scipy / statsmodels / pingouin, wrapped once).

Pure numpy/scipy/statsmodels on arrays; `study.report.analysis` applies them to a run. The bootstrap and
permutation code is vectorised (one matrix product per batch) so that the null-rate simulation in
tests/test_report_stats.py runs hundreds of simulated studies in a second.

    .venv/bin/python -m pytest -q tests/test_report_stats.py
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from study.stats.core import ALPHA, holm, kendall_w, paired_t  # noqa: F401 (re-exported)
from study.stats.mixed import mixed_contrasts  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------------------- effect sizes


def _g(ma, mb, va, vb, na, nb):
    sp = np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    j = 1 - 3 / (4 * (na + nb) - 9)  # Hedges' small-sample correction
    with np.errstate(divide="ignore", invalid="ignore"):
        return j * (ma - mb) / sp


def hedges_g(a, b) -> float:
    """Hedges' g of a − b (pooled SD, small-sample corrected); NaN with fewer than 2 values per group."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(_g(a.mean(), b.mean(), a.var(ddof=1), b.var(ddof=1), len(a), len(b)))


def hedges_g_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(g, low, high): percentile bootstrap, resampling within each group (vectorised)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    g = hedges_g(a, b)
    if math.isnan(g):
        return (g, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, len(a), (n_boot, len(a)))]
    rb = b[rng.integers(0, len(b), (n_boot, len(b)))]
    gs = _g(ra.mean(1), rb.mean(1), ra.var(1, ddof=1), rb.var(1, ddof=1), len(a), len(b))
    gs = gs[np.isfinite(gs)]
    if len(gs) < n_boot / 2:  # mostly zero-variance resamples: no honest interval
        return (g, math.nan, math.nan)
    q = (1 - level) / 2
    return (g, float(np.quantile(gs, q)), float(np.quantile(gs, 1 - q)))


# --------------------------------------------------------------------------------------- permutations


def _relabelings(is_a: np.ndarray, strata: np.ndarray) -> int:
    n = 1
    for s in np.unique(strata):
        m = strata == s
        n *= math.comb(int(m.sum()), int(is_a[m].sum()))
    return n


def min_attainable_p(is_a, strata=None) -> float:
    """The smallest two-sided p-value a permutation test of this design can give (≈ 2 / #relabelings when
    groups are balanced in every stratum, 1 / #relabelings otherwise)."""
    is_a = np.asarray(is_a, bool)
    strata = np.zeros(len(is_a), int) if strata is None else np.asarray(strata)
    n = _relabelings(is_a, strata)
    balanced = all(2 * is_a[strata == s].sum() == (strata == s).sum() for s in np.unique(strata))
    return min(1.0, (2.0 if balanced else 1.0) / n)


@functools.lru_cache(maxsize=64)
def _exact_labels(is_a: tuple, strata: tuple) -> np.ndarray:
    """Every relabeling (cached: one design serves all outcomes and all simulations)."""
    is_a, strata = np.array(is_a, bool), np.array(strata)
    n = len(is_a)
    per = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        per.append([idx[list(c)] for c in itertools.combinations(range(len(idx)), int(is_a[idx].sum()))])
    mats = np.zeros((_relabelings(is_a, strata), n))
    for r, combo in enumerate(itertools.product(*per)):
        for chosen in combo:
            mats[r, chosen] = 1.0
    mats.setflags(write=False)
    return mats


def _label_matrix(is_a: np.ndarray, strata: np.ndarray, n_perm: int, rng, exact_limit: int):
    """Rows = relabelings of group A that keep each stratum's group sizes; (matrix, exact?)."""
    n = len(is_a)
    total = _relabelings(is_a, strata)
    if total <= exact_limit:
        return _exact_labels(tuple(is_a.tolist()), tuple(strata.tolist())), True
    order = np.argsort(strata, kind="stable")
    # Random keys offset by the stratum code: argsort shuffles positions within each stratum only.
    keys = rng.random((n_perm, n)) + strata[order][None, :] * 2.0
    perm = order[np.argsort(keys, axis=1)]
    mats = np.zeros((n_perm, n))
    mats[np.arange(n_perm)[:, None], perm] = is_a[order][None, :].astype(float)
    return mats, False


def perm_test(
    y, is_a, strata=None, n_perm: int = 5000, seed: int = 0, exact_limit: int = 20000
) -> np.ndarray:
    """Two-sided permutation p-value(s) for mean(y[A]) − mean(y[B]), relabelling within strata (seeds).

    `y` is (n,) or (S, n): S data sets sharing one design (the simulations); returns a float or (S,).
    Exact over all relabelings when there are at most `exact_limit`, else Monte Carlo with the observed
    labelling counted, p = (1 + #{|T*| >= |T|}) / (1 + n_perm), which keeps the test valid.
    """
    y = np.asarray(y, float)
    single = y.ndim == 1
    Y = y[None, :] if single else y
    is_a = np.asarray(is_a, bool)
    strata = np.zeros(len(is_a), int) if strata is None else pd.factorize(np.asarray(strata))[0]
    na, nb = is_a.sum(), (~is_a).sum()
    if na == 0 or nb == 0:
        out = np.full(len(Y), np.nan)
        return float(out[0]) if single else out
    L, exact = _label_matrix(is_a, strata, n_perm, np.random.default_rng(seed), exact_limit)
    total = Y.sum(1, keepdims=True)
    sa = Y @ L.T  # (S, n_relabelings)
    t_perm = sa / na - (total - sa) / nb
    t_obs = Y @ is_a / na - (total[:, 0] - Y @ is_a) / nb
    tol = 1e-12 * np.maximum(1.0, np.abs(t_obs))[:, None]
    hits = (np.abs(t_perm) >= np.abs(t_obs)[:, None] - tol).sum(1)
    p = hits / L.shape[0] if exact else (1 + hits) / (1 + L.shape[0])
    return float(p[0]) if single else p


def blocked_t_test(y, is_a, strata) -> np.ndarray:
    """Two-sided paired t-test (`scipy.stats.ttest_rel`) of the per-stratum (seed) means of A against B,
    df = #strata − 1.

    For designs too small for a permutation test to reach α (3 seeds, one cell per method and seed): valid
    under normal errors whatever the seed effects, which cancel within a seed. `y` is (n,) or (S, n)."""
    y = np.asarray(y, float)
    single = y.ndim == 1
    Y = y[None, :] if single else y
    is_a = np.asarray(is_a, bool)
    codes = pd.factorize(np.asarray(strata))[0]
    both = [s for s in np.unique(codes) if (is_a & (codes == s)).any() and (~is_a & (codes == s)).any()]
    if len(both) < 2:
        out = np.full(len(Y), np.nan)
    else:
        A = np.column_stack([Y[:, is_a & (codes == s)].mean(1) for s in both])
        B = np.column_stack([Y[:, ~is_a & (codes == s)].mean(1) for s in both])
        out = paired_t(A, B, axis=1)[1]
    return float(out[0]) if single else out


# ---------------------------------------------------------------------------------------- regressions


@dataclass
class Fit:
    """A polynomial fit y ~ x (degree 1 or 2) with cluster-bootstrap uncertainty."""

    degree: int
    n: int
    n_clusters: int
    r2: float = math.nan
    r2_low: float = math.nan
    r2_high: float = math.nan
    adj_r2: float = math.nan
    r2_loco: float = math.nan  # leave-one-cluster-out predictive R²: penalises the quadratic honestly
    coef: list[float] = field(default_factory=list)  # in x's own units, constant first
    slope_low: float = math.nan  # linear term's CI (degree 1 only)
    slope_high: float = math.nan
    note: str = ""
    _boot: np.ndarray | None = None  # bootstrap coefficients on the standardised x
    _mu: float = 0.0
    _sd: float = 1.0

    def band(self, grid, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, low, high) on `grid` (x units): percentile band of the bootstrap fits."""
        grid = np.asarray(grid, float)
        pred = np.polyval(self.coef[::-1], grid) if self.coef else np.full(len(grid), np.nan)
        if self._boot is None:
            return pred, np.full(len(grid), np.nan), np.full(len(grid), np.nan)
        X = _design((grid - self._mu) / self._sd, self.degree)
        preds = self._boot @ X.T
        q = (1 - level) / 2
        return pred, np.nanquantile(preds, q, axis=0), np.nanquantile(preds, 1 - q, axis=0)


def _design(z: np.ndarray, degree: int) -> np.ndarray:
    return np.vander(z, degree + 1, increasing=True)


def _wls_r2(X: np.ndarray, y: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched weighted least squares: W is (B, n); returns (coefficients (B, p), R² (B,))."""
    XtWX = np.einsum("bi,ij,ik->bjk", W, X, X)
    XtWy = np.einsum("bi,ij,i->bj", W, X, y)
    beta = np.einsum("bjk,bk->bj", np.linalg.pinv(XtWX), XtWy)
    resid = y[None, :] - beta @ X.T
    sw = W.sum(1)
    ybar = (W @ y) / sw
    sse = (W * resid**2).sum(1)
    sst = (W * (y[None, :] - ybar[:, None]) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 0, 1 - sse / sst, np.nan)
    return beta, r2


def cluster_weights(clusters, n_boot: int, rng) -> np.ndarray:
    """(n_boot, n) resampling weights: clusters (cells) drawn with replacement, their points carried along."""
    codes, uniq = pd.factorize(np.asarray(clusters))
    counts = rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=n_boot)
    return counts[:, codes].astype(float)


def poly_fit(
    x,
    y,
    clusters=None,
    degree: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    weights: np.ndarray | None = None,
    level: float = 0.95,
) -> Fit:
    """Least-squares polynomial fit with a cluster bootstrap over `clusters` (cells: a cell's checkpoints are
    not independent points). Pass `weights` to share resamples between fits (paired comparisons)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    clusters = np.arange(len(x)) if clusters is None else np.asarray(clusters)
    n, k = len(x), len(np.unique(clusters))
    fit = Fit(degree=degree, n=n, n_clusters=k)
    if k < degree + 2 or n < degree + 2:
        fit.note = f"too few cells ({k}) for a degree-{degree} fit"
        return fit
    mu, sd = float(x.mean()), float(x.std())
    if sd == 0:
        fit.note = "the predictor does not vary"
        return fit
    fit._mu, fit._sd = mu, sd
    X = _design((x - mu) / sd, degree)
    beta, r2 = _wls_r2(X, y, np.ones((1, n)))
    fit.r2 = float(r2[0])
    fit.adj_r2 = float(1 - (1 - r2[0]) * (n - 1) / (n - degree - 1)) if n > degree + 1 else math.nan
    fit.coef = list(np.polyfit(x, y, degree)[::-1].astype(float))
    # Leave one cluster out: fit without it, predict its points.
    codes = pd.factorize(clusters)[0]
    Wl = (codes[None, :] != np.arange(k)[:, None]).astype(float)
    bl, _ = _wls_r2(X, y, Wl)
    pred = np.einsum("ij,ij->i", X, bl[codes])
    sst = ((y - y.mean()) ** 2).sum()
    fit.r2_loco = float(1 - ((y - pred) ** 2).sum() / sst) if sst > 0 else math.nan
    W = weights if weights is not None else cluster_weights(clusters, n_boot, np.random.default_rng(seed))
    bb, rb = _wls_r2(X, y, W)
    q = (1 - level) / 2
    fit.r2_low, fit.r2_high = (float(v) for v in np.nanquantile(rb, [q, 1 - q]))
    fit._boot = bb
    if degree == 1:
        slopes = bb[:, 1] / sd
        fit.slope_low, fit.slope_high = (float(v) for v in np.nanquantile(slopes, [q, 1 - q]))
    return fit


# ---------------------------------------------------------------------------------------- mixed models


def _pairs(levels: list[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(levels, 2))


# ---------------------------------------------------------------------------------------- fronts


def pareto_front(x, y) -> np.ndarray:
    """Mask of the points no other point beats on both x and y (both maximised)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.ones(len(x), bool)
    for i in range(len(x)):
        dominated = (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        keep[i] = not dominated.any() and np.isfinite(x[i]) and np.isfinite(y[i])
    return keep


def verdict(
    low: float, high: float, p_holm: float | None, underpowered: str = "", alpha: float = ALPHA
) -> str:
    """How a difference is to be read: 'underpowered', 'noise' (CI includes 0 or p ≥ α) or 'difference'."""
    if underpowered:
        return "underpowered"
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 <= high:
        return "noise"
    if p_holm is not None and (not np.isfinite(p_holm) or p_holm >= alpha):
        return "noise"
    return "difference"
