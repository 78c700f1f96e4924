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

with Satterthwaite's degrees of freedom; with no item component it is exactly the t-interval over cells
(df = C - 1), exact under normal cell deviations of any size, zero included. tests/test_calibration.py checks
the family-wise rate (Holm over methods) under the null at cell SD 0, 0.1 and 0.2 and the power on a plant.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study.stats.core import ALPHA, holm, t_interval

COLUMNS = ["method", "est", "ci_low", "ci_high", "p", "p_holm", "df", "n_cells", "n_items", "n_obs", "sd_item",
           "sd_cell", "model"]
MODEL = "y - base y per item; cells x items crossed variance, t with Satterthwaite df"


def crossed_mean_t(D: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, ...]:
    """(est, low, high, p, df) of the grand mean of (..., C cells, n items) matrices, vectorised over the
    leading axes (simulations): the crossed cells x items variance above, Satterthwaite df."""
    from scipy import stats as st

    D = np.asarray(D, float)
    C, n = D.shape[-2:]
    est = D.mean((-2, -1))
    if C * n < 2 or n < 2 and C < 2:
        nan = np.full(est.shape, np.nan)
        return est, nan, nan, nan, nan
    row, col = D.mean(-1), D.mean(-2)
    ms_c = n * row.var(-1, ddof=1) if C > 1 else np.zeros(est.shape)
    ms_i = C * col.var(-1, ddof=1) if n > 1 else np.zeros(est.shape)
    if C > 1 and n > 1:
        resid = D - row[..., None] - col[..., None, :] + est[..., None, None]
        ms_e = (resid**2).sum((-2, -1)) / ((C - 1) * (n - 1))
    else:  # one cell (or one item): its items (cells) are the only replicates
        ms_e = np.zeros(est.shape)
    item = np.maximum(ms_i - ms_e, 0.0)
    v = ms_c + item
    with np.errstate(divide="ignore", invalid="ignore"):
        # Satterthwaite: v = ms_c + ms_i - ms_e where the item component is kept, else ms_c alone.
        den = np.where(item > 0, _sq(ms_c, C - 1) + _sq(ms_i, n - 1) + _sq(ms_e, (C - 1) * (n - 1)), _sq(ms_c, C - 1))
        df = np.where(v > 0, v**2 / den, np.nan)
        se = np.sqrt(v / (C * n))
        p = 2 * st.t.sf(np.abs(est / se), df)
    lo, hi = t_interval(est, se, df, level)
    return est, lo, hi, p, df


def _sq(ms, df):
    return ms**2 / df if df > 0 else np.zeros(np.shape(ms))


def effects_vs_reference(d: pd.DataFrame, reference: str = "base", level: float = 0.95,
                         alpha: float = ALPHA) -> pd.DataFrame:
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
        D = a[a["method"] == m].pivot_table(index="cell", columns="item", values="diff", aggfunc="mean").dropna(axis=1)
        if D.empty:
            continue
        est, lo, hi, p, df = (float(v) for v in crossed_mean_t(D.to_numpy(float), level))
        sd_cell = float(D.mean(1).std(ddof=1)) if len(D) > 1 else math.nan
        rows.append([m, est, lo, hi, p, df, D.shape[0], D.shape[1], int(D.size), sd_item, sd_cell, MODEL])
    out = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "p_holm"])
    out.insert(5, "p_holm", holm(out["p"]))
    return out
