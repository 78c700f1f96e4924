"""The forgetting law within methods: does forgetting track the predictor (forward KL) inside each method, or
only because four methods differ in both?

    from study.stats.law import within_law
    within_law(x, y, method, cell)   # points: every checkpoint and sweep point of every cell

A pooled fit over four methods rests on four clusters: a method-level confound (a method that both drifts
more and forgets more, for any reason) gives a high pooled R² with no relation inside any method (issue 10:
P(R² > 0.33) = 30 % under such a confound). Here:
- the unit is the cell: a cell's checkpoints share one training run and move together along training (x and
  y both grow with the step whatever the mechanism), so each cell enters with its mean over its checkpoints;
  the sweep points give each method many cells. (Cluster-robust errors on the raw points were tried and were
  liberal: 8.5 % false laws at alpha 5 % with 36 clusters.)
- the slope is estimated with method fixed effects (y ~ x + C(method), statsmodels OLS on the cell means), so
  only variation within methods counts; classical t on the residual df (cells − methods − 1), exact for
  normal cell deviations;
- the within-method R² is that fit's partial R² = b² Sxx / Syy (cell means demeaned within methods), and its
  interval maps the slope's interval through the same formula (monotone in |b|): its lower bound is 0 exactly
  when the slope's interval covers 0, so "a law" is claimed only when the slope test rejects;
- leave-one-method-out R²: a pooled line fitted on the other methods predicts each method's points in turn
  (does the law carry to a method it has not seen?).
tests/test_calibration.py: under a method-level confound P(r2_low > 0) stays within alpha + MC error; a
planted within-method slope is found.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from study.stats.core import ALPHA

COLUMNS = [
    "slope",
    "slope_low",
    "slope_high",
    "p",
    "df",
    "r2_within",
    "r2_low",
    "r2_high",
    "r2_lomo",
    "n",
    "n_cells",
    "n_methods",
    "note",
]


def _demean(v: np.ndarray, codes: np.ndarray) -> np.ndarray:
    means = np.bincount(codes, v) / np.bincount(codes)
    return v - means[codes]


def lomo_r2(x, y, method) -> float:
    """Leave-one-method-out predictive R² of the pooled linear law (1 − SSE / SST around the grand mean)."""
    x, y, method = np.asarray(x, float), np.asarray(y, float), np.asarray(method)
    pred = np.full(len(y), np.nan)
    for m in np.unique(method):
        out = method == m
        if np.ptp(x[~out]) == 0:
            return math.nan
        pred[out] = np.polyval(np.polyfit(x[~out], y[~out], 1), x[out])
    sst = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - pred) ** 2).sum() / sst) if sst > 0 else math.nan


def within_law(x, y, method, cell, level: float = 0.95) -> dict:
    """The within-method law (see the module docstring); a dict of COLUMNS, NaN with a note when it cannot
    be fitted (fewer than 3 cells, or no variation of the predictor within methods)."""
    import statsmodels.formula.api as smf

    d = pd.DataFrame(
        {
            "x": np.asarray(x, float),
            "y": np.asarray(y, float),
            "method": np.asarray(method),
            "cell": np.asarray(cell),
        }
    ).dropna()
    out = dict.fromkeys(COLUMNS, math.nan) | {
        "n": len(d),
        "n_cells": d["cell"].nunique(),
        "n_methods": d["method"].nunique(),
        "note": "",
    }
    codes = pd.factorize(d["method"])[0]
    xd, yd = _demean(d["x"].to_numpy(), codes), _demean(d["y"].to_numpy(), codes)
    sxx, syy = float((xd**2).sum()), float((yd**2).sum())
    if out["n_cells"] < 3 or sxx <= 1e-12 * max(1.0, float((d["x"] ** 2).sum())) or syy == 0:
        out["note"] = "too few cells, or no variation within methods"
        return out
    formula = "y ~ x + C(method)" if out["n_methods"] > 1 else "y ~ x"
    cells = d.groupby(["method", "cell"], sort=False)[["x", "y"]].mean().reset_index()
    codes = pd.factorize(cells["method"])[0]
    xd, yd = _demean(cells["x"].to_numpy(), codes), _demean(cells["y"].to_numpy(), codes)
    sxx, syy = float((xd**2).sum()), float((yd**2).sum())
    if len(cells) - out["n_methods"] - 1 < 1 or sxx == 0 or syy == 0:
        out["note"] = "too few cells for the method fixed effects"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = smf.ols(formula, cells).fit()
    b = float(res.params["x"])
    lo, hi = (float(v) for v in res.conf_int(alpha=1 - level).loc["x"])
    r2 = lambda s: min(1.0, s * s * sxx / syy)  # noqa: E731 — the partial R² of a slope s
    covers0 = lo <= 0 <= hi
    out |= {
        "slope": b,
        "slope_low": lo,
        "slope_high": hi,
        "p": float(res.pvalues["x"]),
        "df": float(res.df_resid),
        "r2_within": r2(b),
        "r2_low": 0.0 if covers0 else min(r2(lo), r2(hi)),
        "r2_high": max(r2(lo), r2(hi)),
        "r2_lomo": lomo_r2(d["x"], d["y"], d["method"]) if out["n_methods"] > 1 else math.nan,
        "note": "cell means; method fixed effects; t on cells - methods - 1 df",
    }
    return out


def law_reported(fit: dict, alpha: float = ALPHA) -> bool:
    """A law is claimed when the within-method slope's test rejects (equivalently r2_low > 0)."""
    return bool(np.isfinite(fit["p"]) and fit["p"] < alpha)
