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


def _method_table(
    run: Run, st: Stats, task: str, metrics: list[str], headers: list[str], with_base: bool = True
) -> pd.DataFrame:
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
    metrics = [
        m
        for m in (NEWTASK, f"{NEWTASK}_indomain", "newtask/pref_margin", "newtask/persona_rate")
        if run.has(m)
    ]
    t = Table("success", task, "New-task success (mean over cells [95% CI])", pd.DataFrame())
    if not metrics:
        t.note = "not measured: newtask/*"
        return t
    t.frame = _method_table(run, st, task, metrics, [m.removeprefix("newtask/") for m in metrics])
    return t


def forgetting_table(run: Run, st: Stats, task: str) -> Table:
    names = forgetting_benchmarks(run) + ([FORGET_MEAN] if run.has(FORGET_MEAN) else [])
    t = Table(
        "forgetting",
        task,
        "Forgetting per benchmark, base − adapter (mean over cells [95% CI])",
        pd.DataFrame(),
    )
    if not names:
        t.note = "not measured: forgetting/* (lm-eval regression suites)"
        return t
    t.frame = _method_table(
        run, st, task, names, [n.removeprefix("forgetting/") for n in names], with_base=False
    )
    return t


def drift_table(run: Run, st: Stats, task: str) -> Table:
    names = [m for m in KL_METRICS + ["lora/delta_norm"] if run.has(m)]
    t = Table(
        "drift",
        task,
        "Drift from the base: KL (nats) and LoRA weight change (mean over cells [95% CI])",
        pd.DataFrame(),
    )
    if not names:
        t.note = "not measured: kl/*, lora/delta_norm"
        return t
    heads = ["fwd KL new task", "rev KL new task", "fwd KL general", "ΔW norm"]
    t.frame = _method_table(
        run,
        st,
        task,
        names,
        [heads[(KL_METRICS + ["lora/delta_norm"]).index(n)] for n in names],
        with_base=False,
    )
    return t


def law_table(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "law",
        task,
        "Forgetting law: mean forgetting ~ predictor, pooled over methods (R² with 95% "
        "cluster-bootstrap CI; LOCO = leave one cell out)",
        pd.DataFrame(),
    )
    law = st.law[(st.law["task"] == task) & (st.law["group"] == "all")] if len(st.law) else st.law
    if law.empty:
        t.note = f"needs {FORGET_MEAN} and a predictor ({', '.join(PREDICTORS)})"
        return t
    best = st.best_predictor
    best = best[best["task"] == task].set_index("predictor") if len(best) else best
    rows = []
    for pred, g in law.groupby("predictor", sort=False):
        lin, quad = g[g.degree == 1].iloc[0], g[g.degree == 2].iloc[0]
        rows.append(
            [
                label(pred, short=True),
                str(int(lin.n_cells)),
                fmt_ci(lin.r2, lin.r2_low, lin.r2_high),
                fmt_ci(quad.r2, quad.r2_low, quad.r2_high),
                fmt(lin.r2_loco),
                fmt(quad.r2_loco),
                fmt_ci(lin.slope, lin.slope_low, lin.slope_high),
                fmt(best.loc[pred, "p_best"]) if pred in getattr(best, "index", []) else "–",
            ]
        )
    t.frame = pd.DataFrame(
        rows,
        columns=[
            "predictor",
            "cells",
            "R² linear",
            "R² quadratic",
            "LOCO lin.",
            "LOCO quad.",
            "slope [CI]",
            "P(best)",
        ],
    )
    t.note = (
        "Fits use every checkpoint (a cell's checkpoints resampled together). P(best): on the final adapters, "
        "the share of shared cell resamples in which the predictor's linear R² is the highest."
    )
    return t


def law_by_method_table(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "law_by_method", task, f"Forgetting law per method ({label(KL_FWD, short=True)})", pd.DataFrame()
    )
    law = st.law[(st.law["task"] == task) & (st.law["predictor"] == KL_FWD)] if len(st.law) else st.law
    if law.empty:
        t.note = f"needs {FORGET_MEAN} and {KL_FWD}"
        return t
    rows = []
    for group in method_order(law["group"]):
        g = law[law["group"] == group]
        lin, quad = g[g.degree == 1].iloc[0], g[g.degree == 2].iloc[0]
        rows.append(
            [
                group.upper() if group != "all" else "pooled",
                str(int(lin.n_cells)),
                fmt_ci(lin.r2, lin.r2_low, lin.r2_high),
                fmt_ci(quad.r2, quad.r2_low, quad.r2_high),
                fmt_ci(lin.slope, lin.slope_low, lin.slope_high),
                lin.note,
            ]
        )
    t.frame = pd.DataFrame(
        rows, columns=["group", "cells", "R² linear", "R² quadratic", "slope [CI]", "note"]
    )
    return t


def pareto_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "pareto",
        task,
        "Pareto points: new-task success and mean prior-task score per sweep point",
        pd.DataFrame(),
    )
    p = st.pareto[st.pareto["task"] == task] if len(st.pareto) else st.pareto
    if p.empty:
        t.note = "needs newtask/success and lm_eval/* (or forgetting/mean)"
        return t
    rows = [
        [
            r.arm,
            str(int(r.n)),
            fmt_ci(r.x, r.x_low, r.x_high),
            fmt_ci(r.y, r.y_low, r.y_high),
            "yes" if r.on_front else "",
        ]
        for _, r in p.iterrows()
    ]
    t.frame = pd.DataFrame(rows, columns=["arm", "n", "new-task success", "prior-task score", "on frontier"])
    t.note = p["y_label"].iloc[0]
    return t


def comparisons_fmt(run: Run, st: Stats, task: str, outcomes: list[str] | None = None) -> Table:
    t = Table(
        "comparisons",
        task,
        "Method comparisons: difference a − b (mixed model, 95% t CI), Hedges' g "
        "(bootstrap 95% CI); p-value Holm-corrected over the declared primaries × comparisons (family "
        "`primary`), else over the pairs of an outcome (`exploratory`)",
        pd.DataFrame(),
    )
    c = st.comparisons[st.comparisons["task"] == task] if len(st.comparisons) else st.comparisons
    if outcomes is not None and len(c):
        c = c[c["outcome"].isin(outcomes)]
    if c.empty:
        t.note = "no outcome measured in two or more methods"
        return t
    rows = []
    for _, r in c.iterrows():
        under = bool(r.underpowered)
        rows.append(
            [
                r.outcome,
                f"{r.a.upper()} − {r.b.upper()}",
                fmt_ci(r.est, r.ci_low, r.ci_high),
                fmt_ci(r.g, r.g_low, r.g_high),
                "n/a" if under else fmt_p(r.p_holm),
                r.verdict,
                getattr(r, "family", "exploratory"),
            ]
        )
    t.frame = pd.DataFrame(
        rows,
        columns=["outcome", "pair", "difference [CI]", "Hedges' g [CI]", "p (Holm)", "verdict", "family"],
    )
    notes = sorted(set(c["underpowered"]) - {""})
    models = sorted(set(c["model"]))
    tests = sorted(set(c.loc[c["underpowered"] == "", "test"]))
    t.note = " ".join(
        [n + "." for n in notes]
        + (["Tests: " + "; ".join(tests) + "."] if tests else [])
        + ["Models: " + "; ".join(models) + "."]
    )
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
    t.frame = pd.DataFrame(
        rows, columns=["quantity", *[("pooled" if m == "all" else m.upper()) for m in cols]]
    )
    return t


def onsets_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "onsets",
        task,
        "Emergence onset (training step; mean over cells that reached it, n reached / n)",
        pd.DataFrame(),
    )
    o = st.onsets[st.onsets["task"] == task] if len(st.onsets) else st.onsets
    if o.empty:
        t.note = "not measured: emergence/onset/*"
        return t
    inds = list(dict.fromkeys(o["indicator"]))
    rows = []
    for m in method_order(o["method"]):
        g = o[o["method"] == m].set_index("indicator")
        rows.append(
            [
                m.upper(),
                *[
                    f"{fmt(g.loc[i, 'mean_step'])} ({int(g.loc[i, 'n_reached'])}/{int(g.loc[i, 'n_cells'])})"
                    if i in g.index
                    else "–"
                    for i in inds
                ],
            ]
        )
    t.frame = pd.DataFrame(rows, columns=["method", *inds])
    return t


def items_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "items",
        task,
        "Item-level comparison with the base (exploratory): per-item differences from the base, "
        "cells × items crossed variance, 95% t CI on cells − 1 df, p Holm-corrected over methods",
        pd.DataFrame(),
    )
    c = st.items[st.items["task"] == task] if len(st.items) else st.items
    if c.empty:
        t.note = "needs per-item values of the base and an adapter (stage JSONs)"
        return t
    rows = [
        [
            r.outcome,
            r.method.upper(),
            fmt_ci(r.est, r.ci_low, r.ci_high),
            fmt_p(r.p_holm),
            str(int(r.n_items)),
            fmt(r.sd_item),
            fmt(r.sd_cell),
            "exploratory",
        ]
        for _, r in c.iterrows()
    ]
    t.frame = pd.DataFrame(
        rows,
        columns=[
            "outcome",
            "method",
            "effect vs base [CI]",
            "p (Holm)",
            "items",
            "sd item",
            "sd cell",
            "family",
        ],
    )
    t.note = "Model: " + "; ".join(sorted(set(c["model"]))) + "."
    return t


def law_within_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "law_within",
        task,
        "Forgetting law within methods: cell means, method fixed effects (t CI); "
        "R² within methods [CI]; leave-one-method-out R² of the pooled line",
        pd.DataFrame(),
    )
    w = st.law_within[st.law_within["task"] == task] if len(st.law_within) else st.law_within
    if w.empty:
        t.note = f"needs {FORGET_MEAN} and a predictor in 3 or more cells"
        return t
    rows = [
        [
            label(r.predictor, short=True),
            str(int(r.n_cells)),
            fmt_ci(r.slope, r.slope_low, r.slope_high),
            fmt_ci(r.r2_within, r.r2_low, r.r2_high),
            fmt(r.r2_lomo),
            "yes" if r.law else "no",
            r.note,
        ]
        for _, r in w.iterrows()
    ]
    t.frame = pd.DataFrame(
        rows, columns=["predictor", "cells", "slope within [CI]", "R² within [CI]", "LOMO R²", "law", "note"]
    )
    return t


def mde_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "mde",
        task,
        "Pre-declared primaries: minimum detectable effect at 80% power (study.stats.power; "
        "stated priors unless measured)",
        pd.DataFrame(),
    )
    d = st.mde[st.mde["task"] == task] if len(st.mde) else st.mde
    if d.empty:
        t.note = "no protocol.yaml, or no primary for this task"
        return t
    rows = [
        [
            r.metric,
            f"{r.a.upper()} − {r.b.upper()}",
            str(r.seeds),
            str(r.n_items),
            fmt(r.sd_cell),
            fmt(r.alpha_each),
            fmt(r.mde),
            r.source,
        ]
        for _, r in d.iterrows()
    ]
    t.frame = pd.DataFrame(
        rows, columns=["primary", "contrast", "seeds", "items", "sd cell", "alpha each", "MDE", "source"]
    )
    return t


def calibration_fmt(st: Stats) -> Table:
    c = st.calibration
    t = Table(
        "calibration",
        "",
        "Calibration of the statistics (null and planted-effect simulations, `make calibrate`)",
        pd.DataFrame(),
    )
    if c is None or c.empty:
        t.note = "not run: `make calibrate` writes results/calibration/calibration.json"
        return t
    # `before` rows replicate the rules this code replaced: their failures are the reason for the change
    rows = [
        [
            "ok" if r.ok else ("FAIL" if r.rule == "after" else "fails"),
            r.statistic,
            r.rule,
            r.quantity,
            fmt(r.rate),
            fmt(r.bound),
            str(int(r.n_sims)),
        ]
        for _, r in c.iterrows()
    ]
    t.frame = pd.DataFrame(
        rows, columns=["", "statistic", "rule", "quantity", "rate", "bound", "simulations"]
    )
    if c["stale"].any():
        t.note = "study/stats changed since these simulations: rerun `make calibrate`"
    return t


def checks_fmt(st: Stats) -> Table:
    rows = [["pass" if r.ok else "FAIL", r.check, r.detail] for _, r in st.checks.iterrows()]
    return Table("checks", "", "Checks before the paper", pd.DataFrame(rows, columns=["", "check", "detail"]))


PER_TASK = [
    success_table,
    forgetting_table,
    drift_table,
    law_table,
    law_by_method_table,
    pareto_fmt,
    comparisons_fmt,
    items_fmt,
    persona_fmt,
    coherence_fmt,
    onsets_fmt,
    law_within_fmt,
    mde_fmt,
]


def build_tables(run: Run, st: Stats) -> dict[str, list[Table]]:
    """name -> one Table per task (the checks: one table)."""
    out: dict[str, list[Table]] = {"checks": [checks_fmt(st)], "calibration": [calibration_fmt(st)]}
    for fn in PER_TASK:
        for task in run.tasks or [""]:  # an empty run still gets every table, saying nothing was measured
            t = fn(run, st, task)
            out.setdefault(t.name, []).append(t)
    return out


# ------------------------------------------------------------------------ persona: coherence within cells


COHERENCE_WITHIN = {
    "coherence/indicator_alpha": "indicator α",
    "coherence/context_icc1/": "ICC(1) across domains",
    "coherence/retest_r/": "retest r",
}


def coherence_metrics(run: Run) -> list[tuple[str, str]]:
    """(metric, header) of the persona stage's within-cell coherence rows present in the run, in a fixed order."""
    out = []
    for prefix, head in COHERENCE_WITHIN.items():
        names = [prefix] if not prefix.endswith("/") else run.metric_names(prefix)
        out += [
            (m, head + ("" if m == prefix else ": " + m.removeprefix(prefix))) for m in names if run.has(m)
        ]
    return out


def coherence_within_fmt(run: Run, st: Stats, task: str) -> Table:
    """The persona stage's `coherence/*` rows (statistics that need each cell's per-response data): agreement
    of the independent indicators within a cell, consistency across held-out domains, test-retest."""
    t = Table("coherence_within", task, "Coherence within cells (mean over cells [95% CI])", pd.DataFrame())
    cols = coherence_metrics(run)
    if not cols:
        t.note = "not measured: coherence/* (the persona stage's within-cell statistics)"
        return t
    t.frame = _method_table(run, st, task, [m for m, _ in cols], [h for _, h in cols])
    t.note = (
        "indicator α: Cronbach's α of marker count, masked probe and activation across a cell's responses; "
        "ICC(1): share of response variance due to the held-out domain; retest r: two sampling seeds."
    )
    return t


# ------------------------------------------------------------------------------- persona: Goodhart curve


GOODHART_PROXY = {
    "reward": "proxy",
    "rewards/reward_marker/mean": "markers",
    "rewards/reward_classifier/mean": "classifier",
    "rewards/reward_length/mean": "length",
    "rewards/reward_diversity_penalty/mean": "diversity penalty",
}
GOODHART_INDICATORS = {
    "persona/probe_masked": "masked probe",
    "persona/activation": "activation",
    "persona/activation_content": "activation (content)",
    "causal_drop": "ablation drop",
}


def goodhart_pairs(log: list[dict], indicators: pd.DataFrame) -> pd.DataFrame:
    """One GRPO cell's Goodhart curve: at each checkpoint step s, the proxy reward and its components from the
    training log (mean of the logged values at steps in (previous checkpoint, s]), beside the independent
    indicators measured at that checkpoint. `indicators`: rows (checkpoint, metric, value) of the cell;
    `causal_drop` = persona/probe - persona/ablate_probe (how much of the probe the direction carries).
    Proxy rising while the indicators stay flat is reward hacking. Pure: no files, no torch."""
    cols = ["step", *GOODHART_PROXY.values(), *GOODHART_INDICATORS.values()]
    if indicators.empty:
        return pd.DataFrame(columns=cols)
    wide = indicators.pivot_table(index="checkpoint", columns="metric", values="value", aggfunc="mean")
    if {"persona/probe", "persona/ablate_probe"} <= set(wide.columns):
        wide["causal_drop"] = wide["persona/probe"] - wide["persona/ablate_probe"]
    logged = pd.DataFrame([r for r in log if "step" in r]) if log else pd.DataFrame(columns=["step"])
    rows, prev = [], 0
    for s in sorted(int(c) for c in wide.index):
        win = logged[(logged["step"] > prev) & (logged["step"] <= s)] if len(logged) else logged
        proxy = {
            h: (float(win[k].mean()) if k in win and win[k].notna().any() else np.nan)
            for k, h in GOODHART_PROXY.items()
        }
        ind = {
            h: (float(wide.loc[s, k]) if k in wide and pd.notna(wide.loc[s, k]) else np.nan)
            for k, h in GOODHART_INDICATORS.items()
        }
        rows.append({"step": s, **proxy, **ind})
        prev = s
    return pd.DataFrame(rows, columns=cols)


def goodhart_cells(run: Run, task: str) -> dict[str, pd.DataFrame]:
    """cell -> goodhart_pairs for every GRPO cell of `task` (its train/log.jsonl and its checkpoint rows)."""
    import json

    out = {}
    a = run.adapters[(run.adapters["task"] == task) & (run.adapters["method"] == "grpo")]
    for cell, rows in a.groupby("cell"):
        path = run.paths.cell(cell).train_log
        log = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        pairs = goodhart_pairs(log, rows[["checkpoint", "metric", "value"]])
        if len(pairs) and pairs[["proxy", "masked probe"]].notna().any().all():
            out[cell] = pairs
    return out


def goodhart_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "goodhart",
        task,
        "GRPO: the proxy reward against the independent indicators at each checkpoint",
        pd.DataFrame(),
    )
    cells = goodhart_cells(run, task)
    if not cells:
        t.note = "needs GRPO cells with a training log (reward) and persona rows at two or more checkpoints"
        return t
    df = pd.concat([p.assign(cell=c) for c, p in cells.items()], ignore_index=True)
    values = [c for c in df.columns if c not in ("cell", "step") and df[c].notna().any()]
    t.frame = pd.DataFrame(
        [[r["cell"], str(int(r["step"])), *[fmt(r[c]) for c in values]] for _, r in df.iterrows()],
        columns=["cell", "step", *values],
    )
    t.note = (
        "proxy: GRPO's optimised reward and its components, mean over the logged steps since the previous "
        "checkpoint; the indicators were never optimised. Proxy rising while they stay flat is hacking."
    )
    return t


def persona_validity_fmt(run: Run, st: Stats, task: str) -> Table:
    """Whether each persona instrument works on this base model, from the base's persona stage JSON: the
    self-report gate (with its reason), the probe on held-out and external text, the direction's anchors,
    the causal test on the base."""
    import json

    t = Table("persona_validity", task, "Persona instruments on the base model", pd.DataFrame())
    path = run.paths.base(task) / "persona.json"
    if not path.is_file():
        t.note = "no base persona stage file (base/<task>/persona.json)"
        return t
    p = json.loads(path.read_text())
    rows = []
    sr = p.get("self_report") or {}
    gate = sr.get("gate")
    if gate:
        rows.append(
            [
                "self-report",
                "valid" if gate["valid"] else "INVALID",
                f"option mass {fmt(gate['option_mass'])} (min {fmt(gate['min_mass'])}), "
                f"α {fmt(gate['alpha'])} (min {fmt(gate['min_alpha'])})"
                + (
                    f"; forward − reverse {fmt(sr['forward_minus_reverse'][0])}"
                    if "forward_minus_reverse" in sr
                    else ""
                ),
            ]
        )
    pr = p.get("probe") or {}
    if "heldout_auc" in pr:
        rows.append(
            [
                "probe",
                "warn" if pr.get("auc_below_0.9") else "ok",
                f"held-out AUC {fmt(pr['heldout_auc'])}, markers + reward n-grams removed "
                f"{fmt(pr.get('heldout_auc_markers_and_reward_ngrams_removed'))}",
            ]
        )
    if "external_auc" in pr:
        lo, hi = pr["external_auc_ci"]
        rows.append(
            [
                "probe, external pairs",
                "ok" if pr["external_ok"] else "FAIL",
                f"AUC {fmt_ci(pr['external_auc'], lo, hi)} on {pr['external_pairs']} pairs "
                f"(min {fmt(pr['external_threshold'])})",
            ]
        )
    d = p.get("direction") or {}
    if d:
        sep = d.get("separation_by_layer") or []
        rows.append(
            [
                "activation direction",
                "defined" if d.get("defined") else "UNDEFINED",
                f"layer {d.get('layer')}, {d.get('n_anchors', '?')} anchor pairs kept of {d.get('n_prompts', '?')}"
                + (f", separation {fmt(sep[d['layer']])}" if len(sep) > (d.get("layer") or 0) else "")
                + (f"; {d['reason']}" if d.get("reason") else ""),
            ]
        )
    c = p.get("causal") or {}
    if c.get("available"):
        e = c["effects"]
        rows.append(
            [
                "causal test",
                "ok" if e.get("steer_probe", {}).get("delta", 0) > 0 else "no effect",
                f"α {fmt(c['alpha'])}: steering Δprobe {fmt_ci(e['steer_probe']['delta'], *e['steer_probe']['ci'])}, "
                f"ablation Δprobe {fmt_ci(e['ablate_probe']['delta'], *e['ablate_probe']['ci'])}"
                + (
                    "; degenerate answers plain/steered/ablated "
                    + "/".join(fmt(c["degenerate_share"].get(k)) for k in ("plain", "steer", "ablate"))
                    if "degenerate_share" in c
                    else ""
                ),
            ]
        )
    t.frame = pd.DataFrame(rows, columns=["instrument", "verdict", "detail"])
    if gate and not gate["valid"]:
        t.note = gate["reason"] + ": no persona/self_report rows are reported."
    return t


PER_TASK += [coherence_within_fmt, goodhart_fmt, persona_validity_fmt]


def matched_fmt(run: Run, st: Stats, task: str) -> Table:
    t = Table(
        "matched",
        task,
        "Forgetting at matched new-task success (RL's Razor's comparison): mean forgetting "
        "read off each seed's frontier (its sweep points, checkpoints and the base) at one success level; "
        "difference from SFT with a Welch 95% CI over seeds (unadjusted; the primary outcomes above are Holm-adjusted)",
        pd.DataFrame(),
    )
    m = st.matched[st.matched["task"] == task] if len(st.matched) else st.matched
    if m.empty:
        t.note = "needs newtask/success and forgetting/mean at several points (sweep or checkpoints), and an sft arm"
        return t
    rows = [
        [
            r.method,
            fmt(r.target),
            str(int(r.n)),
            fmt_ci(r.value, r.ci_low, r.ci_high),
            "-" if r.method == "sft" else fmt_ci(r.diff, r.diff_low, r.diff_high),
            "-" if r.method == "sft" else fmt_p(r.p),
        ]
        for r in m.itertuples()
    ]
    t.frame = pd.DataFrame(
        rows, columns=["method", "at success", "seeds reaching it", "forgetting [CI]", "minus SFT [CI]", "p"]
    )
    return t


PER_TASK += [matched_fmt]
