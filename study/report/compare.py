"""Compare runs side by side: per method, forgetting per benchmark, KL and persona coherence.

    python -m study.report.compare results/default results/qwen2.5-3b     # or: study compare RUN_A RUN_B ...

Prints a table (rows: task × quantity × method; columns: runs, each "mean [95% CI]") and writes
comparison.csv, comparison.md and comparison.png/.pdf into `<first run's parent>/compare-<a>-vs-<b>/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from study import io
from study.report.analysis import outcome_values, summary_table
from study.report.comparisons import comparison_outcomes
from study.report.data import Run, label, load_run, method_order, summarise
from study.report.figures import COLORS, PAGE, RC, _fig, color
from study.report.markdown import md_table
from study.report.tables import fmt_ci

RUN_MARKERS = ["o", "s", "D", "^", "v", "P", "X"]


def quantities(run: Run) -> list[str]:
    """What the comparison shows: the outcomes the method comparisons test (forgetting, drift, coherence,
    success), one list for both."""
    return comparison_outcomes(run)


def _long(run: Run, qs: list[str]) -> pd.DataFrame:
    """(task, metric, method, mean, ci_low, ci_high, n) for one run."""
    s = summary_table(run)
    s = s[(s["level"] == "method") & (s["method"] != "base") & s["metric"].isin(qs)] if len(s) else s
    rows = [s[["task", "metric", "method", "mean", "ci_low", "ci_high", "n"]]] if len(s) else []
    if "persona/masked_ratio" in qs:  # derived per cell, so summarised here
        for task in run.tasks:
            d = outcome_values(run, "persona/masked_ratio", task)
            for m, g in d.groupby("method"):
                mean, lo, hi, n = summarise(g["value"])
                rows.append(
                    pd.DataFrame(
                        [(task, "persona/masked_ratio", m, mean, lo, hi, n)],
                        columns=["task", "metric", "method", "mean", "ci_low", "ci_high", "n"],
                    )
                )
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=["task", "metric", "method", "mean", "ci_low", "ci_high", "n"])
    )


def compare_runs(run_dirs: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(wide table of formatted strings, long numeric table with a `run` column, run names)."""
    runs = [load_run(d) for d in run_dirs]
    names = _unique([r.root.name for r in runs])
    qs = list(dict.fromkeys(q for r in runs for q in quantities(r)))
    long = pd.concat(
        [_long(r, qs).assign(run=n) for r, n in zip(runs, names, strict=True)], ignore_index=True
    )
    if long.empty:
        return pd.DataFrame(), long, names
    order_q = {q: i for i, q in enumerate(qs)}
    long = long.sort_values("metric", key=lambda s: s.map(order_q), kind="stable").reset_index(drop=True)
    long["cell"] = [
        fmt_ci(m, lo, hi) + f" (n={int(n)})"
        for m, lo, hi, n in zip(long["mean"], long["ci_low"], long["ci_high"], long["n"], strict=True)
    ]
    wide = long.pivot_table(index=["task", "metric", "method"], columns="run", values="cell", aggfunc="first")
    wide = wide.reindex(columns=names).fillna("–").reset_index()
    order_m = {m: i for i, m in enumerate(method_order(long["method"]))}
    wide = wide.sort_values(
        ["task", "metric", "method"],
        key=lambda s: s.map(order_q) if s.name == "metric" else s.map(order_m) if s.name == "method" else s,
    ).reset_index(drop=True)
    wide.columns.name = None
    return wide, long, names


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def comparison_figure(long: pd.DataFrame, names: list[str], task: str):
    """One panel per quantity; x = method (its colour), one marker shape per run, 95% CI bars."""
    from matplotlib.lines import Line2D

    d = long[long["task"] == task]
    qs = list(dict.fromkeys(d["metric"]))
    methods = method_order(d["method"])
    ncols = min(len(qs), 4)
    nrows = int(np.ceil(len(qs) / ncols))
    fig, axes = _fig(PAGE, 1.7 * nrows + 0.5, nrows, ncols)
    for ax, q in zip(axes.flat, qs, strict=False):
        for j, run in enumerate(names):
            g = d[(d["metric"] == q) & (d["run"] == run)].set_index("method").reindex(methods)
            x = np.arange(len(methods)) + (j - (len(names) - 1) / 2) * 0.7 / len(names)
            for i, m in enumerate(methods):
                r = g.loc[m]
                if not np.isfinite(r["mean"]):
                    continue
                err = np.nan_to_num([[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]]).clip(min=0)
                ax.errorbar(
                    x[i],
                    r["mean"],
                    yerr=err,
                    fmt=RUN_MARKERS[j % len(RUN_MARKERS)],
                    color=color(m),
                    ms=4,
                    capsize=1.5,
                    lw=1,
                    mfc="white" if j % 2 else color(m),
                )
        ax.set_xticks(range(len(methods)), [m.upper() for m in methods])
        ax.set_title(label(q, short=True), loc="left")
    for ax in axes.flat[len(qs) :]:
        ax.set_visible(False)
    handles = [
        Line2D(
            [],
            [],
            color=COLORS["base"],
            marker=RUN_MARKERS[j % len(RUN_MARKERS)],
            ls="",
            mfc="white" if j % 2 else COLORS["base"],
            label=n,
        )
        for j, n in enumerate(names)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(names), 4), frameon=False)
    return fig


def write_comparison(
    run_dirs: list[str | Path], out: Path | None = None, formats=("png", "pdf")
) -> tuple[pd.DataFrame, Path]:
    """Compute, write comparison.csv/.md and one figure per task; returns (wide table, output folder)."""
    import matplotlib as mpl

    wide, long, names = compare_runs(run_dirs)
    out = Path(out or Path(run_dirs[0]).resolve().parent / ("compare-" + "-vs-".join(names)))
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(out / "comparison.csv", long.drop(columns=["cell"], errors="ignore").to_csv(index=False))
    md = [f"# Comparison: {' vs '.join(names)}", "", "Mean over cells [95% CI] (n cells).", ""]
    md += [md_table(wide) if len(wide) else "_No common quantities measured._", ""]
    with mpl.rc_context(RC):
        for task in sorted(long["task"].unique()) if len(long) else []:
            fig = comparison_figure(long, names, task)
            for fmt in formats:
                fig.savefig(out / f"comparison_{task}.{fmt}")
            md += [f"![comparison ({task})](comparison_{task}.png)", ""]
    io.write_text(out / "comparison.md", "\n".join(md))
    return wide, out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m study.report.compare RUN_A RUN_B [...]")
        return 2
    wide, out = write_comparison(argv)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        print(wide.to_string(index=False) if len(wide) else "no common quantities measured")
    print(f"written: {out}")
    return 0
