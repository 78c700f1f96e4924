"""Checks before building the paper: every cell present, budgets matched across methods, KL ≥ 0, no NaN.

    python -c "from study.report.data import load_run; from study.report.checks import run_checks; \
print(run_checks(load_run('results/smoke')))"

Every check returns a row (check, ok, detail); the report and the paper print them all, failed ones first,
so a broken run is reported rather than silently passed. `calibration_table` adds the statistics' own check:
the type-I rates and powers of the latest `make calibrate` (results/calibration/calibration.json), marked stale
when study/stats has changed since.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from study.report.data import NEWTASK, OPTIONAL, Run, missing_metrics

# Train fields that may differ between methods without unmatching the budget: the learning rate is swept per
# method by design, gradient checkpointing and the checkpoint interval change no weights, and the completion
# length only applies to GRPO's sampling.
NOT_BUDGET = {"learning_rate", "gradient_checkpointing", "checkpoint_every", "max_completion_length"}
KL_TOLERANCE = 1e-6  # an exact KL is >= 0; below -tol it is a bug, not rounding


def _norm(v):
    if isinstance(v, float):
        return float(f"{v:.12g}")
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _key(task: str, method: str, sweep: dict, seed) -> str:
    return json.dumps([task, method, _norm(sweep or {}), None if seed is None else int(seed)], sort_keys=True)


def expected_cells(protocol: dict) -> list[tuple[str, str, dict, int]]:
    """(task, method, sweep point, seed) for every cell the protocol asks for: `Protocol.cells` itself, on
    the run's resolved protocol.yaml (study.config imports no model code)."""
    from study.config import Protocol

    proto = Protocol.model_validate(protocol)
    return [(c.task.name, c.method.value, c.sweep, c.seed) for c in proto.cells()]


def _short(names, k: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def check_cells(run: Run) -> tuple[bool, str]:
    final = run.final
    measured = set(final.loc[final["metric"] == NEWTASK, "cell"]) or set(final["cell"])
    failed = []
    for name in run.cells:
        st = run.paths.cell(name).status
        if st.is_file():
            try:
                if json.loads(st.read_text()).get("state") == "failed":
                    failed.append(name)
            except (OSError, json.JSONDecodeError):
                pass
    problems = []
    if run.protocol:
        have = {
            _key(c["task"]["name"], c["method"], c.get("sweep"), c.get("seed")): n
            for n, c in run.cells.items()
        }
        try:
            want = expected_cells(run.protocol)
        except ValueError as e:  # a protocol.yaml written by other code: say so, and check nothing against it
            return False, f"protocol.yaml does not validate under this code ({str(e).splitlines()[0]})"
        absent = [
            f"{t}-{m}{''.join(f'-{k}{v}' for k, v in s.items())}-s{seed}"
            for t, m, s, seed in want
            if _key(t, m, s, seed) not in have
        ]
        unmeasured = [have[_key(*w)] for w in want if _key(*w) in have and have[_key(*w)] not in measured]
        if absent:
            problems.append(f"{len(absent)} of {len(want)} cells never started: {_short(absent)}")
        if unmeasured:
            problems.append(f"{len(unmeasured)} cells without final measurements: {_short(unmeasured)}")
        total = len(want)
    else:
        unmeasured = [n for n in run.cells if n not in measured]
        if unmeasured:
            problems.append(f"{len(unmeasured)} cells without final measurements: {_short(unmeasured)}")
        problems.append("no protocol.yaml: cannot tell which cells were expected")
        total = len(run.cells)
    if failed:
        problems.append(f"{len(failed)} failed: {_short(failed)}")
    if not problems:
        return True, f"all {total} cells measured"
    return False, "; ".join(problems)


def check_budgets(run: Run) -> tuple[bool, str]:
    if not run.cells:
        return False, "no cells/*/cell.json to compare"
    swept = {k for c in run.cells.values() for k in (c.get("sweep") or {})}
    problems = []
    for task in sorted({c["task"]["name"] for c in run.cells.values()}):
        cfgs = [c for c in run.cells.values() if c["task"]["name"] == task]
        keys = sorted({k for c in cfgs for k in (c.get("train") or {})} - NOT_BUDGET - swept)
        for k in keys:
            by_method: dict[str, set] = {}
            for c in cfgs:
                by_method.setdefault(c["method"], set()).add(json.dumps(_norm((c.get("train") or {}).get(k))))
            if len(set().union(*by_method.values())) > 1:
                problems.append(
                    f"{task}: train.{k} differs: "
                    + "; ".join(f"{m}={'/'.join(sorted(v))}" for m, v in sorted(by_method.items()))
                )
        seeds = {
            m: sorted({c.get("seed") for c in cfgs if c["method"] == m}) for m in {c["method"] for c in cfgs}
        }
        if len({tuple(s) for s in seeds.values()}) > 1:
            problems.append(f"{task}: seeds differ by method: {seeds}")
    if problems:
        return False, "; ".join(problems)
    return (
        True,
        f"steps, batch, lengths, LoRA and seeds identical across methods (lr swept: {sorted(swept) or 'no'})",
    )


def check_kl(run: Run) -> tuple[bool, str]:
    kl = run.metrics[run.metrics["metric"].str.startswith("kl/")]
    if kl.empty:
        return True, "no KL measured yet (nothing to check)"
    bad = kl[kl["value"] < -KL_TOLERANCE]
    if len(bad):
        worst = bad.loc[bad["value"].idxmin()]
        return (
            False,
            f"{len(bad)} negative KL values (worst {worst['value']:.3g}: {worst['metric']} in {worst['cell']})",
        )
    return True, f"{len(kl)} KL values, all >= 0"


def check_nan(run: Run) -> tuple[bool, str]:
    df = run.metrics
    nan = df[~np.isfinite(df["value"].to_numpy(float, na_value=np.nan))]
    # A never-reached onset is legitimately empty; every other metric must have a value.
    nan = nan[~nan["metric"].str.startswith("emergence/onset/")]
    if len(nan):
        counts = nan.groupby("metric").size().sort_values(ascending=False)
        return False, f"{len(nan)} NaN/inf values: " + ", ".join(
            f"{m} ({n})" for m, n in counts.head(6).items()
        )
    return True, f"{len(df)} values, none NaN"


def check_base(run: Run) -> tuple[bool, str]:
    tasks = set(run.tasks)
    have = set(run.base["task"])
    if tasks - have:
        return False, f"no base measurements for task(s) {sorted(tasks - have)}"
    return True, f"base measured for {sorted(have)}"


def check_metrics(run: Run) -> tuple[bool, str]:
    missing = [m for m in missing_metrics(run) if m not in OPTIONAL]
    # an instrument that reported itself invalid for this model (a `<metric>_valid` = 0 row) is not missing
    df = run.metrics
    invalid = [m for m in missing if ((df["metric"] == f"{m}_valid") & (df["value"] == 0)).any()]
    missing = [m for m in missing if m not in invalid]
    note = f"; invalid for this model (gated, no value rows): {', '.join(invalid)}" if invalid else ""
    if missing:
        return False, "not measured: " + ", ".join(missing) + note
    return True, "every expected metric family present" + note


def calibration_table(path=None) -> pd.DataFrame:
    """The latest calibration simulations (statistic, quantity, rate, bound, ok, n_sims, stale), or an empty
    table when `make calibrate` has not been run."""
    from study.paths import RESULTS
    from study.stats.calibrate import source_hash

    if path is None:
        from study.stats.calibrate import SHIPPED

        path = RESULTS / "calibration" / "calibration.json"
        path = path if path.is_file() else SHIPPED  # the run shipped with the package (same hash key)
    cols = ["statistic", "rule", "quantity", "rate", "bound", "ok", "n_sims", "stale"]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return pd.DataFrame(columns=cols)
    stale = data.get("hash") != source_hash()
    rows = [{**{c: r.get(c) for c in cols[:-1]}, "stale": stale} for r in data.get("rows", [])]
    return pd.DataFrame(rows, columns=cols)


CHECKS = {
    "cells present": check_cells,
    "budgets matched": check_budgets,
    "KL >= 0": check_kl,
    "no NaN": check_nan,
    "base measured": check_base,
    "metrics present": check_metrics,
}


def run_checks(run: Run) -> pd.DataFrame:
    """All checks as a table (check, ok, detail), failed first."""
    rows = []
    for name, fn in CHECKS.items():
        ok, detail = fn(run)
        rows.append({"check": name, "ok": bool(ok), "detail": detail})
    return pd.DataFrame(rows).sort_values("ok", kind="stable").reset_index(drop=True)
