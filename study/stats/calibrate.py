"""Null and planted-effect simulations of every statistic family, and the calibration file the report prints.

    python -m study.stats.calibrate            # = make calibrate; results/calibration/calibration.json
    python -m study.stats.calibrate --force    # rerun although study/stats has not changed
    python -m study.stats.calibrate --sims 200 # fewer simulations (quick look)

Each `sim_*` function simulates whole studies (numpy-vectorised where the statistic allows) and returns rows
{statistic, rule, quantity, rate, bound, ok, n_sims}: `rule` is `after` (the study.stats function the report
and the stages use) or `before` (a replica of the rule the code used up to commit 06540a4, so the gain is
measured, not asserted; each replica says what it copies). Type-I rows pass when the rate is at most
alpha + 3 binomial standard errors, sqrt(alpha (1 - alpha) / n_sims) (a correct rule fails this by chance
with probability ~0.1 %); power rows pass when the rate is at least the target minus 3 standard errors.
tests/test_calibration.py runs the same functions with fewer simulations and asserts those bounds.

The output is keyed by a hash of the study/stats sources: an unchanged package is not simulated again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from study.stats.core import ALPHA
from study.stats.forgetting import floor_flag
from study.stats.law import law_reported, within_law
from study.stats.mixed import mixed_contrasts
from study.stats.power import mde, power_paired_t
from study.stats.replicas import (  # noqa: F401  (re-exported: tests call them here)
    forgetting_after,
    forgetting_before,
    forgetting_bootstrap,
    forgetting_crossed_t,
    forgetting_satterthwaite,
    forgetting_truth,
    items_after,
    items_before,
    law_before,
    onset_after,
    onset_before,
    simulate_floor,
    simulate_forgetting,
    simulate_item_data,
    simulate_law,
    simulate_onset_data,
)

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[1] / "results" / "calibration" / "calibration.json"
# The latest run, shipped with the package (keyed by the same hash): a fresh clone's report shows the
# calibration of its own statistics code without simulating; `make calibrate` rewrites both files.
SHIPPED = HERE / "calibration.json"


def source_hash() -> str:
    """sha256 over the study/stats sources (names and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(HERE.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def mc_se(rate: float, n: int) -> float:
    return math.sqrt(rate * (1 - rate) / n)


def _row(statistic, rule, quantity, rate, n, target=ALPHA, kind="type-I") -> dict:
    if kind == "type-I":
        bound = target + 3 * mc_se(target, n)
        ok = rate <= bound
    else:
        bound = target - 3 * mc_se(target, n)
        ok = rate >= bound
    return {
        "statistic": statistic,
        "rule": rule,
        "quantity": quantity,
        "rate": float(rate),
        "bound": float(bound),
        "ok": bool(ok),
        "n_sims": int(n),
    }


# --------------------------------------------------------------------------------------------- onsets


def sim_onsets(n_sims: int = 2000, seed: int = 1) -> list[dict]:
    rows = []
    base, adapter, _ = simulate_onset_data(n_sims, seed)
    for rule, fn in (("before", onset_before), ("after", onset_after)):
        on = fn(base, adapter)
        rows.append(
            _row(
                "onsets",
                rule,
                "type-I: any false onset among 4 indicators x 3 looks",
                np.isfinite(on).any(1).mean(),
                n_sims,
            )
        )
    base, adapter, _ = simulate_onset_data(n_sims, seed + 1, shift=0.5)
    for rule, fn in (("before", onset_before), ("after", onset_after)):
        on = fn(base, adapter)
        rows.append(
            _row(
                "onsets",
                rule,
                "power: 0.5-SD onset planted at look 2 recovered at look 2",
                (on[:, 1] == 1).mean(),
                n_sims,
                0.8,
                "power",
            )
        )
    return rows


# ----------------------------------------------------------------------------------------- item model


def sim_items(n_sims: int = 1000, seed: int = 2) -> list[dict]:
    """Family-wise rate with Holm over the 4 methods: Holm rejects anything iff min p <= alpha / 4, so the
    rate is computed from the smallest p (statsmodels' multipletests costs ~0.1 s per call here, too slow for
    thousands of studies). Power: Bonferroni, alpha / 4 (a lower bound on Holm's). The old model is refitted
    on every study (~0.3 s each: 4,000 fits are most of make calibrate's ~20 min on a loaded 2-core machine)."""
    rows = []
    M = 4
    for k, cell_sd in enumerate((0.0, 0.1, 0.2)):
        base, y = simulate_item_data(n_sims, cell_sd, seed + k, methods=M)
        for rule, fn in (("before", items_before), ("after", items_after)):
            rows.append(
                _row(
                    "item model",
                    rule,
                    f"type-I: family-wise over {M} methods (Holm), cell SD {cell_sd}",
                    (fn(base, y).min(1) * M < ALPHA).mean(),
                    n_sims,
                )
            )
    base, y = simulate_item_data(n_sims, 0.1, seed + 10, effect=1.0, methods=M)
    for rule, fn in (("before", items_before), ("after", items_after)):
        rows.append(
            _row(
                "item model",
                rule,
                "power: effect 1.0 (10 cell SDs, 3 cells) on one method",
                (fn(base, y)[:, 0] * M < ALPHA).mean(),
                n_sims,
                0.8,
                "power",
            )
        )
    return rows


# ---------------------------------------------------------------------------------- MixedLM contrasts


def sim_mixed(n_sims: int = 400, seed: int = 3, shift: float = 3.0) -> list[dict]:
    """4 methods x 3 seeds, one cell each: y = seed effect + noise (both SD 1). Type-I: share of the 6 pair
    intervals that exclude 0 (after: t on the blocked df; before: Wald z from the same fits). Power: `shift`
    planted on one method, share of its 3 pair intervals that exclude 0."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    methods = np.repeat(["a", "b", "c", "d"], 3)
    seeds = np.tile([0, 1, 2], 4)
    out = {}
    for label, delta in (("null", 0.0), ("planted", shift)):
        excl = {"before": [], "after": []}
        for _ in range(n_sims):
            y = rng.normal(size=3)[seeds] + rng.normal(size=12) + np.where(methods == "d", delta, 0.0)
            t, _ = mixed_contrasts(pd.DataFrame({"value": y, "method": methods, "seed": seeds}))
            if label == "planted":
                t = t[t["b"] == "d"]
            excl["after"].append(((t["ci_low"] > 0) | (t["ci_high"] < 0)).mean())
            z = 1.959963984540054 * t["se"]
            excl["before"].append(((t["estimate"] - z > 0) | (t["estimate"] + z < 0)).mean())
        out[label] = {k: float(np.mean(v)) for k, v in excl.items()}
    rows = [
        _row(
            "MixedLM contrasts", r, "type-I: pair CI excludes 0 (4 methods x 3 seeds)", out["null"][r], n_sims
        )
        for r in ("before", "after")
    ]
    rows += [
        _row(
            "MixedLM contrasts",
            r,
            f"power: {shift:g}-SD planted difference, CI excludes 0",
            out["planted"][r],
            n_sims,
            0.8,
            "power",
        )
        for r in ("before", "after")
    ]
    return rows


# --------------------------------------------------------------------------------- paired forgetting


# (label, simulate_forgetting arguments): the default study first (3 seeds, 3 suites of ~60 binary items)
FORGETTING_REGIMES = [
    ("3 seeds, 3 x 60 binary items, seed SD 0.03 (default study)", dict(suites=3, n_items=60)),
    ("3 seeds, 3 x 60 binary items, seed SD 0 (items dominate)", dict(suites=3, n_items=60, seed_sd=0.0)),
    ("3 seeds, 3 x 60 binary items, seed SD 0.1 (seeds dominate)", dict(suites=3, n_items=60, seed_sd=0.1)),
    ("3 seeds, 100 binary items, seed SD 0.03", dict(n_items=100)),
    ("3 seeds, 200 continuous items, seed SD 0.03", dict(n_items=200, continuous=True)),
    ("5 seeds, 60 binary items, seed SD 0.03", dict(seeds=5, n_items=60)),
    (
        "5 seeds, 3 x 60 continuous items, seed SD 0.1",
        dict(seeds=5, suites=3, n_items=60, seed_sd=0.1, continuous=True),
    ),
]
FORGETTING_RULES = {
    "before (t over cells)": forgetting_before,
    "before (crossed, t on cells - 1)": forgetting_crossed_t,
    "after": forgetting_after,
    "rejected: Satterthwaite df": forgetting_satterthwaite,
}


def forgetting_type1(rule: str, regime: dict, n_sims: int, seed: int) -> float:
    """Share of simulated studies whose mean-over-seeds interval excludes the true forgetting (no plant)."""
    kw = dict(regime, flip=0.3) if regime.get("seed_sd", 0.03) >= 0.1 else regime  # flip probs unclipped
    lo, hi = FORGETTING_RULES[rule](simulate_forgetting(n_sims, seed, **kw))
    truth = forgetting_truth(**kw)
    return float(((lo > truth) | (hi < truth)).mean())


def forgetting_power(rule: str, regime: dict, n_sims: int, seed: int, plant: float) -> float:
    lo, _ = FORGETTING_RULES[rule](simulate_forgetting(n_sims, seed, forgetting=plant, **regime))
    return float((lo > 0).mean())


def sim_forgetting(
    n_sims: int = 2000, seed: int = 4, boot_sims: int = 300, plant: float = 0.15
) -> list[dict]:
    """Type-I of each rule in every regime of FORGETTING_REGIMES, the two-stage bootstrap in the default
    regime, and the power on a planted forgetting of `plant` in the default regime."""
    rows = []
    for k, (label, regime) in enumerate(FORGETTING_REGIMES):
        for rule in FORGETTING_RULES:
            rate = forgetting_type1(rule, regime, n_sims, seed + 10 * k)
            rows.append(_row("paired forgetting", rule, f"type-I: {label}", rate, n_sims))
    base = FORGETTING_REGIMES[0][1]
    lo, hi = forgetting_bootstrap(simulate_forgetting(boot_sims, seed, **base))
    rate = float(((lo > 0) | (hi < 0)).mean())
    rows.append(
        _row(
            "paired forgetting",
            "bootstrap (seeds, items)",
            f"type-I: {FORGETTING_REGIMES[0][0]}",
            rate,
            boot_sims,
        )
    )
    for rule in FORGETTING_RULES:
        rate = forgetting_power(rule, base, n_sims, seed + 1, plant)
        q = f"power: forgetting {plant:g} planted, CI above 0 ({FORGETTING_REGIMES[0][0]})"
        rows.append(_row("paired forgetting", rule, q, rate, n_sims, 0.8, "power"))
    return rows


def sim_floor(n_sims: int = 2000, seed: int = 7, n_items: int = 60, chance: float = 0.25) -> list[dict]:
    """floor_flag on a base at chance (flagged `floor`: should be >= 1 - alpha, the Wilson CI's coverage)
    and on a base 0.2 above chance (not flagged: power)."""
    at = simulate_floor(n_sims, seed, chance, n_items)
    above = simulate_floor(n_sims, seed + 1, chance + 0.2, n_items)
    rate_at = float(np.mean([floor_flag(x, chance) == "floor" for x in at]))
    rate_above = float(np.mean([floor_flag(x, chance) != "floor" for x in above]))
    q = f"{n_items} binary items, chance {chance:g}"
    return [
        _row(
            "floor flag", "after", f"base at chance flagged floor ({q})", rate_at, n_sims, 1 - ALPHA, "power"
        ),
        _row(
            "floor flag",
            "after",
            f"power: base at chance + 0.2 not flagged ({q})",
            rate_above,
            n_sims,
            0.8,
            "power",
        ),
    ]


# ----------------------------------------------------------------------------------------------- law


def sim_law(n_sims: int = 500, seed: int = 5) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for label, slope in (("type-I", 0.0), ("power", 0.6)):
        before, after = [], []
        for _ in range(n_sims):
            x, y, m, c = simulate_law(rng, slope)
            before.append(law_before(x, y, c, rng=rng) > 0.05)
            after.append(law_reported(within_law(x, y, m, c)))
        q = (
            "type-I: law reported under a method-level confound (before: pooled R² CI low > 0.05; "
            "after: within-method R² CI low > 0)"
            if label == "type-I"
            else "power: within-method slope 0.6 found (R² CI low > 0)"
        )
        kind, target = ("type-I", ALPHA) if label == "type-I" else ("power", 0.8)
        rows += [
            _row("forgetting law", "before", q, np.mean(before), n_sims, target, kind),
            _row("forgetting law", "after", q, np.mean(after), n_sims, target, kind),
        ]
    return rows


# --------------------------------------------------------------------------------------------- power


def sim_power(n_sims: int = 4000, seed: int = 6, seeds: int = 3, m_tests: int = 2) -> list[dict]:
    """The paired t over seeds at alpha / m_tests, simulated at the MDE study.stats.power computes (power
    should be 0.8) and at 0 (type-I at most alpha / m_tests)."""
    from scipy import stats as st

    rng = np.random.default_rng(seed)
    sd_diff = 1.0
    alpha_each = ALPHA / m_tests
    d = mde(sd_diff, seeds, alpha_each)
    rows = []
    for label, delta in (("power", d), ("type-I", 0.0)):
        diffs = delta + sd_diff * rng.normal(size=(n_sims, seeds))
        p = st.ttest_1samp(diffs, 0.0, axis=1).pvalue
        rate = float((p < alpha_each).mean())
        if label == "power":
            row = _row(
                "power (MDE)",
                "after",
                f"power at the MDE ({d:.2f} SD, {seeds} seeds, alpha/{m_tests})",
                rate,
                n_sims,
                0.8,
                "power",
            )
            row["ok"] = bool(abs(rate - 0.8) <= 3 * mc_se(0.8, n_sims))  # neither under- nor over-powered
            row["analytic"] = float(power_paired_t(d, sd_diff, seeds, alpha_each))
            rows.append(row)
        else:
            rows.append(
                _row(
                    "power (MDE)",
                    "after",
                    f"type-I of the same test at alpha/{m_tests}",
                    rate,
                    n_sims,
                    alpha_each,
                )
            )
    return rows


SIMULATIONS = {
    "onsets": sim_onsets,
    "items": sim_items,
    "mixed": sim_mixed,
    "forgetting": sim_forgetting,
    "floor": sim_floor,
    "law": sim_law,
    "power": sim_power,
}


def run(scale: float = 1.0) -> list[dict]:
    """All simulations, `scale` times their default sizes."""
    import inspect

    rows = []
    for fn in SIMULATIONS.values():
        n = inspect.signature(fn).parameters["n_sims"].default
        rows += fn(max(20, int(n * scale)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--force", action="store_true", help="rerun even if study/stats is unchanged")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every simulation count")
    args = ap.parse_args(argv)
    h = source_hash()
    if args.out.is_file() and not args.force:
        try:
            if json.loads(args.out.read_text()).get("hash") == h:
                print(f"{args.out}: up to date (study/stats {h})")
                return 0
        except ValueError:
            pass
    t0 = time.time()
    rows = run(args.scale)
    blob = json.dumps(
        {"hash": h, "seconds": round(time.time() - t0, 1), "scale": args.scale, "rows": rows}, indent=1
    )
    for out in dict.fromkeys([args.out, SHIPPED] if args.out == OUT else [args.out]):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(blob)
    for r in rows:
        print(
            f"{'ok ' if r['ok'] else 'BAD'} {r['statistic']:<18} {r['rule']:<33} {r['rate']:.3f} "
            f"(bound {r['bound']:.3f}, n={r['n_sims']})  {r['quantity']}"
        )
    print(f"written: {args.out} ({time.time() - t0:.0f} s)")
    return 0 if all(r["ok"] for r in rows if r["rule"] == "after") else 1


if __name__ == "__main__":
    sys.exit(main())
