"""The report's tables as small DataFrames of formatted strings, shared by the Markdown report and the paper
(so both print the same numbers). Each builder is a function of the run and its statistics.

    from study.report.tables import build_tables; build_tables(run, stats)["forgetting"][0].frame
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from study.report.analysis import Stats, forgetting_benchmarks, persona_indicators
from study.report.data import FORGET_MEAN, KL_FWD, KL_METRICS, NEWTASK, PREDICTORS, Run, label, method_order


@dataclass
class Table:
    name: str
    task: str
    title: str
    frame: pd.DataFrame  # strings; empty when nothing was measured
    note: str = ""


def fmt(v, digits: int = 3) -> str:
    """3 significant digits; integers as integers; NaN as an en dash."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or v is pd.NA:
        return "–"
    v = float(v)
    if abs(v) < 1e-12:  # floating-point residue of a zero difference
        return "0"
    if v == int(v) and abs(v) >= 10:
        return f"{int(v)}"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    s = f"{v:.{digits}g}"
    return s.replace("e-0", "e-")


def fmt_ci(m, lo, hi) -> str:
    if not (isinstance(lo, (int, float)) and math.isfinite(lo) and math.isfinite(hi)):
        return fmt(m)
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


def fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _lookup(st: Stats, task: str) -> dict:
    s = st.summary
    if s.empty:
        return {}
    s = s[(s["task"] == task) & (s["level"] == "method")]
    return {(r.metric, r.method): (r["mean"], r.ci_low, r.ci_high, r.n) for _, r in s.iterrows()}


def _method_table(run: Run, st: Stats, task: str, metrics: list[str], headers: list[str],
                  with_base: bool = True) -> pd.DataFrame:
    look = _lookup(st, task)
    methods = (["base"] if with_base else []) + run.methods
    rows = []
    for m in methods:
        cells = [fmt_ci(*look[(k, m)][:3]) if (k, m) in look else "–" for k in metrics]
        if all(c == "–" for c in cells):
            continue
        n = max((look[(k, m)][3] for k in metrics if (k, m) in look), default=0)
        rows.append([m.upper() if m != "base" else "base", str(int(n)), *cells])
    return pd.DataFrame(rows, columns=["method", "n cells", *headers])


def success_table(run: Run, st: Stats, task: str) -> Table:
    metrics = [m for m in (NEWTASK, f"{NEWTASK}_indomain", "newtask/pref_margin", "newtask/persona_rate") if run.has(m)]
    t = Table("success", task, "New-task success (mean over cells [95% CI])", pd.DataFrame())
    if not metrics:
        t.note = "not measured: newtask/*"
        return t
    t.frame = _method_table(run, st, task, metrics, [m.removeprefix("newtask/") for m in metrics])
    return t


def forgetting_table(run: Run, st: Stats, task: str) -> Table:
    names = forgetting_benchmarks(run) + ([FORGET_MEAN] if run.has(FORGET_MEAN) else [])
    t = Table("forgetting", task, "Forgetting per benchmark, base − adapter (mean over cells [95% CI])", pd.DataFrame())
    if not names:
        t.note = "not measured: forgetting/* (lm-eval regression suites)"
        return t
    t.frame = _method_table(run, st, task, names, [n.removeprefix("forgetting/") for n in names], with_base=False)
    return t


def drift_table(run: Run, st: Stats, task: str) -> Table:
    names = [m for m in KL_METRICS + ["lora/delta_norm"] if run.has(m)]
    t = Table("drift", task, "Drift from the base: KL (nats) and LoRA weight change (mean over cells [95% CI])",
              pd.DataFrame())
    if not names:
        t.note = "not measured: kl/*, lora/delta_norm"
        return t
    heads = ["fwd KL new task", "rev KL new task", "fwd KL general", "ΔW norm"]
    t.frame = _method_table(run, st, task, names, [heads[(KL_METRICS + ["lora/delta_norm"]).index(n)] for n in names],
                            with_base=False)
    return t


def law_table(run: Run, st: Stats, task: str) -> Table:
    t = Table("law", task, "Forgetting law: mean forgetting ~ predictor, pooled over methods (R² with 95% "
              "cluster-bootstrap CI; LOCO = leave one cell out)", pd.DataFrame())
    law = st.law[(st.law["task"] == task) & (st.law["group"] == "all")] if len(st.law) else st.law
    if law.empty:
        t.note = f"needs {FORGET_MEAN} and a predictor ({', '.join(PREDICTORS)})"
        return t
    best = st.best_predictor
    best = best[best["task"] == task].set_index("predictor") if len(best) else best
    rows = []
    for pred, g in law.groupby("predictor", sort=False):
        lin, quad = g[g.degree == 1].iloc[0], g[g.degree == 2].iloc[0]
        rows.append([label(pred, short=True), str(int(lin.n_cells)), fmt_ci(lin.r2, lin.r2_low, lin.r2_high),
                     fmt_ci(quad.r2, quad.r2_low, quad.r2_high), fmt(lin.r2_loco), fmt(quad.r2_loco),
                     fmt_ci(lin.slope, lin.slope_low, lin.slope_high),
                     fmt(best.loc[pred, "p_best"]) if pred in getattr(best, "index", []) else "–"])
    t.frame = pd.DataFrame(rows, columns=["predictor", "cells", "R² linear", "R² quadratic", "LOCO lin.",
                                          "LOCO quad.", "slope [CI]", "P(best)"])
    t.note = ("Fits use every checkpoint (a cell's checkpoints resampled together). P(best): on the final adapters, "
              "the share of shared cell resamples in which the predictor's linear R² is the highest.")
    return t


def law_by_method_table(run: Run, st: Stats, task: str) -> Table:
    t = Table("law_by_method", task, f"Forgetting law per method ({label(KL_FWD, short=True)})", pd.DataFrame())
    law = st.law[(st.law["task"] == task) & (st.law["predictor"] == KL_FWD)] if len(st.law) else st.law
    if law.empty:
        t.note = f"needs {FORGET_MEAN} and {KL_FWD}"
        return t
    rows = []
    for group in method_order(law["group"]):
        g = law[law["group"] == group]
        lin, quad = g[g.degree == 1].iloc[0], g[g.degree == 2].iloc[0]
        rows.append([group.upper() if group != "all" else "pooled", str(int(lin.n_cells)),
                     fmt_ci(lin.r2, lin.r2_low, lin.r2_high), fmt_ci(quad.r2, quad.r2_low, quad.r2_high),
                     fmt_ci(lin.slope, lin.slope_low, lin.slope_high), lin.note])
    t.frame = pd.DataFrame(rows, columns=["group", "cells", "R² linear", "R² quadratic", "slope [CI]", "note"])
    return t


def pareto_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table("pareto", task, "Pareto points: new-task success and mean prior-task score per sweep point",
              pd.DataFrame())
    p = st.pareto[st.pareto["task"] == task] if len(st.pareto) else st.pareto
    if p.empty:
        t.note = "needs newtask/success and lm_eval/* (or forgetting/mean)"
        return t
    rows = [[r.arm, str(int(r.n)), fmt_ci(r.x, r.x_low, r.x_high), fmt_ci(r.y, r.y_low, r.y_high),
             "yes" if r.on_front else ""] for _, r in p.iterrows()]
    t.frame = pd.DataFrame(rows, columns=["arm", "n", "new-task success", "prior-task score", "on frontier"])
    t.note = p["y_label"].iloc[0]
    return t


def comparisons_fmt(run: Run, st: Stats, task: str, outcomes: list[str] | None = None) -> Table:
    t = Table("comparisons", task, "Method comparisons: difference a − b (mixed model, 95% t CI), Hedges' g "
              "(bootstrap 95% CI); p-value Holm-corrected over the declared primaries × comparisons (family "
              "`primary`), else over the pairs of an outcome (`exploratory`)", pd.DataFrame())
    c = st.comparisons[st.comparisons["task"] == task] if len(st.comparisons) else st.comparisons
    if outcomes is not None and len(c):
        c = c[c["outcome"].isin(outcomes)]
    if c.empty:
        t.note = "no outcome measured in two or more methods"
        return t
    rows = []
    for _, r in c.iterrows():
        under = bool(r.underpowered)
        rows.append([r.outcome, f"{r.a.upper()} − {r.b.upper()}", fmt_ci(r.est, r.ci_low, r.ci_high),
                     fmt_ci(r.g, r.g_low, r.g_high), "n/a" if under else fmt_p(r.p_holm), r.verdict,
                     getattr(r, "family", "exploratory")])
    t.frame = pd.DataFrame(rows, columns=["outcome", "pair", "difference [CI]", "Hedges' g [CI]", "p (Holm)", "verdict",
                                          "family"])
    notes = sorted(set(c["underpowered"]) - {""})
    models = sorted(set(c["model"]))
    tests = sorted(set(c.loc[c["underpowered"] == "", "test"]))
    t.note = " ".join([n + "." for n in notes] + (["Tests: " + "; ".join(tests) + "."] if tests else [])
                      + ["Models: " + "; ".join(models) + "."])
    return t


def persona_fmt(run: Run, st: Stats, task: str) -> Table:
    inds = persona_indicators(run)
    t = Table("persona", task, "Persona indicators by method (mean over cells [95% CI])", pd.DataFrame())
    if not inds:
        t.note = "not measured: persona/*"
        return t
    t.frame = _method_table(run, st, task, inds, [i.removeprefix("persona/") for i in inds])
    return t


def coherence_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table("coherence", task, "Coherence statistics", pd.DataFrame())
    c = st.coherence[st.coherence["task"] == task] if len(st.coherence) else st.coherence
    if c.empty:
        t.note = "needs two or more persona indicators, per-domain indicators, or probe and probe_masked"
        return t
    wide = c.pivot_table(index="quantity", columns="method", values="value", aggfunc="first", sort=False)
    cols = [m for m in ["all", *run.methods] if m in wide.columns]
    rows = [[q, *[fmt(wide.loc[q, m]) for m in cols]] for q in wide.index]
    t.frame = pd.DataFrame(rows, columns=["quantity", *[("pooled" if m == "all" else m.upper()) for m in cols]])
    return t


def onsets_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table("onsets", task, "Emergence onset (training step; mean over cells that reached it, n reached / n)",
              pd.DataFrame())
    o = st.onsets[st.onsets["task"] == task] if len(st.onsets) else st.onsets
    if o.empty:
        t.note = "not measured: emergence/onset/*"
        return t
    inds = list(dict.fromkeys(o["indicator"]))
    rows = []
    for m in method_order(o["method"]):
        g = o[o["method"] == m].set_index("indicator")
        rows.append([m.upper(), *[f"{fmt(g.loc[i, 'mean_step'])} ({int(g.loc[i, 'n_reached'])}/{int(g.loc[i, 'n_cells'])})"
                                  if i in g.index else "–" for i in inds]])
    t.frame = pd.DataFrame(rows, columns=["method", *inds])
    return t


def items_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table("items", task, "Item-level comparison with the base (exploratory): per-item differences from the base, "
              "cells × items crossed variance, 95% t CI on cells − 1 df, p Holm-corrected over methods", pd.DataFrame())
    c = st.items[st.items["task"] == task] if len(st.items) else st.items
    if c.empty:
        t.note = "needs per-item values of the base and an adapter (stage JSONs)"
        return t
    rows = [[r.outcome, r.method.upper(), fmt_ci(r.est, r.ci_low, r.ci_high), fmt_p(r.p_holm), str(int(r.n_items)),
             fmt(r.sd_item), fmt(r.sd_cell), "exploratory"] for _, r in c.iterrows()]
    t.frame = pd.DataFrame(rows, columns=["outcome", "method", "effect vs base [CI]", "p (Holm)", "items",
                                          "sd item", "sd cell", "family"])
    t.note = "Model: " + "; ".join(sorted(set(c["model"]))) + "."
    return t


def law_within_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table("law_within", task, "Forgetting law within methods: cell means, method fixed effects (t CI); "
              "R² within methods [CI]; leave-one-method-out R² of the pooled line", pd.DataFrame())
    w = st.law_within[st.law_within["task"] == task] if len(st.law_within) else st.law_within
    if w.empty:
        t.note = f"needs {FORGET_MEAN} and a predictor in 3 or more cells"
        return t
    rows = [[label(r.predictor, short=True), str(int(r.n_cells)), fmt_ci(r.slope, r.slope_low, r.slope_high),
             fmt_ci(r.r2_within, r.r2_low, r.r2_high), fmt(r.r2_lomo), "yes" if r.law else "no", r.note]
            for _, r in w.iterrows()]
    t.frame = pd.DataFrame(rows, columns=["predictor", "cells", "slope within [CI]", "R² within [CI]", "LOMO R²",
                                          "law", "note"])
    return t


def mde_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table("mde", task, "Pre-declared primaries: minimum detectable effect at 80% power (study.stats.power; "
              "stated priors unless measured)", pd.DataFrame())
    d = st.mde[st.mde["task"] == task] if len(st.mde) else st.mde
    if d.empty:
        t.note = "no protocol.yaml, or no primary for this task"
        return t
    rows = [[r.metric, f"{r.a.upper()} − {r.b.upper()}", str(r.seeds), str(r.n_items), fmt(r.sd_cell),
             fmt(r.alpha_each), fmt(r.mde), r.source] for _, r in d.iterrows()]
    t.frame = pd.DataFrame(rows, columns=["primary", "contrast", "seeds", "items", "sd cell", "alpha each", "MDE",
                                          "source"])
    return t


def calibration_fmt(st: Stats) -> Table:
    c = st.calibration
    t = Table("calibration", "", "Calibration of the statistics (null and planted-effect simulations, "
              "`make calibrate`)", pd.DataFrame())
    if c is None or c.empty:
        t.note = "not run: `make calibrate` writes results/calibration/calibration.json"
        return t
    # `before` rows replicate the rules this code replaced: their failures are the reason for the change
    rows = [["ok" if r.ok else ("FAIL" if r.rule == "after" else "fails"), r.statistic, r.rule, r.quantity,
             fmt(r.rate), fmt(r.bound), str(int(r.n_sims))] for _, r in c.iterrows()]
    t.frame = pd.DataFrame(rows, columns=["", "statistic", "rule", "quantity", "rate", "bound", "simulations"])
    if c["stale"].any():
        t.note = "study/stats changed since these simulations: rerun `make calibrate`"
    return t


def checks_fmt(st: Stats) -> Table:
    rows = [["pass" if r.ok else "FAIL", r.check, r.detail] for _, r in st.checks.iterrows()]
    return Table("checks", "", "Checks before the paper", pd.DataFrame(rows, columns=["", "check", "detail"]))


PER_TASK = [success_table, forgetting_table, drift_table, law_table, law_by_method_table, pareto_fmt,
            comparisons_fmt, items_fmt, persona_fmt, coherence_fmt, onsets_fmt, law_within_fmt, mde_fmt]


def build_tables(run: Run, st: Stats) -> dict[str, list[Table]]:
    """name -> one Table per task (the checks: one table)."""
    out: dict[str, list[Table]] = {"checks": [checks_fmt(st)], "calibration": [calibration_fmt(st)]}
    for fn in PER_TASK:
        for task in run.tasks or [""]:  # an empty run still gets every table, saying nothing was measured
            t = fn(run, st, task)
            out.setdefault(t.name, []).append(t)
    return out
