"""Method comparisons from a run folder: every outcome's pairwise contrasts (mixed model with t intervals,
seed-stratified permutation p-values, Hedges' g), the pre-declared primaries as one Holm family, forgetting
at matched new-task success, and the power tables. Split from study.report.analysis, which calls these.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study.report import stats as S
from study.report.data import FORGET_MEAN, KL_METRICS, NEWTASK, PREDICTORS, Run
from study.stats import power as P

MIN_SEEDS = 3


def forgetting_benchmarks(run: Run) -> list[str]:
    return [m for m in run.metric_names("forgetting/") if m != FORGET_MEAN]


def persona_indicators(run: Run) -> list[str]:
    """Top-level persona indicators measured on adapters (`persona/<indicator>`, not the per-domain ones, nor
    the instruments' own checks: the external AUC and the self-report's validity flag)."""
    have = set(run.final["metric"])
    return [
        m for m in run.metric_names("persona/") if m.count("/") == 1 and m in have and m not in NOT_INDICATORS
    ]


NOT_INDICATORS = {"persona/probe_auc_external", "persona/self_report_valid"}


def predictors(run: Run) -> list[str]:
    extra = [m for m in run.metric_names("kl/") if m not in PREDICTORS]
    return [p for p in PREDICTORS + extra if run.has(p)]


def _tasks(run: Run) -> list[str]:
    return run.tasks + (["all"] if len(run.tasks) > 1 else [])


def _task_rows(df: pd.DataFrame, task: str) -> pd.DataFrame:
    return df if task == "all" else df[df["task"] == task]


# ------------------------------------------------------------------------------------------- summary


def comparison_outcomes(run: Run) -> list[str]:
    outs = [FORGET_MEAN] if run.has(FORGET_MEAN) else []
    outs += forgetting_benchmarks(run)
    outs += [k for k in KL_METRICS if run.has(k)]
    outs += persona_indicators(run)
    if run.has("persona/probe") and run.has("persona/probe_masked"):
        outs.append("persona/masked_ratio")
    if run.has(NEWTASK):
        outs.append(NEWTASK)
    return outs


def outcome_values(run: Run, outcome: str, task: str) -> pd.DataFrame:
    """(cell, method, seed, value) at the final step; `persona/masked_ratio` = probe_masked / probe per cell,
    the share of the persona signal that survives masking the surface markers."""
    df = _task_rows(run.final, task)
    if outcome == "persona/masked_ratio":
        w = (
            df[df["metric"].isin(["persona/probe", "persona/probe_masked"])]
            .pivot_table(index=["cell", "method", "seed"], columns="metric", values="value")
            .dropna()
            .reset_index()
        )
        if not {"persona/probe", "persona/probe_masked"} <= set(w.columns):  # a task without persona rows
            return pd.DataFrame(columns=["cell", "method", "seed", "value"])
        with np.errstate(divide="ignore", invalid="ignore"):
            w["value"] = w["persona/probe_masked"] / w["persona/probe"]
        return w[["cell", "method", "seed", "value"]].replace([np.inf, -np.inf], np.nan).dropna()
    return df[df["metric"] == outcome][["cell", "method", "seed", "value"]].dropna(subset=["value"])


def compare_methods(
    d: pd.DataFrame,
    levels: list[str],
    n_perm: int = 5000,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = S.ALPHA,
) -> tuple[pd.DataFrame, str]:
    """All method pairs on one outcome: mixed-model estimate and CI, Hedges' g with bootstrap CI, a p-value,
    Holm over the pairs, and the verdict (difference / noise / underpowered).

    The p-value is a seed-stratified permutation test; where the design has too few relabelings for any
    p-value to pass Holm (3 seeds, one cell per method and seed), a seed-blocked paired t-test instead.
    Fewer than MIN_SEEDS seeds: underpowered, no p-value."""
    levels = [m for m in levels if (d["method"] == m).any()]
    mixed, model = S.mixed_contrasts(d, "value", "method", "seed", levels)
    n_seeds = int(d.groupby("method")["seed"].nunique().min()) if len(d) else 0
    m = len(mixed)
    rows = []
    for _, r in mixed.iterrows():
        sub = d[d["method"].isin([r.a, r.b])]
        a = sub.loc[sub["method"] == r.a, "value"].to_numpy(float)
        b = sub.loc[sub["method"] == r.b, "value"].to_numpy(float)
        y = sub["value"].to_numpy(float)
        is_a = (sub["method"] == r.a).to_numpy()
        strata = sub["seed"].astype("string").fillna("none").to_numpy()
        min_p = S.min_attainable_p(is_a, strata)
        if min_p * m < alpha:
            p, test = S.perm_test(y, is_a, strata, n_perm=n_perm, seed=seed), "permutation (seed-stratified)"
        else:
            p, test = S.blocked_t_test(y, is_a, strata), "paired t over seeds (permutation too coarse)"
        g, gl, gh = S.hedges_g_ci(a, b, n_boot=n_boot, seed=seed)
        under = ""
        if n_seeds < MIN_SEEDS:
            under = f"underpowered: {n_seeds} seed(s) per method (< {MIN_SEEDS})"
        elif not np.isfinite(p):
            under = "underpowered: no test possible"
        rows.append(
            dict(
                a=r.a,
                b=r.b,
                n_a=len(a),
                n_b=len(b),
                diff=float(a.mean() - b.mean()),
                est=r.estimate,
                ci_low=r.ci_low,
                ci_high=r.ci_high,
                df=r.df,
                p_t=r.p_t,
                g=g,
                g_low=gl,
                g_high=gh,
                test=test,
                p=p,
                min_p=min_p,
                underpowered=under,
            )
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return out, model
    out["p_holm"] = S.holm(out["p"].where(out["underpowered"] == ""))
    out["verdict"] = [
        S.verdict(r.ci_low, r.ci_high, r.p_holm, r.underpowered, alpha) for _, r in out.iterrows()
    ]
    return out, model


def primaries(run: Run) -> list[dict]:
    """The protocol's pre-declared primary outcomes ({metric, task, contrast: [a, b]}), else the default."""
    declared = (run.protocol or {}).get("primary") or P.DEFAULT_PRIMARY
    tasks = run.tasks
    return [p | {"task": p.get("task") or (tasks[0] if tasks else None)} for p in declared]


def _label_families(out: pd.DataFrame, declared: list[dict], alpha: float = S.ALPHA) -> pd.DataFrame:
    """Mark the comparisons that are declared primaries and Holm-correct them as one family (primaries x
    comparisons); the rest keep their per-outcome Holm and are `exploratory`. A primary read elsewhere than
    at the final adapters (`forgetting/mean@matched`: the matched-success table) is not a comparison row:
    `holm_primaries` adds its p to the family once both tables exist."""
    out = out.assign(family="exploratory", primary="")
    for p in declared:
        metric = str(p["metric"])
        if "@" in metric:
            continue
        pair = {str(c) for c in p.get("contrast", [])}
        hit = (
            (out["task"] == p["task"])
            & (out["outcome"] == metric.split("@")[0])
            & np.array([{a, b} == pair for a, b in zip(out["a"], out["b"], strict=True)], bool)
        )
        out.loc[hit, "family"] = "primary"
        out.loc[hit, "primary"] = metric
    prim = out["family"] == "primary"
    if prim.any():
        out.loc[prim, "p_holm"] = S.holm(out.loc[prim, "p"].where(out.loc[prim, "underpowered"] == ""))
        out.loc[prim, "verdict"] = [
            S.verdict(r.ci_low, r.ci_high, r.p_holm, r.underpowered, alpha) for _, r in out[prim].iterrows()
        ]
    return out


def comparisons(run: Run, n_perm: int = 5000, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    frames = []
    for task in run.tasks:
        for outcome in comparison_outcomes(run):
            d = outcome_values(run, outcome, task)
            if d["method"].nunique() < 2:
                continue
            out, model = compare_methods(d, run.methods, n_perm, n_boot, seed)
            if len(out):
                frames.append(out.assign(task=task, outcome=outcome, model=model))
    if not frames:
        return pd.DataFrame(
            columns=[
                "task",
                "outcome",
                "a",
                "b",
                "est",
                "ci_low",
                "ci_high",
                "g",
                "p_holm",
                "verdict",
                "family",
                "primary",
            ]
        )
    out = _label_families(pd.concat(frames, ignore_index=True), primaries(run))
    first = ["task", "outcome", "a", "b", "family"]
    return out[first + [c for c in out.columns if c not in first]]


def matched_estimable(row) -> bool:
    """A matched-success row compares something: its target success lies above the base's own (at the base's
    success both forgettings are 0 by construction). Unknown base success: estimable."""
    base = row.get("base_success", math.nan)
    return not (base == base and row["target"] <= base + 1e-9)


def holm_primaries(run: Run, comp: pd.DataFrame, matched: pd.DataFrame, alpha: float = S.ALPHA) -> None:
    """The declared primaries as one Holm family, in place: each comparison row of family `primary` (its own
    p) and each estimable matched-success primary (its Welch p over seeds, `p_holm` added to the method's row
    of `matched`); verdicts follow the adjusted p. The report's primary lines, its tables and the paper all
    read these. A matched primary is estimable when its target success lies above the base's."""
    entries: list[tuple[str, object, float]] = []
    for p in primaries(run):
        metric, task = str(p["metric"]), p.get("task")
        a, b = (str(c) for c in p.get("contrast", ["grpo", "sft"]))
        if "@matched" in metric:
            if b != "sft" or not len(matched):
                continue
            m = matched[(matched["task"] == task) & (matched["method"] == a)]
            if len(m) and matched_estimable(m.iloc[0]):
                entries.append(("matched", m.index[0], float(m["p"].iloc[0])))
            continue
        if not len(comp):
            continue
        hit = comp[(comp["task"] == task) & (comp["outcome"] == metric) & (comp["family"] == "primary")]
        hit = hit[[{x, y} == {a, b} for x, y in zip(hit["a"], hit["b"], strict=True)]]
        for i, r in hit.iterrows():
            entries.append(("comparison", i, float(r["p"]) if r.get("underpowered", "") == "" else math.nan))
    if not entries:
        return
    adjusted = S.holm([p for _, _, p in entries])
    if len(matched):
        matched["p_holm"] = math.nan
    for (kind, i, _), q in zip(entries, adjusted, strict=True):
        if kind == "matched":
            matched.loc[i, "p_holm"] = q
        else:
            comp.loc[i, "p_holm"] = q
            r = comp.loc[i]
            comp.loc[i, "verdict"] = S.verdict(r.ci_low, r.ci_high, q, r.get("underpowered", ""), alpha)


def matched_table(run: Run) -> pd.DataFrame:
    """Forgetting at matched new-task success (RL's Razor's comparison, study.report.matched): per task, the
    points (newtask/success, forgetting/mean) of every cell at every measured step, plus the base's point
    (its success, no forgetting) at step 0 of every seed; each method against SFT."""
    from study.report.matched import COLUMNS as MATCHED_COLUMNS
    from study.report.matched import matched_comparison

    frames = []
    df = run.adapters
    base = run.base
    for task in run.tasks:
        d = df[(df["task"] == task) & df["metric"].isin([NEWTASK, FORGET_MEAN])]
        if set(d["metric"]) != {NEWTASK, FORGET_MEAN} or "sft" not in set(d["method"]):
            continue
        w = (
            d.pivot_table(
                index=["method", "seed", "cell", "checkpoint"],
                columns="metric",
                values="value",
                aggfunc="mean",
            )
            .reset_index()
            .dropna(subset=[NEWTASK, FORGET_MEAN])
        )
        b = base[(base["task"] == task) & (base["metric"] == NEWTASK)]["value"]
        points = w.rename(columns={NEWTASK: "success", FORGET_MEAN: "forgetting"})[
            ["method", "seed", "success", "forgetting"]
        ]
        if len(b):
            origin = (
                points[["method", "seed"]].drop_duplicates().assign(success=float(b.iloc[0]), forgetting=0.0)
            )
            points = pd.concat([origin, points], ignore_index=True)
        out = matched_comparison(points, reference="sft")
        if len(out):
            # how far each method's seeds got (median of their best success) and the base's own success: a
            # target at the base's success compares two zeros by construction (matched_degenerate)
            reach = points.groupby(["method", "seed"]).success.max().groupby("method").median()
            out = out.assign(
                task=task,
                base_success=float(b.iloc[0]) if len(b) else math.nan,
                reach=out["method"].map(reach),
            )
            frames.append(out)
    return (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["task", *MATCHED_COLUMNS])
    )


def power_table(run: Run) -> pd.DataFrame:
    rows = []
    for task in run.tasks:
        f = run.final[run.final["task"] == task]
        seeds = f.groupby("method")["seed"].nunique()
        n = int(seeds.min()) if len(seeds) else 0
        msg = (
            ""
            if n >= MIN_SEEDS
            else (
                f"{n} seed(s) per method: method comparisons are underpowered and "
                f"reported without p-values (need >= {MIN_SEEDS})"
            )
        )
        rows.append((task, n, f["cell"].nunique(), msg))
    return pd.DataFrame(rows, columns=["task", "min_seeds", "n_cells", "message"])


def mde_table(run: Run) -> pd.DataFrame:
    """The primaries' minimum detectable effects for this run's protocol (study.stats.power, stated priors)."""
    if not run.protocol:
        return pd.DataFrame(columns=P.COLUMNS)
    _, sizes = P.protocol_sizes(run.protocol)
    return P.power_table(primaries(run), sizes)


# ------------------------------------------------------------------------------------------ coherence
