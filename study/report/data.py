"""Load a run folder for the report: the tidy metrics table, each cell's config, the optional per-item scores.

    from study.report.data import load_run
    run = load_run("results/smoke"); run.final.head()

Only pandas, numpy, scipy and the stdlib: the report must work on a copied run folder without the models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from study.config import Method
from study.paths import RunPaths

METHODS = [m.value for m in Method]  # table order, from the one list of methods
NEWTASK = "newtask/success"
FORGET_MEAN = "forgetting/mean"
KL_FWD = "kl/forward_newtask"
# Candidate predictors of forgetting, the RL's Razor one first; `_per_token` variants join when present.
PREDICTORS = ["kl/forward_newtask", "kl/reverse_newtask", "kl/forward_general", "lora/delta_norm"]
KL_METRICS = ["kl/forward_newtask", "kl/reverse_newtask", "kl/forward_general"]
PERSONA_INDICATORS = ["marker_rate", "probe", "probe_masked", "self_report", "activation", "judge"]
OPTIONAL = {"persona/judge"}  # the LLM judge only runs where a GPU and a judge model exist
STATS_CELL = "stats"
# Units for axis labels and tables (a metric family -> its unit).
UNITS = {
    "kl/": "nats",
    "lora/delta_norm": "Frobenius",
    "forgetting/": "base − adapter score",
    "newtask/success": "share of held-out prompts",
    "emergence/onset": "training step",
}

LABELS = {
    "newtask/success": "new-task success",
    "forgetting/mean": "mean forgetting",
    "kl/forward_newtask": "forward KL D(π0‖πθ), new task",
    "kl/reverse_newtask": "reverse KL D(πθ‖π0), new task",
    "kl/forward_general": "forward KL, general text",
    "lora/delta_norm": "LoRA weight-change norm",
    "persona/masked_ratio": "masked / unmasked probe ratio",
}


SHORT = {
    "kl/forward_newtask": "forward KL, new task",
    "kl/reverse_newtask": "reverse KL, new task",
    "kl/forward_general": "forward KL, general text",
    "lora/delta_norm": "LoRA ΔW norm",
}


def label(metric: str, unit: bool = False, short: bool = False) -> str:
    """A human label for a metric name, optionally with its unit: 'forward KL ... (nats)'."""
    text = (SHORT if short else LABELS).get(metric) or LABELS.get(metric) or metric
    parts = metric.split("/")
    if (
        parts[0] == "emergence" and len(parts) == 3 and parts[1] != "onset"
    ):  # the checkpoints' regression probe
        text = f"{parts[1]} probe ({parts[2]})"
    for family in ("persona", "forgetting", "emergence/onset"):
        if text.startswith(family + "/") and text.count("/") == family.count("/") + 1:
            text = f"{family.replace('/', ' ')}: " + text.removeprefix(family + "/")
    if unit:
        u = unit_of(metric)
        if u:
            text += f" ({u})"
    return text


def unit_of(metric: str) -> str:
    if metric.endswith("_per_token") and metric.startswith("kl/"):
        return "nats per token"
    for prefix, u in UNITS.items():
        if metric.startswith(prefix):
            return u
    return ""


def method_order(methods) -> list[str]:
    """base first, then the four methods in the study's order, then anything else alphabetically."""
    known = ["base", *METHODS]
    present = list(dict.fromkeys(methods))
    return [m for m in known if m in present] + sorted(m for m in present if m not in known)


def sweep_label(sweep: dict | None) -> str:
    """{'learning_rate': 2e-05} -> 'lr=2e-05' (short, stable, empty without a sweep)."""
    if not sweep:
        return ""
    short = {"learning_rate": "lr", "beta": "β", "steps": "steps"}
    return ",".join(f"{short.get(k, k)}={_fmt_num(v)}" for k, v in sorted(sweep.items()))


def _fmt_num(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


BOUNDED = ("newtask/success", "newtask/persona_rate", "lm_eval/", "persona/marker_rate")


def bounds(metric: str) -> tuple[float, float] | None:
    """(0, 1) for shares and accuracies, so that a t-interval is not printed past what is possible."""
    return (0.0, 1.0) if str(metric).startswith(BOUNDED) else None


def summarise(
    values, ci_low=None, ci_high=None, level: float = 0.95, clip: tuple[float, float] | None = None
) -> tuple[float, float, float, int]:
    """(mean, low, high, n) over cells: a t-interval across cells (seeds) when n >= 2; with one cell, that
    cell's own measurement CI (the only uncertainty there is). `clip` bounds the interval (see `bounds`)."""
    m, lo, hi, n = _summarise(values, ci_low, ci_high, level)
    if clip is not None and n:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return m, lo, hi, n


def _summarise(values, ci_low, ci_high, level):
    from scipy import stats as st

    x = np.asarray(values, dtype=float)
    keep = ~np.isnan(x)
    x = x[keep]
    n = len(x)
    if n == 0:
        return (math.nan, math.nan, math.nan, 0)
    m = float(x.mean())
    if n == 1:
        lo = float(np.asarray(ci_low, dtype=float)[keep][0]) if ci_low is not None else math.nan
        hi = float(np.asarray(ci_high, dtype=float)[keep][0]) if ci_high is not None else math.nan
        return (m, lo, hi, 1)
    half = float(st.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return (m, m - half, m + half, n)


@dataclass
class Run:
    """One run folder, read once: `metrics` (measurements only, no stats rows) and the cells' configs."""

    root: Path
    metrics: pd.DataFrame
    cells: dict[str, dict] = field(default_factory=dict)
    protocol: dict | None = None
    manifest: dict | None = None
    notes: list[str] = field(
        default_factory=list
    )  # how the table was completed (derived metrics), for the reader

    @property
    def name(self) -> str:
        return (self.protocol or {}).get("name") or self.root.name

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.root)

    @cached_property
    def tasks(self) -> list[str]:
        return sorted(t for t in self.metrics["task"].dropna().unique())

    @cached_property
    def methods(self) -> list[str]:
        return [m for m in method_order(self.metrics["method"].dropna().unique()) if m != "base"]

    @cached_property
    def adapters(self) -> pd.DataFrame:
        return self.metrics[self.metrics["method"] != "base"]

    @cached_property
    def final(self) -> pd.DataFrame:
        """Adapter rows at each cell's final step (emergence rows at earlier checkpoints left out)."""
        df = self.adapters
        return df[df["checkpoint"] == df["final_step"]]

    @cached_property
    def base(self) -> pd.DataFrame:
        return self.metrics[self.metrics["method"] == "base"]

    def has(self, metric: str) -> bool:
        return bool((self.metrics["metric"] == metric).any())

    def metric_names(self, prefix: str = "") -> list[str]:
        return sorted(m for m in self.metrics["metric"].unique() if m.startswith(prefix))


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv with typed columns; summary rows (cell `stats`) written by an earlier report are dropped."""
    df = pd.read_csv(path, dtype={"cell": str, "method": str, "metric": str, "task": str})
    for col in ("value", "ci_low", "ci_high", "n"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").round().astype("Int64")
    df["checkpoint"] = pd.to_numeric(df["checkpoint"], errors="coerce").round().astype("Int64")
    if "task" not in df:
        df["task"] = ""
    df["task"] = df["task"].fillna("")
    return df[df["cell"] != STATS_CELL].reset_index(drop=True)


def lm_eval_primary(metrics) -> dict[str, str]:
    """One score per benchmark: `lm_eval/<bench>/<metric>` preferring acc_norm, acc, pass@1, mc2, exact_match."""
    pref = ["acc_norm", "acc", "pass@1", "mc2", "exact_match"]
    by_bench: dict[str, list[str]] = {}
    for m in metrics:
        parts = str(m).split("/")
        if len(parts) == 3 and parts[0] == "lm_eval" and not parts[2].endswith("stderr"):
            by_bench.setdefault(parts[1], []).append(m)
    out = {}
    for bench, names in sorted(by_bench.items()):
        ranked = sorted(
            names, key=lambda n: (pref.index(n.split("/")[2]) if n.split("/")[2] in pref else 99, n)
        )
        out[bench] = ranked[0]
    return out


def floor_notes(df: pd.DataFrame) -> list[str]:
    """A line per task naming the suites at floor for the base (its score within its CI of chance): their
    forgetting is noise and stays out of forgetting/mean (the `flag` column of metrics.csv)."""
    if "flag" not in df.columns:
        return []
    base = df[(df["method"] == "base") & (df["flag"] == "floor") & df["metric"].str.startswith("lm_eval/")]
    return [
        f"{task}: suites at floor for this base model (left out of forgetting/mean): "
        + ", ".join(sorted({m.split("/")[1] for m in g["metric"]}))
        for task, g in base.groupby("task")
    ]


def with_forgetting(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A table without `forgetting/*` rows (written by other code) gets them from study.metrics, the one
    implementation; the note says so."""
    if df["metric"].str.startswith("forgetting/").any() or not df["metric"].str.startswith("lm_eval/").any():
        return df, []
    from study.metrics import forgetting_rows

    rows = forgetting_rows(df.replace({np.nan: None}).to_dict("records"))
    if not rows:
        return df, []
    note = (
        "forgetting/* derived from lm_eval/* as base − adapter by study.metrics.forgetting_rows (the two "
        "scores' CIs combined as independent: no per-item records in this table)"
    )
    return pd.concat([df, pd.DataFrame(rows)], ignore_index=True), [note]


def _sweep_from_name(cell: str, method: str) -> str:
    """'snark-dpo-learning_rate2e-05-s1-abc' -> 'learning_rate2e-05' (a fallback when cell.json is missing)."""
    parts = cell.split("-")
    if method not in parts:
        return ""
    i = parts.index(method)
    rest = parts[i + 1 : -2]  # drop -s<seed>-<hash>
    return "-".join(rest)


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder: metrics.csv, cells/*/cell.json, protocol.yaml and manifest.json."""
    root = Path(run_dir)
    paths = RunPaths(root)
    if not paths.metrics.is_file():
        raise FileNotFoundError(f"{paths.metrics} not found: run `study run PROTOCOL` first")
    df, notes = with_forgetting(read_metrics(paths.metrics))
    notes += floor_notes(df)
    cells: dict[str, dict] = {}
    if paths.cells.is_dir():
        for cfg in sorted(paths.cells.glob("*/cell.json")):
            try:
                cells[cfg.parent.name] = json.loads(cfg.read_text())
            except (OSError, json.JSONDecodeError):
                continue
    protocol = None
    if paths.protocol.is_file():
        import yaml  # PyYAML: a parser, no model code

        protocol = yaml.safe_load(paths.protocol.read_text())
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.is_file() else None

    sweep, steps = {}, {}
    for name in df["cell"].unique():
        cfg = cells.get(name)
        if cfg is not None:
            sweep[name] = sweep_label(cfg.get("sweep"))
            steps[name] = (cfg.get("train") or {}).get("steps")
    df["sweep"] = [
        sweep.get(c, _sweep_from_name(c, m) if m != "base" else "")
        for c, m in zip(df["cell"], df["method"], strict=True)
    ]
    df["arm"] = [m if not s else f"{m} {s}" for m, s in zip(df["method"], df["sweep"], strict=True)]
    last = df.groupby("cell")["checkpoint"].transform("max")
    df["final_step"] = [pd.NA if steps.get(c) is None else steps[c] for c in df["cell"]]
    df["final_step"] = df["final_step"].fillna(last).astype("Int64")
    # A cell whose final-step rows are missing but which has rows at its last checkpoint: use those.
    has_final = (df["checkpoint"] == df["final_step"]).fillna(False).groupby(df["cell"]).any()
    no_final = set(has_final[~has_final].index)
    if no_final:
        mask = df["cell"].isin(no_final)
        df.loc[mask, "final_step"] = last[mask]
    return Run(root=root, metrics=df, cells=cells, protocol=protocol, manifest=manifest, notes=notes)


ITEM_KEYS = ("responses", "items", "samples")


def missing_metrics(run: Run) -> list[str]:
    """The metric families the study expects that this run does not have (the report says so)."""
    have = set(run.metrics["metric"].unique())
    missing = []
    for m in [NEWTASK, *PREDICTORS, FORGET_MEAN]:
        if m not in have:
            missing.append(m)
    for prefix in ("lm_eval/", "forgetting/", "emergence/onset/"):
        if not any(h.startswith(prefix) and h != FORGET_MEAN for h in have):
            missing.append(prefix + "*")
    for ind in PERSONA_INDICATORS:
        name = f"persona/{ind}"
        if name not in have and name not in OPTIONAL:
            missing.append(name)
    if not any(h.startswith("persona/") and h.count("/") == 2 for h in have):
        missing.append("persona/<indicator>/<domain>")
    return missing
