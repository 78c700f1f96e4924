"""Paired forgetting intervals and floor checks, from per-item records.

    from study.stats.forgetting import paired_forgetting, align_items, floor_flag

Forgetting on a suite = base score − adapter score. Base and adapter answer the same items, so the interval
comes from the per-item differences (pairing removes item difficulty, which dominates the variance of either
score alone; treating the two scores as independent, as the stage CIs did, overstates the width for one cell
and, over cells, the seeds alone were counted, not the items).

- One cell: a bootstrap over items of the mean paired difference (items resampled within each suite for a
  mean over suites).
- Several cells (the seeds of one method, same items): seeds and items are crossed, so the interval is the
  crossed cells x items one of `study.stats.items.crossed_mean_t`: seed variance + item-sampling variance,
  the seeds' part on t(seeds − 1), the nearly known item part normal (a fiducial mix; items.py has the
  numbers). With t on seeds − 1 for the whole variance (before) the type-I rate was 0.000-0.013 with 3 seeds
  (power wasted); now 0.025-0.045, and 0.037 in the default study (3 seeds, 3 suites x 60 binary items).
  A t-interval over the seeds' values alone (the report before) ignored the shared item sample: 0.054-0.114.
  A two-stage bootstrap (seeds, then items) is the alternative; with 3 seeds a percentile bootstrap over seeds
  resamples 3 values, so the bootstrap serves one cell only (`hierarchical_means`; calibrate measures both).
- `mean over suites`: a seed's adapter forgets on all suites at once, so the seed part is the spread of the
  seeds' suite-averaged forgetting; items vary within each suite. Suites flagged at floor are left out by
  the caller (`floor_flag`).

Per-item records as the regression stage writes them: `regression.json` has
`"items": {suite: [{"doc_id": int, "correct": 0|1, "p_gold": float|null}, ...]}` and each row a `"chance"`.
`align_items` turns the base's and the adapters' records into doc_id-aligned arrays.
"""

from __future__ import annotations

import math

import numpy as np

from study.stats.core import bootstrap_ci, wilson
from study.stats.items import crossed_mean_t


def align_items(
    base: list[dict], adapters: list[list[dict]], key: str = "correct"
) -> tuple[np.ndarray, np.ndarray]:
    """(base (n,), adapters (S, n)) over the items every record list has a finite `key` for, sorted by item.
    An item is (task, doc_id) when records carry a task (MMLU's doc_ids restart in every subject)."""

    def table(recs):
        return {
            (str(r.get("task", "")), int(r["doc_id"])): float(r[key])
            for r in recs
            if r.get(key) is not None and np.isfinite(r[key])
        }

    b = table(base)
    ads = [table(a) for a in adapters]
    ids = sorted(set(b).intersection(*ads)) if ads else sorted(b)
    return np.array([b[i] for i in ids]), np.array([[a[i] for i in ids] for a in ads]).reshape(
        len(ads), len(ids)
    )


def hierarchical_means(D: list[np.ndarray], n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot,) bootstrap replicates of mean over suites of mean over seeds and items of D[k] (S, n_k):
    seeds resampled once per replicate (shared by the suites), items within each suite."""
    rng = np.random.default_rng(seed)
    S = D[0].shape[0]
    seeds = rng.multinomial(S, np.full(S, 1 / S), size=n_boot) / S  # (B, S) seed weights
    reps = np.zeros(n_boot)
    for d in D:
        n = d.shape[1]
        items = rng.multinomial(n, np.full(n, 1 / n), size=n_boot) / n  # (B, n) item weights
        reps += np.einsum("bs,sn,bn->b", seeds, d, items, optimize=True)
    return reps / len(D)


def paired_forgetting(
    base, adapters, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(forgetting, low, high) = mean over seeds and items of base − adapter: the crossed seeds x items
    t-interval (one seed: a bootstrap over items). `base` (n,), `adapters` (S, n) or (n,), aligned by item."""
    return paired_forgetting_mean({"": (base, adapters)}, n_boot, seed, level)


def paired_forgetting_mean(
    suites: dict[str, tuple], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean over suites of forgetting, low, high); `suites[name] = (base (n,), adapters (S, n))`, the same S
    seeds in every suite."""
    D = []
    for base, adapters in suites.values():
        b = np.asarray(base, float)
        a = np.atleast_2d(np.asarray(adapters, float))
        if b.size == 0:
            continue
        D.append(b[None, :] - a)
    if not D:
        return (math.nan, math.nan, math.nan)
    est = float(np.mean([d.mean() for d in D]))
    if D[0].shape[0] >= 2:
        _, lo, hi, _, _ = crossed_mean_t(D, level)
        return (est, float(lo), float(hi))
    if len(D) == 1:
        lo, hi = bootstrap_ci(D[0][0], n_resamples=n_boot, seed=seed, level=level)
        return (est, lo, hi)
    reps = hierarchical_means(D, n_boot, seed)
    q = (1 - level) / 2
    return (est, float(np.quantile(reps, q)), float(np.quantile(reps, 1 - q)))


def floor_flag(scores, chance: float, level: float = 0.95) -> str:
    """`floor` when the base's score on a suite is within its CI of chance (a model at chance cannot lose
    what it never had: its forgetting is noise and stays out of the mean), `ceiling` when the CI reaches 1,
    else "". `scores`: the base's per-item 0/1 correctness (Wilson CI) or continuous scores (bootstrap CI)."""
    x = np.asarray(scores, float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return "no items"
    binary = np.isin(x, (0.0, 1.0)).all()
    lo, hi = wilson(int(x.sum()), len(x), level) if binary else bootstrap_ci(x, level=level)
    if lo <= chance:
        return "floor"
    if hi >= 1.0 - 1e-9:  # Wilson at k = n reaches 1 up to rounding
        return "ceiling"
    return ""
