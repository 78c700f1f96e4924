"""The study's statistics, computed from a run folder: the forgetting law, Pareto frontiers, method comparisons,
persona coherence and emergence onsets. Writes results/<protocol>/stats/*.csv and appends summary rows
(cell `stats`) to metrics.csv.

    python -c "from study.report.analysis import run_stats; from study.report.data import load_run; \
run_stats(load_run('results/smoke'))"

Decisions, and why:
- A cell (one trained adapter) is the unit. Checkpoints of one cell are not independent, so the forgetting
  law's bootstrap resamples cells, carrying their checkpoints along.
- Method comparisons pool each method's sweep points (their learning-rate grids differ by design; the
  Pareto frontier is the matched comparison). Estimates and CIs come from a mixed model with a random
  intercept per seed, t intervals on the blocked design's residual df (not Wald z); the p-values that decide are seed-stratified permutation tests, Holm-corrected over
  the method pairs of one outcome, because their error rate is checked by simulation (tests) and does not
  rest on a 3-level variance estimate. Where a design has too few relabelings for any permutation p to pass
  Holm (3 seeds, one cell per method and seed: 8 relabelings), a paired t-test over seeds decides instead
  (also checked by simulation). Benchmark items: every cell is scored on the same items, so item intercepts
  cancel from method contrasts and the cell mean is the item model's fixed-effect equivalent (a crossed
  item x seed MixedLM costs ~10 s per outcome in statsmodels for the same contrasts). Where the stage JSONs
  keep per-item values (held-out prompts, probe scores, benchmark items), report.items fits that crossed
  item x seed model for each method against the base as well (stats/items.csv, table "items").
- Fewer than 3 seeds per method is reported as underpowered, without a p-value.
- Pre-declared primaries (the protocol's `primary:` list, else study.stats.power.DEFAULT_PRIMARY): their
  comparisons form one family, Holm over primaries x comparisons; every other comparison is labelled
  `exploratory` (Holm over the pairs of its outcome only) in the `family` column.
- The forgetting law is also fitted within methods (method fixed effects, cluster-robust by cell; table
  `law_within`, study.stats.law): the pooled fit over four methods cannot tell a law from a method-level
  confound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from study import io
from study.report import stats as S
from study.report.checks import calibration_table, run_checks
from study.report.comparisons import (  # noqa: F401  (re-exported: tests and tables read them here)
    NOT_INDICATORS,
    _task_rows,
    _tasks,
    compare_methods,
    comparison_outcomes,
    comparisons,
    forgetting_benchmarks,
    holm_primaries,
    matched_table,
    mde_table,
    outcome_values,
    persona_indicators,
    power_table,
    predictors,
    primaries,
)
from study.report.data import (
    FORGET_MEAN,
    NEWTASK,
    PREDICTORS,
    STATS_CELL,
    Run,
    bounds,
    lm_eval_primary,
    method_order,
    missing_metrics,
    summarise,
)
from study.report.items import item_models, paired_forgetting_summary
from study.stats import law as L

MIN_SEEDS = 3


@dataclass
class Stats:
    """Everything the figures, the Markdown report and the paper need beyond the metrics table."""

    checks: pd.DataFrame
    missing: list[str]
    summary: pd.DataFrame
    law: pd.DataFrame
    best_predictor: pd.DataFrame
    pareto: pd.DataFrame
    comparisons: pd.DataFrame
    coherence: pd.DataFrame
    onsets: pd.DataFrame
    power: pd.DataFrame
    fits: dict = field(default_factory=dict)  # (task, predictor, group, degree) -> stats.Fit, for bands
    items: pd.DataFrame = field(default_factory=pd.DataFrame)  # item-level models (report.items)
    law_within: pd.DataFrame = field(default_factory=pd.DataFrame)  # the law within methods (stats.law)
    calibration: pd.DataFrame = field(default_factory=pd.DataFrame)  # latest `make calibrate` (checks.py)
    mde: pd.DataFrame = field(default_factory=pd.DataFrame)  # the primaries' minimum detectable effects
    matched: pd.DataFrame = field(default_factory=pd.DataFrame)  # forgetting at matched new-task success

    TABLES = (
        "checks",
        "summary",
        "law",
        "best_predictor",
        "pareto",
        "comparisons",
        "coherence",
        "onsets",
        "power",
        "items",
        "law_within",
        "mde",
        "matched",
    )


# ------------------------------------------------------------------------------------------- helpers


def summary_table(run: Run) -> pd.DataFrame:
    """Mean [95% CI] of every final metric per task × method (level `method`) and × sweep arm (`arm`): a
    t-interval over the cells, except forgetting/* where the regression stage kept per-item records: the
    paired seeds x items interval (study.stats.forgetting; the cells' values alone miss the shared item
    sample, type-I 0.05-0.11 in python -m study.stats.calibrate)."""
    rows = []
    forget = run.final[run.final["metric"].str.startswith("forgetting/")]
    groups = {
        (task, level, name): sorted(set(h["cell"]))
        for level in ("method", "arm")
        for (task, name), h in forget.groupby(["task", level])
    }
    paired = paired_forgetting_summary(run.root, groups) if groups else {}
    for (task, metric), g in run.final.groupby(["task", "metric"]):
        for level, key in (("method", "method"), ("arm", "arm")):
            for name, h in g.groupby(key):
                m, lo, hi, n = summarise(h["value"], h["ci_low"], h["ci_high"], clip=bounds(metric))
                if (task, level, name, metric) in paired and len(h) == len(groups[(task, level, name)]):
                    m, lo, hi = paired[(task, level, name, metric)]  # per-item, seeds x items crossed
                rows.append((task, metric, level, h["method"].iloc[0], name, m, lo, hi, n))
    for (task, metric), g in run.base.groupby(["task", "metric"]):
        rows.append(
            (
                task,
                metric,
                "method",
                "base",
                "base",
                g["value"].mean(),
                g["ci_low"].mean(),
                g["ci_high"].mean(),
                len(g),
            )
        )
    out = pd.DataFrame(
        rows, columns=["task", "metric", "level", "method", "name", "mean", "ci_low", "ci_high", "n"]
    )
    if out.empty:
        return out
    out = out[
        (out["level"] == "method") | (out["name"] != out["method"])
    ]  # an arm without sweep = its method
    order = {m: i for i, m in enumerate(method_order(out["method"]))}
    return out.sort_values(
        ["task", "metric", "level", "method", "name"], key=lambda s: s.map(order) if s.name == "method" else s
    ).reset_index(drop=True)


# ----------------------------------------------------------------------------------- forgetting law


def law_points(run: Run, predictor: str, task: str, final: bool = False) -> pd.DataFrame:
    """(cell, method, checkpoint, x, y) wherever a cell (at any checkpoint, or only its final one) has both the
    predictor and forgetting/mean."""
    df = _task_rows(run.final if final else run.adapters, task)
    df = df[df["metric"].isin([predictor, FORGET_MEAN])]
    w = df.pivot_table(
        index=["cell", "method", "checkpoint"], columns="metric", values="value", aggfunc="mean"
    )
    if predictor not in w or FORGET_MEAN not in w:
        return pd.DataFrame(columns=["cell", "method", "checkpoint", "x", "y"])
    w = w.dropna(subset=[predictor, FORGET_MEAN]).reset_index()
    return w.rename(columns={predictor: "x", FORGET_MEAN: "y"})[["cell", "method", "checkpoint", "x", "y"]]


def forgetting_law(run: Run, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Linear and quadratic fits of forgetting/mean on each predictor, pooled and per method, with
    cluster-bootstrap R² CIs; and which predictor is best (share of shared resamples where it wins)."""
    cols = [
        "task",
        "predictor",
        "group",
        "degree",
        "n",
        "n_cells",
        "r2",
        "r2_low",
        "r2_high",
        "adj_r2",
        "r2_loco",
        "slope",
        "slope_low",
        "slope_high",
        "note",
    ]
    rows, fits, best = [], {}, []
    preds = predictors(run)
    if not run.has(FORGET_MEAN) or not preds:
        return (
            pd.DataFrame(columns=cols),
            pd.DataFrame(columns=["task", "predictor", "n", "r2", "p_best"]),
            fits,
        )
    for task in _tasks(run):
        for pred in preds:
            pts = law_points(run, pred, task)
            for group in ["all", *method_order(pts["method"].unique())]:
                g = pts if group == "all" else pts[pts["method"] == group]
                for degree in (1, 2):
                    f = S.poly_fit(g["x"], g["y"], g["cell"], degree, n_boot=n_boot, seed=seed)
                    fits[(task, pred, group, degree)] = f
                    slope = f.coef[1] if degree == 1 and len(f.coef) > 1 else math.nan
                    rows.append(
                        (
                            task,
                            pred,
                            group,
                            degree,
                            f.n,
                            f.n_clusters,
                            f.r2,
                            f.r2_low,
                            f.r2_high,
                            f.adj_r2,
                            f.r2_loco,
                            slope,
                            f.slope_low,
                            f.slope_high,
                            f.note,
                        )
                    )
        best.extend(_best_predictor(run, preds, task, n_boot, seed))
    return (
        pd.DataFrame(rows, columns=cols),
        pd.DataFrame(best, columns=["task", "predictor", "n", "r2", "p_best"]),
        fits,
    )


def _best_predictor(run: Run, preds: list[str], task: str, n_boot: int, seed: int) -> list[tuple]:
    """On the final adapters (where every predictor is measured), the same cell resamples for all: how often
    is each predictor's linear R² the highest? (A paired comparison, so shared noise cancels.)"""
    merged = None
    for p in preds:
        pts = law_points(run, p, task, final=True).rename(columns={"x": p})
        merged = (
            pts if merged is None else merged.merge(pts[["cell", "checkpoint", p]], on=["cell", "checkpoint"])
        )
    if merged is None or merged["cell"].nunique() < 3 or len(preds) < 1:
        return []
    W = S.cluster_weights(merged["cell"], n_boot, np.random.default_rng(seed))
    r2s, points = [], []
    for p in preds:
        x = merged[p].to_numpy(float)
        if x.std() == 0:
            r2s.append(np.full(n_boot, np.nan))
            points.append(math.nan)
            continue
        X = S._design((x - x.mean()) / x.std(), 1)
        y = merged["y"].to_numpy(float)
        r2s.append(S._wls_r2(X, y, W)[1])
        points.append(float(S._wls_r2(X, y, np.ones((1, len(y))))[1][0]))
    R = np.nan_to_num(np.vstack(r2s), nan=-np.inf)
    wins = np.bincount(R.argmax(0), minlength=len(preds)) / n_boot
    return [(task, p, len(merged), points[i], float(wins[i])) for i, p in enumerate(preds)]


def law_within_table(run: Run) -> pd.DataFrame:
    """Per task and predictor: the law within methods over every checkpoint (study.stats.law.within_law)."""
    rows = []
    if run.has(FORGET_MEAN):
        for task in _tasks(run):
            for pred in predictors(run):
                pts = law_points(run, pred, task)
                if len(pts):
                    fit = L.within_law(pts["x"], pts["y"], pts["method"], pts["cell"])
                    rows.append({"task": task, "predictor": pred, **fit, "law": L.law_reported(fit)})
    return pd.DataFrame(rows, columns=["task", "predictor", *L.COLUMNS, "law"])


# --------------------------------------------------------------------------------------------- pareto


def prior_scores(run: Run, final: bool = True) -> tuple[pd.DataFrame, str]:
    """Per cell, the mean prior-task score over benchmarks (lm-eval's primary metric per benchmark); without
    lm-eval scores, minus mean forgetting. Returns (cell, method, arm, sweep, task, seed, y) and y's label."""
    df = run.final if final else run.adapters
    prim = lm_eval_primary(run.metric_names("lm_eval/"))
    if prim:
        d = df[df["metric"].isin(prim.values())]
        ylab = "mean prior-task score (" + ", ".join(prim) + ")"
    elif run.has(FORGET_MEAN):
        d = df[df["metric"] == FORGET_MEAN].assign(value=lambda x: -x["value"])
        ylab = "− mean forgetting (score points)"
    else:
        return pd.DataFrame(columns=["cell", "method", "arm", "sweep", "task", "seed", "y"]), ""
    y = (
        d.groupby(["cell", "method", "arm", "sweep", "task", "seed"], dropna=False)["value"]
        .mean()
        .rename("y")
    )
    return y.reset_index(), ylab


def pareto_table(run: Run) -> pd.DataFrame:
    """Per task and sweep arm: new-task success vs mean prior-task score (mean over seeds, 95% CI), and
    whether the arm is on its method's frontier (no arm of the same method beats it on both)."""
    cols = [
        "task",
        "method",
        "arm",
        "sweep",
        "x",
        "x_low",
        "x_high",
        "y",
        "y_low",
        "y_high",
        "n",
        "on_front",
        "y_label",
    ]
    ys, ylab = prior_scores(run)
    if ys.empty or not run.has(NEWTASK):
        return pd.DataFrame(columns=cols)
    xs = run.final[run.final["metric"] == NEWTASK][["cell", "value"]].rename(columns={"value": "x"})
    d = ys.merge(xs, on="cell")
    rows = []
    for (task, method, arm, sweep), g in d.groupby(["task", "method", "arm", "sweep"]):
        x, xl, xh, n = summarise(g["x"], clip=bounds(NEWTASK))
        y, yl, yh, _ = summarise(g["y"])
        rows.append([task, method, arm, sweep, x, xl, xh, y, yl, yh, n, False, ylab])
    out = pd.DataFrame(rows, columns=cols)
    rank = {m: i for i, m in enumerate(method_order(out["method"]))}
    out = out.sort_values(["task", "method", "x"], key=lambda s: s.map(rank) if s.name == "method" else s)
    out = out.reset_index(drop=True)
    for (_task, _m), idx in out.groupby(["task", "method"]).groups.items():
        out.loc[idx, "on_front"] = S.pareto_front(out.loc[idx, "x"], out.loc[idx, "y"])
    # The base model as a reference point (success and prior score before any training).
    prim = lm_eval_primary(run.metric_names("lm_eval/"))
    for task in run.tasks:
        b = run.base[run.base["task"] == task]
        bx = b.loc[b["metric"] == NEWTASK, "value"]
        by = b.loc[b["metric"].isin(prim.values()), "value"].mean() if prim else 0.0
        if len(bx):
            out.loc[len(out)] = [
                task,
                "base",
                "base",
                "",
                float(bx.mean()),
                math.nan,
                math.nan,
                float(by),
                math.nan,
                math.nan,
                1,
                True,
                ylab,
            ]
    return out


# ---------------------------------------------------------------------------------------- comparisons


def coherence_table(run: Run) -> pd.DataFrame:
    """Per task (and method): agreement among indicators (Kendall's W over cells), cross-domain consistency
    (Kendall's W of each indicator over held-out domains), masked/unmasked ratio, held-out vs in-domain gap."""
    rows = []
    inds = persona_indicators(run)
    for task in run.tasks:
        f = run.final[run.final["task"] == task]
        wide = f.pivot_table(index=["cell", "method"], columns="metric", values="value").reset_index()
        for method in ["all", *run.methods]:
            w = wide if method == "all" else wide[wide["method"] == method]
            if len(inds) >= 2 and all(i in w for i in inds):
                rows.append(
                    (
                        task,
                        method,
                        "indicator agreement (Kendall's W over cells)",
                        S.kendall_w(w[inds].to_numpy(float)),
                        len(w),
                    )
                )
            if "persona/probe" in w and "persona/probe_masked" in w:
                r = (w["persona/probe_masked"] / w["persona/probe"]).replace([np.inf, -np.inf], np.nan)
                rows.append((task, method, "masked / unmasked probe", float(r.mean()), int(r.notna().sum())))
            if NEWTASK in w and f"{NEWTASK}_indomain" in w:
                gap = w[f"{NEWTASK}_indomain"] - w[NEWTASK]
                rows.append(
                    (task, method, "in-domain − held-out success", float(gap.mean()), int(gap.notna().sum()))
                )
        for ind in inds:
            dom = f[f["metric"].str.startswith(ind + "/")]
            if dom["metric"].nunique() >= 2:
                m = dom.pivot_table(index="cell", columns="metric", values="value")
                rows.append(
                    (
                        task,
                        "all",
                        f"{ind} consistency across domains (Kendall's W)",
                        S.kendall_w(m.to_numpy(float)),
                        len(m),
                    )
                )
    return pd.DataFrame(rows, columns=["task", "method", "quantity", "value", "n"])


def onset_table(run: Run) -> pd.DataFrame:
    """Emergence onset (training step) per task × method × indicator: mean over cells, and how many cells
    reached it at all (an empty onset = never emerged within the budget)."""
    f = run.final[run.final["metric"].str.startswith("emergence/onset/")]
    rows = []
    for (task, method, metric), g in f.groupby(["task", "method", "metric"]):
        m, lo, hi, n = summarise(g["value"])
        rows.append(
            (task, method, metric.removeprefix("emergence/onset/"), m, lo, hi, n, g["cell"].nunique())
        )
    out = pd.DataFrame(
        rows,
        columns=["task", "method", "indicator", "mean_step", "ci_low", "ci_high", "n_reached", "n_cells"],
    )
    return out


# ---------------------------------------------------------------------------------------------- output


def _short(metric: str) -> str:
    return metric.replace("/", "_")


def stats_rows(st: Stats) -> pd.DataFrame:
    """Summary rows for metrics.csv (cell `stats`), e.g. `stats/forgetting_law/r2_linear` for forward KL."""
    rows = []
    deg = {1: "linear", 2: "quadratic"}
    for _, r in st.law.iterrows():
        pre = "stats/forgetting_law" + ("" if r.predictor == PREDICTORS[0] else f"/{_short(r.predictor)}")
        rows.append((r.group, f"{pre}/r2_{deg[r.degree]}", r.r2, r.r2_low, r.r2_high, r.task, r.n))
        if r.degree == 1:
            rows.append((r.group, f"{pre}/slope", r.slope, r.slope_low, r.slope_high, r.task, r.n))
    for _, r in st.comparisons.iterrows():
        pre = f"stats/compare/{r.outcome}/{r.a}-{r.b}"
        rows.append((f"{r.a}-{r.b}", f"{pre}/diff", r.est, r.ci_low, r.ci_high, r.task, r.n_a + r.n_b))
        rows.append((f"{r.a}-{r.b}", f"{pre}/hedges_g", r.g, r.g_low, r.g_high, r.task, r.n_a + r.n_b))
        if not r.underpowered:  # an underpowered comparison has no p-value to report
            rows.append(
                (f"{r.a}-{r.b}", f"{pre}/p_holm", r.p_holm, math.nan, math.nan, r.task, r.n_a + r.n_b)
            )
    rows.append(
        (
            "all",
            "stats/checks/failed",
            float((~st.checks["ok"]).sum()),
            math.nan,
            math.nan,
            "",
            len(st.checks),
        )
    )
    out = pd.DataFrame(rows, columns=["method", "metric", "value", "ci_low", "ci_high", "task", "n"])
    out.insert(0, "cell", STATS_CELL)
    out.insert(2, "seed", "")
    out.insert(3, "checkpoint", "")
    return out


def append_stats_rows(run: Run, rows: pd.DataFrame) -> None:
    """Rewrite metrics.csv with earlier `stats` rows replaced by these; measurement rows are kept verbatim."""
    path = run.paths.metrics
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    raw = raw[raw["cell"] != STATS_CELL]
    rows = rows.reindex(columns=raw.columns)
    text = raw.to_csv(index=False) + rows.to_csv(index=False, header=False, float_format="%.6g", na_rep="")
    io.write_text(path, text)


def run_stats(run: Run, n_boot: int = 1000, n_perm: int = 5000, write: bool = True) -> Stats:
    """Compute every statistic; with `write`, save stats/*.csv and append the summary rows to metrics.csv."""
    law, best, fits = forgetting_law(run, n_boot=n_boot)
    st = Stats(
        checks=run_checks(run),
        missing=missing_metrics(run),
        summary=summary_table(run),
        law=law,
        best_predictor=best,
        pareto=pareto_table(run),
        comparisons=comparisons(run, n_perm, n_boot),
        coherence=coherence_table(run),
        onsets=onset_table(run),
        power=power_table(run),
        fits=fits,
        items=item_models(run.root),
        law_within=law_within_table(run),
        calibration=calibration_table(),
        mde=mde_table(run),
        matched=matched_table(run),
    )
    holm_primaries(run, st.comparisons, st.matched)  # the declared primaries: one Holm family
    if write:
        out = run.root / "stats"
        out.mkdir(parents=True, exist_ok=True)
        for name in Stats.TABLES:
            io.write_text(out / f"{name}.csv", getattr(st, name).to_csv(index=False))
        io.write_json(out / "missing.json", st.missing)
        append_stats_rows(run, stats_rows(st))
    return st
