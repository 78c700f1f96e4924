"""Item-level method effects with the right replicated units: cells (training runs) and items.

    from study.stats.items import effects_vs_reference
    effects_vs_reference(df)   # df: method, cell, item, y (the reference's rows have method "base")

Every adapter and the base answer the same items, so the data of one method are a cells x items matrix of
per-item differences from the base, d[c, i] = y[c, i] - y_base[i] (item difficulty cancels: the pairing). Two
sources of uncertainty cross in that matrix: the cell (a training run deviates as a whole, on all its items)
and the item (this item sample, and the base's own per-item error, shift every cell alike). A crossed item x
seed model with item-level residuals misses the first: it counted items as replicates of the method and
rejected 10-20 % of the time under the null (issue 10). The method's mean difference has the variance of a
grand mean in a two-way crossed random design (cells x items, one value per pair), estimated unbiasedly as

    v = v_cell + v_item,  v_cell = MS_cell / (C n)  (the spread of the C cells' means: C - 1 df),
                          v_item = max(MS_item - MS_res, 0) / (C n)  (the shared item part: ~n df).

The interval is the fiducial (generalized pivotal) one for that sum: est ± q sqrt(v), q the 1 - alpha/2
quantile of Z sqrt((1 - r) (C - 1) / chi2_{C-1} + r), r = v_item / v: t on C - 1 df for the cells' part, normal
for the nearly known item part, mixed by their shares (computed by quadrature; p-values from the same
distribution; `df` reports the t df with the same quantile). r = 0 gives exactly the t-interval over cells
(exact under normal cell deviations of any size), r = 1 the normal interval over items.

Measured (python -m study.stats.calibrate; type-I of the 95 % interval, 3,000 studies each, MC SE 0.004, over
binary and continuous item scores, 3 and 5 seeds, 60 / 200 items, one suite or the mean of 3 suites, seed SD
0 / 0.03 / 0.1 of the score scale):
- t on C - 1 df for the whole v (used up to this change): 0.000-0.051, 0.001-0.006 with 3 seeds when items
  matter; a planted forgetting of 0.1 found in 25 % of default studies (3 seeds, 3 x 60 binary items).
- this interval: 0.021-0.054 (never above alpha + 1 MC SE), the same plant found in 48 %. Lowest when the
  seeds do not differ at all (0.02-0.03 with 3 seeds): their 2-df variance is then pure item noise, which no
  rule calibrated at every seed SD can tell from a real seed part.
- Satterthwaite df for v: 0.045-0.089, liberal (a by-chance small cell variance is exactly when its df grows),
  rejected; MOVER (half-width sqrt((t_{C-1} se_cell)^2 + (z se_item)^2)): 0.021-0.054, always at or below this.
- item model (4 methods x 3 cells x 40 items, Holm): family-wise 0.016 / 0.022 / 0.043 at cell SD 0 / 0.1 /
  0.2 (t on C - 1: 0.000 at all three), power on the planted method 0.96 (was 0.91).
tests/test_calibration.py asserts these bounds with fewer simulations.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pandas as pd

from study.stats.core import ALPHA, holm, t_interval

COLUMNS = [
    "method",
    "est",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "df",
    "n_cells",
    "n_items",
    "n_obs",
    "sd_item",
    "sd_cell",
    "model",
]
MODEL = "y - base y per item; cells x items crossed variance, fiducial t(cells - 1) + normal(items) interval"


_NODES = 2000  # equal-probability quadrature nodes over chi2_{C-1}
_GRID = np.linspace(0.0, 1.0, 401)  # r = v_item / v


@cache
def _chi2_nodes(dof: int) -> np.ndarray:
    from scipy import stats as st

    return st.chi2.ppf((np.arange(_NODES) + 0.5) / _NODES, dof) / dof


def mix_tail(h, r, dof: int) -> np.ndarray:
    """P(|Z sqrt((1 - r) / W + r)| > h), W = chi2_dof / dof: the two-sided tail of the fiducial pivot."""
    from scipy import stats as st

    h, r = np.broadcast_arrays(np.asarray(h, float), np.asarray(r, float))
    s = np.sqrt((1 - r)[..., None] / _chi2_nodes(dof) + r[..., None])
    return 2 * st.norm.sf(h[..., None] / s).mean(-1)


@cache
def _mix_table(dof: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The pivot's 1 - alpha/2 quantile at every r of _GRID (bisection) and its equivalent t df."""
    from scipy import stats as st

    lo, hi = np.zeros_like(_GRID), np.full_like(_GRID, 1e3)
    for _ in range(60):
        mid = (lo + hi) / 2
        big = mix_tail(mid, _GRID, dof) > 1 - level
        lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
    q = (lo + hi) / 2
    a, b = np.full_like(q, math.log(dof)), np.full_like(q, math.log(1e6))
    for _ in range(60):  # t df with the same quantile (1e6: the normal's)
        mid = (a + b) / 2
        wide = st.t.ppf(0.5 + level / 2, np.exp(mid)) > q
        a, b = np.where(wide, mid, a), np.where(wide, b, mid)
    return q, np.exp((a + b) / 2)


def mix_quantile(r, dof: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(quantile, equivalent t df) of the pivot at share r of the normal part (interpolated in r)."""
    q, df = _mix_table(int(dof), float(level))
    r = np.clip(np.asarray(r, float), 0.0, 1.0)
    return np.interp(r, _GRID, q), np.exp(np.interp(r, _GRID, np.log(df)))


def crossed_parts(D) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(est, v_cell, v_item, item Satterthwaite denominator, C) of (..., C, n) matrices or a list of them."""
    Ds = [np.asarray(d, float) for d in (D if isinstance(D, (list, tuple)) else [D])]
    K = len(Ds)
    C = Ds[0].shape[-2]
    est = sum(d.mean((-2, -1)) for d in Ds) / K
    cell_means = sum(d.mean(-1) for d in Ds) / K  # (..., C): each cell's mean over items and suites
    # The cells' part: the variance of the cells' means (it already holds their items' residual noise).
    v_cell = cell_means.var(-1, ddof=1) / C if C > 1 else np.zeros(est.shape)
    v_item, den = np.zeros(est.shape), np.zeros(est.shape)
    for d in Ds:
        n = d.shape[-1]
        if n < 2:
            continue
        col = d.mean(-2)
        ms_i = C * col.var(-1, ddof=1)
        if C > 1:
            resid = d - d.mean(-1)[..., None] - col[..., None, :] + d.mean((-2, -1))[..., None, None]
            ms_e = (resid**2).sum((-2, -1)) / ((C - 1) * (n - 1))
        else:  # one cell: its items are the only replicates, and their spread is the whole item part
            ms_e = np.zeros(est.shape)
        w = 1.0 / (C * n * K * K)
        keep = ms_i > ms_e  # a negative item-component estimate adds nothing (MS_cell holds the residual)
        v_item = v_item + np.where(keep, w * (ms_i - ms_e), 0.0)
        den = den + np.where(
            keep, (w * ms_i) ** 2 / (n - 1) + ((w * ms_e) ** 2 / ((C - 1) * (n - 1)) if C > 1 else 0.0), 0.0
        )
    return est, v_cell, v_item, den, C


def crossed_mean_t(D, level: float = 0.95) -> tuple[np.ndarray, ...]:
    """(est, low, high, p, df) of the grand mean of (..., C cells, n items) matrices, vectorised over the
    leading axes (simulations): the crossed cells x items variance and the fiducial interval above (`df`: the
    t df with the same quantile; one cell: Satterthwaite over the items). `D` may also be a list of K such
    matrices with the same cells and their own items (suites): the estimate is then the mean over the K grand
    means, the cells' deviations shared by all K."""
    from scipy import stats as st

    est, v_cell, v_item, den, C = crossed_parts(D)
    v = v_cell + v_item
    se = np.sqrt(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        if C < 2:
            df = np.where((v > 0) & (den > 0), v**2 / den, np.nan)
            p = 2 * st.t.sf(np.abs(est / se), df)
            lo, hi = t_interval(est, se, df, level)
            return est, lo, hi, p, df
        r = np.where(v > 0, v_item / v, 0.0)
        q, df = mix_quantile(r, C - 1, level)
        p = np.where(v > 0, mix_tail(np.abs(est) / se, r, C - 1), np.where(est == 0, 1.0, 0.0))
    return est, est - q * se, est + q * se, p, df


def effects_vs_reference(
    d: pd.DataFrame, reference: str = "base", level: float = 0.95, alpha: float = ALPHA
) -> pd.DataFrame:
    """Each method's effect against the reference on one outcome (columns method, cell, item, y).

    Cells' per-item differences from the reference are averaged over the items both answered; the method
    estimate and its t-interval are over its cells; p-values are Holm-corrected over the methods."""
    ref = d[d["method"] == reference].groupby("item")["y"].mean()
    methods = [m for m in dict.fromkeys(d["method"]) if m != reference]
    if ref.empty or not methods:
        return pd.DataFrame(columns=COLUMNS)
    a = d[d["method"] != reference]
    a = a[a["item"].isin(ref.index)]
    a = a.assign(diff=a["y"].to_numpy(float) - ref.reindex(a["item"]).to_numpy(float))
    sd_item = float(d.groupby("item")["y"].mean().std(ddof=1)) if d["item"].nunique() > 1 else math.nan
    rows = []
    for m in methods:
        # cells x items; items some cell did not answer are left out (the crossed variance needs a full matrix)
        D = (
            a[a["method"] == m]
            .pivot_table(index="cell", columns="item", values="diff", aggfunc="mean")
            .dropna(axis=1)
        )
        if D.empty:
            continue
        est, lo, hi, p, df = (float(v) for v in crossed_mean_t(D.to_numpy(float), level))
        sd_cell = float(D.mean(1).std(ddof=1)) if len(D) > 1 else math.nan
        rows.append([m, est, lo, hi, p, df, D.shape[0], D.shape[1], int(D.size), sd_item, sd_cell, MODEL])
    out = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "p_holm"])
    out.insert(5, "p_holm", holm(out["p"]))
    return out
