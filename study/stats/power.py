"""Minimum detectable effects of the protocol's primary outcomes, before any training.

    study power protocols/default.yaml      # prints the table, writes results/<protocol>/power.json

The test a primary gets in the report: cells of method a and b paired by seed, the per-seed difference of
their cell means (sweep points averaged), a paired t over seeds (df = seeds − 1), at alpha / m where m is the
number of primaries × comparisons (Holm's first step, the strictest; later steps are easier). A cell's value
varies by sd_cell² = sd_seed² + sd_item² / n_items (training-run luck, plus the item sample it is measured on).
The MDE at 80 % power solves power(δ) = 0.8 under the noncentral t (integrated with scipy), exact for normal cell
deviations; tests/test_calibration.py simulates the test at the MDE and finds ~80 %.

sd_item is measured where it can be (the base's per-item scores in the run folder, `item_sd=`), else a stated
prior below; sd_seed is always a prior until a pilot run exists. Each row says which.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study.stats.core import ALPHA

# Stated priors (per item SD of the outcome's paired per-item difference; SD between seeds of a cell's value).
# forgetting: 0/1 items, base accuracy p ~ 0.5, base-adapter agreement correlation 0.8 on the same item:
# sqrt(2 p (1 - p) (1 - 0.8)) = 0.32. Seed SDs: guesses of the spread between training runs, in the
# outcome's own units, to be replaced by a pilot's measured values.
PRIORS = {
    "forgetting": {"item_sd": 0.32, "seed_sd": 0.01},
    "newtask": {"item_sd": 0.40, "seed_sd": 0.05},
    "persona": {"item_sd": 0.30, "seed_sd": 0.05},
    "kl": {"item_sd": 0.50, "seed_sd": 0.10},
    "emergence": {"item_sd": 0.40, "seed_sd": 0.05},
}
DEFAULT_PRIMARY = [{"metric": "forgetting/mean", "task": None, "contrast": ["grpo", "sft"]}]
COLUMNS = [
    "metric",
    "task",
    "a",
    "b",
    "seeds",
    "points_a",
    "points_b",
    "n_items",
    "sd_item",
    "sd_seed",
    "sd_cell",
    "m_tests",
    "alpha_each",
    "mde",
    "mde_cell_sd",
    "source",
    "note",
]


def power_paired_t(delta, sd_diff, n, alpha_each: float) -> float:
    """Power of the two-sided paired t over n seeds for a true mean difference delta: the noncentral t's
    tails, integrated over the chi-square of the variance estimate (`scipy.integrate.quad`; scipy's `nct`
    returns NaN or inaccurate values in the far tails that small df and Bonferroni alphas reach)."""
    from scipy import integrate
    from scipy import stats as st

    df = n - 1
    crit = st.t.ppf(1 - alpha_each / 2, df)
    ncp = float(delta) / (sd_diff / math.sqrt(n))

    def reject(v):  # P(|Z + ncp| > crit sqrt(v / df)) given the chi-square draw v
        c = crit * math.sqrt(v / df)
        return (st.norm.sf(c - ncp) + st.norm.cdf(-c - ncp)) * st.chi2.pdf(v, df)

    return float(integrate.quad(reject, 0, np.inf, limit=200)[0])


def mde(sd_diff: float, n: int, alpha_each: float, power: float = 0.8) -> float:
    """Smallest true difference found with the given power by the paired t over n seeds (sd_diff: the SD of
    one seed's difference). inf with fewer than 2 seeds."""
    from scipy.optimize import brentq

    if n < 2 or not sd_diff > 0:
        return math.inf if n < 2 else 0.0
    f = lambda d: power_paired_t(d, sd_diff, n, alpha_each) - power  # noqa: E731
    hi = sd_diff
    while f(hi) < 0:
        hi *= 2
    return float(brentq(f, 0.0, hi, xtol=1e-10 * sd_diff))


def _family(metric: str) -> str:
    return metric.split("/")[0]


def power_table(
    primaries: list[dict],
    sizes: dict,
    item_sd: dict[str, float] | None = None,
    priors: dict | None = None,
    alpha: float = ALPHA,
    power: float = 0.8,
) -> pd.DataFrame:
    """One row per primary: its MDE at `power`. `sizes`: {"seeds": int, "points": {method: sweep points},
    "items": {metric family or metric: n items}}; `item_sd`: measured per-item SDs (metric or family ->
    SD) overriding the priors. A primary's metric may carry a `@qualifier` (e.g. `@matched`): sized as the
    metric itself."""
    priors = priors or PRIORS
    item_sd = item_sd or {}
    m = max(1, len(primaries))
    rows = []
    for p in primaries:
        metric = str(p["metric"])
        base_metric = metric.split("@")[0]
        fam = _family(base_metric)
        prior = priors.get(fam, {"item_sd": math.nan, "seed_sd": math.nan})
        a, b = (str(c) for c in p.get("contrast", ["grpo", "sft"]))
        pa, pb = (sizes.get("points", {}).get(c) for c in (a, b))
        notes = [f"{c} not in the protocol" for c, n in ((a, pa), (b, pb)) if n is None]
        pa, pb = pa or 1, pb or 1
        n_items = sizes.get("items", {}).get(base_metric) or sizes.get("items", {}).get(fam) or 0
        measured = item_sd.get(base_metric, item_sd.get(fam))
        sdi = measured if measured is not None else prior["item_sd"]
        sds = prior["seed_sd"]
        sd_cell = math.sqrt(sds**2 + (sdi**2 / n_items if n_items else 0.0))
        if not n_items:
            notes.append("item count unknown: seed variation only")
        sd_diff = sd_cell * math.sqrt(1 / pa + 1 / pb)
        seeds = int(sizes.get("seeds", 0))
        d = mde(sd_diff, seeds, alpha / m, power)
        if seeds < 2:
            notes.append("fewer than 2 seeds: no test")
        rows.append(
            [
                metric,
                p.get("task"),
                a,
                b,
                seeds,
                pa,
                pb,
                n_items,
                sdi,
                sds,
                sd_cell,
                m,
                alpha / m,
                d,
                d / sd_cell if sd_cell else math.nan,
                "item SD measured on the base, seed SD prior" if measured is not None else "prior",
                "; ".join(notes),
            ]
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def protocol_sizes(proto) -> tuple[list[dict], dict]:
    """(primaries, sizes) read from a protocol object by attribute (works before and after the protocol gets
    its `primary:` list; without it, DEFAULT_PRIMARY on the first task)."""

    def get(obj, *names, default=None):
        for n in names:
            obj = getattr(obj, n, None) if not isinstance(obj, dict) else obj.get(n)
            if obj is None:
                return default
        return obj

    tasks = [get(t, "name") for t in get(proto, "tasks", default=[])]
    primaries = []
    for p in getattr(proto, "primary", None) or DEFAULT_PRIMARY:
        p = p if isinstance(p, dict) else (p.model_dump() if hasattr(p, "model_dump") else vars(p))
        primaries.append(p | {"task": p.get("task") or (tasks[0] if tasks else None)})
    points = {}
    for method, spec in (get(proto, "methods", default={}) or {}).items():
        sweep = get(spec, "sweep", default={}) or {}
        points[str(getattr(method, "value", method))] = (
            int(np.prod([len(v) for v in sweep.values()])) if sweep else 1
        )
    limits = get(proto, "regression", "limit", default={}) or {}
    suites = [str(s) for s in get(proto, "regression", "suites", default=[]) or [] if str(s) != "humaneval"]
    per_suite = [limits.get(s) for s in suites]
    items = {}
    if per_suite and all(per_suite):
        # mean over K suites of per-suite means: Var = sd² Σ 1/n_k / K², i.e. an effective n = K² / Σ 1/n_k
        items["forgetting"] = int(len(per_suite) ** 2 / sum(1 / n for n in per_suite))
        items |= {f"forgetting/{s}": n for s, n in zip(suites, per_suite, strict=True)}
    kl_n = get(proto, "kl", "n_prompts")
    if kl_n:
        items["kl"] = int(kl_n)
    nt = get(proto, "newtask", "limit")
    if nt:
        items["newtask"] = items["persona"] = int(nt)
    return primaries, {"seeds": len(get(proto, "seeds", default=[]) or []), "points": points, "items": items}
