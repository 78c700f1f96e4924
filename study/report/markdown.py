"""results/<protocol>/report.md: the same tables and figures as the paper, readable on GitHub or in an editor.

study report results/smoke && less results/smoke/report.md
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from study import io
from study.report.analysis import Stats
from study.report.data import Run
from study.report.figures import FigureFile
from study.report.tables import Table, build_tables

SECTIONS = [
    ("New-task success", ["success"]),
    ("Forgetting", ["forgetting"]),
    ("Drift: KL and weight change", ["drift"]),
    ("The forgetting law", ["law", "law_by_method", "law_within"]),
    ("Pareto frontiers", ["pareto"]),
    ("Forgetting at matched new-task success", ["matched"]),
    ("Method comparisons", ["mde", "comparisons", "items"]),
    ("Persona coherence", ["persona", "coherence"]),
    ("Emergence", ["onsets"]),
]
FIGURES_IN = {
    "Forgetting": ["forgetting_benchmarks"],
    "The forgetting law": ["kl_forgetting", "forgetting_predictors"],
    "Pareto frontiers": ["pareto"],
    "Persona coherence": ["coherence_indicators", "coherence_domains"],
    "Emergence": ["emergence"],
}


SECTIONS.append(
    (
        "Persona instruments: validity, coherence within cells, reward hacking",
        ["persona_validity", "coherence_within", "goodhart"],
    )
)
FIGURES_IN["Persona instruments: validity, coherence within cells, reward hacking"] = ["goodhart"]


def md_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pipes escaped)."""
    if df.empty:
        return ""
    esc = [[str(v).replace("|", "\\|") for v in row] for row in df.itertuples(index=False)]
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    return "\n".join([head, sep, *("| " + " | ".join(r) + " |" for r in esc)])


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def primary_lines(run: Run, st: Stats) -> list[str]:
    """The pre-declared primary outcomes, stated plainly with their intervals and the minimum detectable effect
    `study power` predicted before the run; 'not detected' is read against that MDE, never as 'no effect'.
    The primaries are one Holm family (comparisons.holm_primaries: the matched-success Welch p and each
    comparison's own p adjusted together); each verdict reads the adjusted p."""
    from study.report import stats as S
    from study.report.comparisons import matched_estimable, primaries

    out = ["## Primary outcomes", ""]
    for p in primaries(run):
        metric, task = str(p["metric"]), p.get("task")
        a, b = (str(c) for c in p.get("contrast", ["grpo", "sft"]))
        mde = st.mde[(st.mde["metric"] == metric) & (st.mde["task"] == task)] if len(st.mde) else st.mde
        mde_txt = (
            f"; the design's minimum detectable effect (study power) is {_num(mde['mde'].iloc[0])}"
            if len(mde)
            else ""
        )
        head = f"- **{metric}, {a} − {b}** (task `{task}`): "
        if "@matched" in metric:
            m = st.matched
            m = m[(m["task"] == task) & (m["method"] == a)] if len(m) else m
            if not len(m) or b != "sft":
                out.append(head + f"not available (needs the matched-success table against sft){mde_txt}.")
                continue
            r = m.iloc[0]
            if not matched_estimable(r):
                base_s = r["base_success"]
                reach = m.get("reach", pd.Series([float("nan")])).iloc[0]
                ref = st.matched[(st.matched["task"] == task) & (st.matched["method"] == b)]
                ref_reach = ref["reach"].iloc[0] if len(ref) and "reach" in ref else float("nan")
                out.append(
                    head + f"**not estimable**: the methods' success frontiers meet only at the base's own "
                    f"success ({_num(base_s)}), where forgetting is 0 by construction — {a}'s seeds reached a "
                    f"median best success of {_num(reach)}, {b}'s {_num(ref_reach)}; a matched comparison needs "
                    f"{a} to raise new-task success above the base (a learning-rate sweep, more steps){mde_txt}."
                )
                continue
            p_holm = float(r.get("p_holm", r["p"]))
            significant = p_holm == p_holm and p_holm < S.ALPHA
            seen = "less" if r["diff"] < 0 else "more"
            verdict = f"{a} forgets {seen} than {b}" if significant else "no difference detected"
            out.append(
                head + f"at new-task success {_num(r['target'])}, {_num(r['diff'])} "
                f"[{_num(r['diff_low'])}, {_num(r['diff_high'])}] (Welch over seeds; p = {_num(r['p'])}, "
                f"Holm p = {_num(p_holm)}; {int(r['n'])} seeds reached it): **{verdict}**{mde_txt}."
            )
            continue
        c = st.comparisons
        hit = c[(c["task"] == task) & (c["outcome"] == metric) & (c["family"] == "primary")] if len(c) else c
        if not len(hit):
            out.append(head + f"not measured in this run{mde_txt}.")
            continue
        r = hit.iloc[0]
        sign = 1 if (r["a"], r["b"]) == (a, b) else -1
        lo, hi = sorted((sign * r["ci_low"], sign * r["ci_high"]))
        out.append(
            head + f"{_num(sign * r['est'])} [{_num(lo)}, {_num(hi)}], Holm p = {_num(r['p_holm'])}: "
            f"**{r['verdict']}**{mde_txt}."
        )
    return out + ["", "Everything after this section is exploratory.", ""]


def _table(t: Table, multi_task: bool) -> list[str]:
    title = f"**{t.title}**" + (f" — task `{t.task}`" if multi_task and t.task else "")
    lines = [title, ""]
    if t.frame.empty:
        lines.append(f"_Not available: {t.note}._" if t.note else "_Not measured on this task._")
    else:
        lines.append(md_table(t.frame))
        if t.note:
            lines += ["", f"_{t.note}_"]
    return lines + [""]


def render(run: Run, st: Stats, figures: list[FigureFile], base: Path) -> str:
    tables = build_tables(run, st)
    multi = len(run.tasks) > 1
    git = (run.manifest or {}).get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    lines = [f"# Report: {run.name}", ""]
    desc = (run.protocol or {}).get("description")
    if desc:
        lines += [desc, ""]
    lines += [
        f"Run folder `{run.root}`, git commit {commit}. Generated by `study.report` from `metrics.csv`; "
        "every number below is computed, none typed. Intervals are 95%: t across cells for means, "
        "cluster bootstrap over cells for R², bootstrap for Hedges' g.",
        "",
    ]
    lines += primary_lines(run, st)
    lines += ["## Checks", ""] + _table(tables["checks"][0], False) + _table(tables["calibration"][0], False)
    for note in run.notes:
        lines += [f"**Note:** {note}.", ""]
    if st.missing:
        lines += ["**Not measured in this run:** " + ", ".join(f"`{m}`" for m in st.missing), ""]
    for _, r in st.power.iterrows():
        if r.message:
            lines += [f"**Power ({r.task}):** {r.message}.", ""]
    for heading, names in SECTIONS:
        lines += [f"## {heading}", ""]
        for name in names:
            for t in tables.get(name, []):
                lines += _table(t, multi)
        for f in figures:
            if f.name in FIGURES_IN.get(heading, []):
                if f.png is not None:
                    rel = (
                        Path(f.png).resolve().relative_to(base.resolve())
                        if Path(f.png).resolve().is_relative_to(base.resolve())
                        else Path(f.png)
                    )
                    lines += [f"![{f.name} ({f.task})]({rel.as_posix()})", "", f"_{f.caption}_", ""]
                else:
                    lines += [f"_Figure `{f.name}` ({f.task}) not drawn: {f.skipped}._", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(run: Run, st: Stats, figures: list[FigureFile], path: Path | None = None) -> Path:
    """Write report.md into the run folder (or `path`) and return its path."""
    path = Path(path or run.root / "report.md")
    io.write_text(path, render(run, st, figures, path.parent))
    return path
