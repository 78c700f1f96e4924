"""The study's figures, each a small function of the run's metrics (and the fitted statistics).

    python -c "from study.report import report_run; report_run('results/smoke')"   # -> results/smoke/figures/

One colour per method everywhere (seaborn's colour-blind palette), axes labelled with units, sized for a
column (3.4 in) or the page (7 in). Error bars are the same 95% intervals as the tables (t across cells,
`data.summarise`). A figure whose metrics are absent raises `Skip` and is listed as skipped, never faked.
Figures are built on `matplotlib.figure.Figure` objects (no pyplot state), so this works without a display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from study.report.analysis import (
    Stats,
    forgetting_benchmarks,
    law_points,
    persona_indicators,
    predictors,
)
from study.report.data import (
    FORGET_MEAN,
    KL_FWD,
    METHODS,
    NEWTASK,
    Run,
    bounds,
    label,
    method_order,
    summarise,
    unit_of,
)

COLUMN, PAGE = 3.4, 7.0
_PALETTE = sns.color_palette("colorblind", 10)
_FIRST = ["sft", "dpo", "kto", "grpo"]  # their colours stay fixed as arms are added
COLORS = {m: _PALETTE[i] for i, m in enumerate(_FIRST + [m for m in METHODS if m not in _FIRST])} | {
    "base": (0.35, 0.35, 0.35)
}
MARKERS = dict(zip(METHODS, "osD^vPXp", strict=False)) | {"base": "*"}
RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,
    "savefig.bbox": "tight",
    "savefig.dpi": 200,
}


class Skip(Exception):
    """A figure's metrics are absent: the reason is reported instead of a figure."""


def color(method: str):
    if method not in COLORS:  # a method added later still gets a stable colour of its own
        COLORS[method] = _PALETTE[(4 + len(COLORS)) % len(_PALETTE)]
    return COLORS[method]


def _fig(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    with sns.axes_style("ticks"):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _legend(fig: Figure, methods: list[str], extra: list | None = None, ncol: int | None = None) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=color(m),
            marker=MARKERS.get(m, "o"),
            ls="",
            label=m.upper() if m != "base" else "base",
        )
        for m in methods
    ] + (extra or [])
    if not handles:
        return
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol or min(len(handles), 5), frameon=False)


def _dodged(ax, table: pd.DataFrame, cats: list[str], methods: list[str], base: dict | None = None) -> None:
    """Points with 95% CI bars: x = categories, one dodged point per method; base as a grey dash."""
    width = 0.7
    for j, m in enumerate(methods):
        t = table[table["method"] == m].set_index("cat").reindex(cats)
        x = np.arange(len(cats)) + (j - (len(methods) - 1) / 2) * width / max(len(methods), 1)
        err = np.vstack([t["mean"] - t["low"], t["high"] - t["mean"]]).clip(min=0)
        err = np.where(np.isfinite(err), err, 0)
        ax.errorbar(x, t["mean"], yerr=err, fmt=MARKERS.get(m, "o"), color=color(m), ms=4, capsize=1.5, lw=1)
    for i, c in enumerate(cats):
        if base and c in base and np.isfinite(base[c]):
            ax.hlines(base[c], i - width / 2, i + width / 2, color=COLORS["base"], lw=1.2, ls="--")
    ax.set_xticks(np.arange(len(cats)), cats)
    ax.set_xlim(-0.6, len(cats) - 0.4)


def _summ(df: pd.DataFrame, cat_col: str) -> pd.DataFrame:
    rows = []
    for (cat, m), g in df.groupby([cat_col, "method"]):
        mean, lo, hi, n = summarise(g["value"], g["ci_low"], g["ci_high"], clip=bounds(g["metric"].iloc[0]))
        rows.append((cat, m, mean, lo, hi, n))
    return pd.DataFrame(rows, columns=["cat", "method", "mean", "low", "high", "n"])


# ----------------------------------------------------------------------------------------- the figures


def pareto(run: Run, st: Stats, task: str) -> Figure:
    """New-task success vs mean prior-task score per sweep arm; each method's frontier joined by a line."""
    p = st.pareto[st.pareto["task"] == task] if len(st.pareto) else st.pareto
    if p.empty:
        raise Skip("needs newtask/success and lm_eval/* (or forgetting/mean)")
    fig, ax = _fig(COLUMN, 2.7)
    ax = ax[0, 0]
    methods = method_order(p["method"])
    for m in methods:
        g = p[p["method"] == m].sort_values("x")
        xerr = np.nan_to_num(np.vstack([g.x - g.x_low, g.x_high - g.x]).clip(min=0))
        yerr = np.nan_to_num(np.vstack([g.y - g.y_low, g.y_high - g.y]).clip(min=0))
        ax.errorbar(
            g.x,
            g.y,
            xerr=xerr,
            yerr=yerr,
            fmt=MARKERS.get(m, "o"),
            color=color(m),
            ms=7 if m == "base" else 4,
            capsize=1.5,
            lw=0.8,
        )
        front = g[g["on_front"]]
        if len(front) > 1:
            ax.plot(front.x, front.y, color=color(m), lw=1)
    ax.set_xlabel(label(NEWTASK, unit=True))
    ax.set_ylabel(p["y_label"].iloc[0].split(" (")[0])
    _legend(fig, methods)
    return fig


def _law_panel(ax, run: Run, st: Stats, task: str, pred: str, band: bool = True, short: bool = False) -> None:
    pts = law_points(run, pred, task)
    if pts.empty:
        raise Skip(f"needs {pred} and {FORGET_MEAN} in the same cells")
    final = pts.merge(run.final[["cell", "checkpoint"]].drop_duplicates(), on=["cell", "checkpoint"])
    for m in method_order(pts["method"]):
        g, f = pts[pts["method"] == m], final[final["method"] == m]
        ax.scatter(g.x, g.y, s=6, color=color(m), alpha=0.35, lw=0)
        ax.scatter(f.x, f.y, s=16, color=color(m), marker=MARKERS.get(m, "o"), lw=0)
    fit1, fit2 = st.fits.get((task, pred, "all", 1)), st.fits.get((task, pred, "all", 2))
    grid = np.linspace(pts.x.min(), pts.x.max(), 100)
    if fit1 is not None and fit1.coef:
        y, lo, hi = fit1.band(grid)
        ax.plot(grid, y, color="black", lw=1)
        if band:
            ax.fill_between(grid, lo, hi, color="black", alpha=0.12, lw=0)
        ax.set_title(f"R² = {fit1.r2:.2f} [{fit1.r2_low:.2f}, {fit1.r2_high:.2f}]", loc="left")
    if fit2 is not None and fit2.coef:
        ax.plot(grid, fit2.band(grid)[0], color="black", lw=0.8, ls="--")
    ax.axhline(0, color="0.7", lw=0.6, zorder=0)
    ax.set_xlabel(
        label(pred, unit=True, short=short).replace(" (", "\n(") if short else label(pred, unit=True)
    )


def kl_forgetting(run: Run, st: Stats, task: str) -> Figure:
    """Forgetting against forward KL on the new task: cells (large) and their checkpoints (faint), the pooled
    linear fit with its 95% cluster-bootstrap band, the quadratic fit dashed."""
    if not run.has(KL_FWD) or not run.has(FORGET_MEAN):
        raise Skip(f"needs {KL_FWD} and {FORGET_MEAN}")
    fig, ax = _fig(COLUMN, 2.7)
    _law_panel(ax[0, 0], run, st, task, KL_FWD)
    ax[0, 0].set_ylabel("mean forgetting (base − adapter score)")
    _legend(fig, method_order(run.adapters["method"]))
    return fig


def predictor_grid(run: Run, st: Stats, task: str) -> Figure:
    """The same law with each candidate predictor, so the reader sees which predicts forgetting best."""
    preds = [p for p in predictors(run) if not law_points(run, p, task).empty]
    if not preds or not run.has(FORGET_MEAN):
        raise Skip(f"needs {FORGET_MEAN} and at least one of kl/*, lora/delta_norm")
    ncols = min(len(preds), 4)
    nrows = int(np.ceil(len(preds) / ncols))
    fig, axes = _fig(PAGE, 2.2 * nrows + 0.4, nrows, ncols, sharey=True)
    for ax, pred in zip(axes.flat, preds, strict=False):
        _law_panel(ax, run, st, task, pred, short=True)
    for ax in axes.flat[len(preds) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("mean forgetting")
    _legend(fig, method_order(run.adapters["method"]))
    return fig


def forgetting_benchmarks_fig(run: Run, st: Stats, task: str) -> Figure:
    """Forgetting per benchmark by method (mean over cells, 95% CI); 0 = no change from the base."""
    names = forgetting_benchmarks(run)
    if not names:
        raise Skip("needs forgetting/<benchmark>")
    f = run.final[(run.final["task"] == task) & run.final["metric"].isin(names + [FORGET_MEAN])]
    if f.empty:
        raise Skip(f"no forgetting rows on {task} (its cells do not measure regression)")
    f = f.assign(cat=f["metric"].str.removeprefix("forgetting/"))
    cats = [n.removeprefix("forgetting/") for n in names] + (["mean"] if run.has(FORGET_MEAN) else [])
    methods = method_order(f["method"])
    fig, ax = _fig(max(COLUMN, 0.9 * len(cats) + 1), 2.5)
    _dodged(ax[0, 0], _summ(f, "cat"), cats, methods)
    ax[0, 0].axhline(0, color="0.6", lw=0.6, zorder=0)
    ax[0, 0].set_ylabel("forgetting (base − adapter score)")
    _legend(fig, methods)
    return fig


def coherence_indicators(run: Run, st: Stats, task: str) -> Figure:
    """Each persona indicator by method (mean, 95% CI), the base model dashed: a coherent trait moves every
    indicator, a surface one moves the marker rate alone."""
    inds = persona_indicators(run)
    if not inds:
        raise Skip("needs persona/<indicator>")
    f = run.final[(run.final["task"] == task) & run.final["metric"].isin(inds)]
    methods = method_order(f["method"])
    ncols = min(len(inds), 3)
    nrows = int(np.ceil(len(inds) / ncols))
    fig, axes = _fig(PAGE, 1.8 * nrows + 0.4, nrows, ncols)
    b = run.base[run.base["task"] == task]
    for ax, ind in zip(axes.flat, inds, strict=False):
        g = f[f["metric"] == ind].assign(cat=lambda d: d["method"])
        s = _summ(g, "cat")
        base = b.loc[b["metric"] == ind, "value"]
        _dodged(ax, s.assign(cat=s["method"]), methods, methods)
        ax.set_xticks(range(len(methods)), [m.upper() for m in methods])
        if len(base):
            ax.axhline(float(base.mean()), color=COLORS["base"], lw=1, ls="--")
        ax.set_title(ind.removeprefix("persona/"), loc="left")
    for ax in axes.flat[len(inds) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("indicator (own scale)")
    from matplotlib.lines import Line2D

    _legend(fig, methods, [Line2D([], [], color=COLORS["base"], ls="--", label="base model")])
    return fig


def coherence_domains(run: Run, st: Stats, task: str) -> Figure:
    """Each persona indicator per held-out domain by method: consistency across contexts."""
    f = run.final[(run.final["task"] == task) & run.final["metric"].str.startswith("persona/")]
    f = f[f["metric"].str.count("/") == 2]
    if f.empty:
        raise Skip("needs persona/<indicator>/<domain>")
    f = f.assign(ind=f["metric"].str.split("/").str[1], cat=f["metric"].str.split("/").str[2])
    inds = sorted(
        f["ind"].unique(),
        key=lambda i: (
            persona_indicators(run).index(f"persona/{i}") if f"persona/{i}" in persona_indicators(run) else 99
        ),
    )
    cats, methods = sorted(f["cat"].unique()), method_order(f["method"])
    ncols = min(len(inds), 3)
    nrows = int(np.ceil(len(inds) / ncols))
    fig, axes = _fig(PAGE, 1.8 * nrows + 0.4, nrows, ncols)
    for ax, ind in zip(axes.flat, inds, strict=False):
        _dodged(ax, _summ(f[f["ind"] == ind], "cat"), cats, methods)
        ax.set_title(ind, loc="left")
    for ax in axes.flat[len(inds) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("indicator (own scale)")
    for ax in axes[-1, :]:
        ax.set_xlabel("held-out domain")
    _legend(fig, methods)
    return fig


EMERGENCE = [NEWTASK, KL_FWD, FORGET_MEAN]


def emergence(run: Run, st: Stats, task: str) -> Figure:
    """Trajectories over training steps (mean over seeds and sweep points, 95% band) for every metric
    measured at two or more checkpoints, starting from the base model at step 0 (KL and forgetting: 0 by
    definition); the base's own 95% CI is the grey band."""
    a = run.adapters[run.adapters["task"] == task]
    per = a.groupby("metric")["checkpoint"].nunique()
    probes = [m for m in run.metric_names("emergence/") if not m.startswith("emergence/onset/")]
    names = [m for m in EMERGENCE + persona_indicators(run) + probes if per.get(m, 0) >= 2]
    if not names:
        raise Skip("needs metrics at two or more checkpoints (emergence rows)")
    ncols = min(len(names), 4)
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = _fig(PAGE, 1.7 * nrows + 0.4, nrows, ncols)
    methods = method_order(a["method"])
    b = run.base[run.base["task"] == task]
    for ax, name in zip(axes.flat, names, strict=False):
        d = a[a["metric"] == name]
        zero = name.startswith(("kl/", "forgetting/"))
        ref = b[b["metric"] == name]
        start = (
            (0.0, 0.0, 0.0)
            if zero
            else (
                (float(ref["value"].mean()), float(ref["ci_low"].mean()), float(ref["ci_high"].mean()))
                if len(ref)
                else None
            )
        )
        if start is not None and not zero:
            ax.axhspan(start[1], start[2], color=COLORS["base"], alpha=0.12, lw=0)
        for m in methods:
            rows = [
                (step, *summarise(g["value"], clip=bounds(name))[:3])
                for step, g in d[d["method"] == m].groupby("checkpoint")
            ]
            if not rows:
                continue
            if start is not None:
                rows.insert(0, (0, *start))
            t = np.array(rows, dtype=float)
            ax.plot(t[:, 0], t[:, 1], color=color(m), marker=MARKERS.get(m, "o"), ms=2.5, lw=1)
            ax.fill_between(t[:, 0], t[:, 2], t[:, 3], color=color(m), alpha=0.15, lw=0)
        ax.set_title(label(name, short=True), loc="left")
        ax.set_ylabel(unit_of(name))
        ax.set_xlabel("training step")
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    from matplotlib.patches import Patch

    _legend(fig, methods, [Patch(color=COLORS["base"], alpha=0.3, label="base model (95% CI)")])
    return fig


FIGURES = {
    "pareto": (
        pareto,
        "New-task success against mean prior-task score per sweep point (mean over seeds, 95% CI); "
        "each method's Pareto frontier joined.",
    ),
    "kl_forgetting": (
        kl_forgetting,
        "Mean forgetting against forward KL on the new task; large marks are final "
        "adapters, faint ones their checkpoints. Black: pooled linear fit with 95% "
        "cluster-bootstrap band; dashed: quadratic fit.",
    ),
    "forgetting_predictors": (
        predictor_grid,
        "The forgetting law with each candidate predictor (R² with 95% cluster-bootstrap CI).",
    ),
    "forgetting_benchmarks": (
        forgetting_benchmarks_fig,
        "Forgetting per benchmark by method (base − adapter; mean over cells, 95% CI).",
    ),
    "coherence_indicators": (
        coherence_indicators,
        "Persona indicators by method (mean, 95% CI); dashed: base model.",
    ),
    "coherence_domains": (
        coherence_domains,
        "Persona indicators per held-out domain by method (mean, 95% CI).",
    ),
    "emergence": (
        emergence,
        "Trajectories over training from the base at step 0 (mean over seeds and sweep "
        "points, 95% band); grey: the base model's 95% CI.",
    ),
}


@dataclass
class FigureFile:
    name: str
    task: str
    caption: str
    png: Path | None = None
    pdf: Path | None = None
    skipped: str = ""


def make_figures(run: Run, st: Stats, out: Path, formats=("png", "pdf"), dpi: int = 200) -> list[FigureFile]:
    """Draw every figure for every task into `out` (<name>_<task>.png/.pdf, PNGs at `dpi`); skipped ones
    say why."""
    import matplotlib as mpl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    with mpl.rc_context(RC | {"savefig.dpi": dpi}):
        for task in run.tasks:
            for name, (fn, caption) in FIGURES.items():
                ff = FigureFile(name, task, caption)
                try:
                    fig = fn(run, st, task)
                except Skip as e:
                    ff.skipped = str(e)
                    files.append(ff)
                    continue
                except (KeyError, ValueError, IndexError) as e:  # rows this figure needs are not in this run
                    ff.skipped = f"could not be drawn from this run's rows ({type(e).__name__}: {e})"
                    files.append(ff)
                    continue
                for fmt in formats:
                    path = out / f"{name}_{task}.{fmt}"
                    fig.savefig(path)
                    setattr(ff, fmt, path)
                files.append(ff)
    return files


# ------------------------------------------------------------------------------- persona: Goodhart curve


def goodhart(run: Run, st: Stats, task: str) -> Figure:
    """Per GRPO cell: the proxy reward and its components (solid) and the independent indicators (dashed)
    at each checkpoint (study.report.tables.goodhart_pairs)."""
    from study.report.tables import GOODHART_INDICATORS, GOODHART_PROXY, goodhart_cells

    cells = goodhart_cells(run, task)
    if not cells:
        raise Skip("needs GRPO cells with a training log and persona rows at two or more checkpoints")
    names = sorted(cells)[:8]
    ncols = min(len(names), 4)
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = _fig(PAGE, 1.8 * nrows + 0.5, nrows, ncols)
    palette = sns.color_palette("colorblind", len(GOODHART_PROXY) + len(GOODHART_INDICATORS))
    handles = {}
    for ax, cell in zip(axes.flat, names, strict=False):
        d = cells[cell]
        for i, (name, style) in enumerate(
            [(h, "-") for h in GOODHART_PROXY.values()] + [(h, "--") for h in GOODHART_INDICATORS.values()]
        ):
            if name in d and d[name].notna().any():
                (line,) = ax.plot(
                    d["step"],
                    d[name],
                    style,
                    marker="o",
                    ms=2.5,
                    lw=1.2 if name == "proxy" else 0.8,
                    color="black" if name == "proxy" else palette[i],
                    label=name,
                )
                handles.setdefault(name, line)
        ax.set_title(cell, loc="left", fontsize=6)
        ax.set_xlabel("training step")
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(len(handles), 5),
        frameon=False,
        bbox_to_anchor=(0.5, -0.02),
    )
    return fig


FIGURES["goodhart"] = (
    goodhart,
    "GRPO's proxy reward (black) and its components (solid) against indicators it "
    "never optimised (dashed: masked probe, activation, ablation drop) at each "
    "checkpoint, per cell. Proxy rising while the dashed lines stay flat is reward "
    "hacking.",
)
