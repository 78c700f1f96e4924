"""Item-level method effects with the right replicated units: cells (training runs) and items.

    from study.stats.items import effects_vs_reference
    effects_vs_reference(df)   # df: method, cell, item, y (the reference's rows have method "base")

Every adapter and the base answer the same items, so the data of one method are a cells x items matrix of
per-item differences from the base, d[c, i] = y[c, i] - y_base[i] (item difficulty cancels: the pairing). Two
sources of uncertainty cross in that matrix: the cell (a training run deviates as a whole, on all its items)
and the item (this item sample, and the base's own per-item error, shift every cell alike). A crossed item x
seed model with item-level residuals misses the first: it counted items as replicates of the method and
rejected 10-20 % of the time under the null (issue 10). Here the method's mean difference gets the variance of
a grand mean in a two-way crossed random design (cells x items, one value per pair):

    Var = [MS_cell + max(MS_item - MS_res, 0)] / (C n)     (unbiased; MS_cell already holds the residual)

on the cells' C - 1 degrees of freedom (Satterthwaite's df was tried and rejected: with 3 cells it was liberal,
7 % per test under the null at cell SD 0.2, because a by-chance small cell variance is exactly when its df
grows). With no item component this is exactly the t-interval over cells, exact under normal cell deviations
of any size; the item component only widens it. tests/test_calibration.py checks
the family-wise rate (Holm over methods) under the null at cell SD 0, 0.1 and 0.2 and the power on a plant.
"""

from __future__ import annotations

import math

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
MODEL = "y - base y per item; cells x items crossed variance, t on df = cells - 1"


def crossed_mean_t(D, level: float = 0.95) -> tuple[np.ndarray, ...]:
    """(est, low, high, p, df) of the grand mean of (..., C cells, n items) matrices, vectorised over the
    leading axes (simulations): the crossed cells x items variance above, df = C − 1 (one cell: Satterthwaite
    over the items). `D` may also be a
    list of K such matrices with the same cells and their own items (suites): the estimate is then the mean
    over the K grand means, the cells' deviations shared by all K."""
    from scipy import stats as st

    Ds = [np.asarray(d, float) for d in (D if isinstance(D, (list, tuple)) else [D])]
    K = len(Ds)
    C = Ds[0].shape[-2]
    est = sum(d.mean((-2, -1)) for d in Ds) / K
    cell_means = (
        sum(d.mean(-1) for d in Ds) / K
    )  # (..., C): each cell's mean over items, averaged over suites
    # The cells' part: the variance of the cells' means (it already holds their items' residual noise).
    v_cell = cell_means.var(-1, ddof=1) / C if C > 1 else np.zeros(est.shape)
    v, den = v_cell.copy(), (v_cell**2 / (C - 1) if C > 1 else np.zeros(est.shape))
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
        keep = (
            ms_i > ms_e
        )  # a negative item-component estimate adds nothing (MS_cell already holds the residual)
        v = v + np.where(keep, w * (ms_i - ms_e), 0.0)
        den = den + np.where(
            keep, (w * ms_i) ** 2 / (n - 1) + ((w * ms_e) ** 2 / ((C - 1) * (n - 1)) if C > 1 else 0.0), 0.0
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        # df: the cells' own (C − 1). Satterthwaite's df was liberal here (7 % per test at cell SD 0.2 with 3
        # cells): when the cells' variance is underestimated by chance, its df balloons exactly then. One cell:
        # the items are the only replicates, Satterthwaite over the item terms.
        df = np.where((v > 0) & (den > 0), v**2 / den, np.nan) if C < 2 else np.full(np.shape(est), C - 1.0)
        se = np.sqrt(v)
        p = 2 * st.t.sf(np.abs(est / se), df)
    lo, hi = t_interval(est, se, df, level)
    return est, lo, hi, p, df


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
