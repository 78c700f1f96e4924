"""Forgetting at matched new-task success: RL's Razor's comparison. Each method's cells (sweep points and
checkpoints, per seed) trace a frontier of (new-task success, forgetting); the prior-task score is read off
each seed's frontier at one target success by linear interpolation, and methods are compared there.

    from study.report.matched import matched_comparison
    matched_comparison(points, target=None, reference="sft")   # points: method, seed, success, forgetting

Decisions, and why:
- The unit is the seed (one training trajectory / sweep per method and seed): points of one seed are not
  independent, so each seed contributes one interpolated value, and intervals are t intervals over seeds
  (Welch's for a difference of two methods). Checked by simulation in tests/test_matched.py: with identical
  frontiers the difference's 95% CI excludes 0 in ~5% of studies; a planted shift is found.
- A seed whose frontier does not reach the target (success outside its range) gives no value: no
  extrapolation. The default target is the middle of the success range that every method's seeds span, so
  each method is read where it has data; `n` in the result says how many seeds reached it.
- Along one seed, points are ordered by success and forgetting is interpolated between neighbours; ties in
  success are averaged.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

COLUMNS = ["method", "target", "value", "ci_low", "ci_high", "n", "diff", "diff_low", "diff_high", "p"]


def interpolate(success: np.ndarray, forgetting: np.ndarray, target: float) -> float:
    """Forgetting at `target` success along one frontier (NaN outside its range)."""
    df = pd.DataFrame({"s": success, "f": forgetting}).dropna().groupby("s", as_index=False)["f"].mean()
    if df.empty or not (df.s.min() <= target <= df.s.max()):
        return math.nan
    return float(np.interp(target, df.s.to_numpy(), df.f.to_numpy()))


def default_target(points: pd.DataFrame) -> float:
    """The middle of the success range covered by every method (by the per-seed ranges' medians)."""
    spans = points.groupby(["method", "seed"]).success.agg(["min", "max"]).groupby("method").median()
    lo, hi = spans["min"].max(), spans["max"].min()
    return float((lo + hi) / 2) if lo <= hi else math.nan


def per_seed(points: pd.DataFrame, target: float) -> pd.DataFrame:
    rows = [
        {"method": m, "seed": s, "value": interpolate(g.success.to_numpy(), g.forgetting.to_numpy(), target)}
        for (m, s), g in points.groupby(["method", "seed"])
    ]
    return pd.DataFrame(rows, columns=["method", "seed", "value"])


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan, math.nan
    m, se = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
    h = stats.t.ppf(0.5 + level / 2, len(x) - 1) * se
    return float(m), float(m - h), float(m + h)


def welch(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(a - b, CI low, CI high, p) with Welch's degrees of freedom; NaN when either side has < 2 values."""
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    diff = float(a.mean() - b.mean())
    if se == 0:
        return diff, diff, diff, (1.0 if diff == 0 else 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    h = stats.t.ppf(0.5 + level / 2, df) * se
    return diff, diff - h, diff + h, float(2 * stats.t.sf(abs(diff) / se, df))


def matched_comparison(
    points: pd.DataFrame, target: float | None = None, reference: str = "sft", level: float = 0.95
) -> pd.DataFrame:
    """Per method: forgetting at the target success (mean over seeds, t CI) and its difference from the
    reference method (Welch CI and p). `points`: columns method, seed, success, forgetting."""
    target = default_target(points) if target is None else target
    out = []
    if math.isnan(target):
        return pd.DataFrame(columns=COLUMNS)
    seeds = per_seed(points, target)
    ref = seeds[seeds.method == reference].value.to_numpy(float)
    for method, g in seeds.groupby("method", sort=False):
        x = g.value.to_numpy(float)
        value, lo, hi = t_interval(x, level)
        d = welch(x, ref, level) if method != reference else (math.nan,) * 4
        out.append(
            {
                "method": method,
                "target": target,
                "value": value,
                "ci_low": lo,
                "ci_high": hi,
                "n": int((~np.isnan(x)).sum()),
                "diff": d[0],
                "diff_low": d[1],
                "diff_high": d[2],
                "p": d[3],
            }
        )
    return pd.DataFrame(out)
