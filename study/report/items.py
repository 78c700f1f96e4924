"""Item-level method comparisons: every adapter and the base answer the same held-out prompts and the same
benchmark items, so each method's effect can be estimated against the base with the items (prompts or
benchmark questions) and the seeds as crossed random intercepts:

    y[item, cell] = b0 + b_method + u_item + v_seed + e,   u ~ N(0, s_item²), v ~ N(0, s_seed²)

(statsmodels MixedLM, REML, the crossed intercepts as variance components of one group; the base is the
reference level and gets its own seed level). Unlike the cell-level comparisons, which see one number per
cell, this model knows which items are hard for every model, so a method's effect is not confused with the
luck of an item sample, and its standard error counts items and seeds. Wald 95% CIs; p-values Holm-corrected
over the methods of one outcome. Outcomes, per item of the final adapters:

    newtask/success        sigma(m) per held-out prompt (m: persona minus neutral per-token log-likelihood)
    persona/probe          the embedding probe on each held-out greedy answer
    persona/probe_masked   the same with the lexicon markers removed
    lm_eval/<suite>        0/1 correctness per benchmark item (MMLU, HellaSwag; TruthfulQA MC2: its score)

Read from the stage JSONs (they keep every per-item value), so this is a function of the run folder.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from study import io

log = logging.getLogger("study")
COLUMNS = ["task", "outcome", "method", "est", "ci_low", "ci_high", "p", "p_holm", "n_items", "n_obs",
           "sd_item", "sd_seed", "model"]


def _records(stage: dict | None, task: str) -> list[tuple[str, str, float]]:
    """(outcome, item, y) from one stage JSON."""
    if not stage:
        return []
    out = []
    for r in stage.get("responses", []):
        if r.get("metric") == "newtask/pref_margin" and "margin" in r:
            out.append(("newtask/success", f"{task}:{r['id']}", 1 / (1 + math.exp(-r["margin"]))))
        elif r.get("set") == "heldout" and "probe" in r:
            out.append(("persona/probe", f"{task}:{r['id']}", r["probe"]))
            out.append(("persona/probe_masked", f"{task}:{r['id']}", r["probe_masked"]))
        elif "suite" in r and r["suite"] != "humaneval":
            value = next((r[k] for k in ("acc_norm", "acc") if isinstance(r.get(k), (int, float))), None)
            if value is not None:
                out.append((f"lm_eval/{r['suite']}", f"{r['task']}:{r['doc_id']}", float(value)))
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return io.read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def item_table(root: Path) -> pd.DataFrame:
    """One row per (cell, outcome, item) of the final adapters and the base: cell, method, seed, task,
    outcome, item, y. A stage file measured under other settings than the run's protocol.yaml (stale, left
    from before a protocol change) is skipped, as metrics.csv skips it."""
    import yaml

    rows = []
    root = Path(root)
    proto = yaml.safe_load((root / "protocol.yaml").read_text()) if (root / "protocol.yaml").is_file() else None

    def _read(path: Path) -> dict | None:
        stage = _read_json(path)
        if stage and proto is not None and proto.get(path.stem) is not None and stage.get("config") != proto[path.stem]:
            return None
        return stage

    shared = {s: _read(root / "base" / "model" / f"{s}.json") for s in ("regression",)}
    for base in sorted((root / "base").glob("*")) if (root / "base").is_dir() else []:
        if base.name == "model":
            continue
        task = base.name
        stages = {s: _read(base / f"{s}.json") for s in ("newtask", "persona")} | shared
        for stage in stages.values():
            rows += [(f"base-{task}", "base", "base", task, *rec) for rec in _records(stage, task)]
    for cell in sorted((root / "cells").glob("*")) if (root / "cells").is_dir() else []:
        cfg = _read(cell / "cell.json")
        if not cfg or not (cell / "adapter" / "adapter_model.safetensors").is_file():
            continue
        task = cfg["task"]["name"]
        for s in ("newtask", "persona", "regression"):
            rows += [(cell.name, cfg["method"], str(cfg["seed"]), task, *rec)
                     for rec in _records(_read(cell / f"{s}.json"), task)]
    return pd.DataFrame(rows, columns=["cell", "method", "seed", "task", "outcome", "item", "y"])


def holm(p: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN)."""
    p = np.asarray(p, float)
    ok = ~np.isnan(p)
    out = np.full(len(p), np.nan)
    idx = np.where(ok)[0][np.argsort(p[ok])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def fit_outcome(d: pd.DataFrame) -> pd.DataFrame:
    """Each method against the base on one outcome's item-level data (columns method, seed, item, y)."""
    import statsmodels.formula.api as smf

    methods = [m for m in dict.fromkeys(d["method"]) if m != "base"]
    if "base" not in set(d["method"]) or not methods or d["item"].nunique() < 3:
        return pd.DataFrame(columns=COLUMNS)
    d = d.assign(one=1)
    vc = {"item": "0 + C(item)"}
    if d.loc[d["method"] != "base", "seed"].nunique() >= 2:
        vc["seed"] = "0 + C(seed)"
    formula = "y ~ C(method, Treatment('base'))"
    model = f"MixedLM {formula.replace(chr(39) + 'base' + chr(39), 'base')} + (1|item)" + (" + (1|seed)" if "seed" in vc else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = smf.mixedlm(formula, d, groups="one", vc_formula=vc).fit(reml=True)
    ci = res.conf_int()
    names = dict(zip(res.model.exog_names, range(len(res.model.exog_names))))
    vcomp = dict(zip(res.model.exog_vc.names, np.sqrt(np.maximum(res.vcomp, 0.0))))
    rows = []
    for m in methods:
        key = f"C(method, Treatment('base'))[T.{m}]"
        if key not in names:
            continue
        rows.append([m, float(res.fe_params[key]), float(ci.loc[key, 0]), float(ci.loc[key, 1]),
                     float(res.pvalues[key]), int(d.loc[d["method"] == m, "item"].nunique()), int(len(d)),
                     float(vcomp.get("item", np.nan)), float(vcomp.get("seed", np.nan)), model])
    out = pd.DataFrame(rows, columns=["method", "est", "ci_low", "ci_high", "p", "n_items", "n_obs", "sd_item",
                                      "sd_seed", "model"])
    out["p_holm"] = holm(out["p"].tolist())
    return out


def item_models(root: Path) -> pd.DataFrame:
    """The item-level comparison of every method with the base, per task and outcome."""
    items = item_table(root)
    frames = []
    for (task, outcome), d in items.groupby(["task", "outcome"], sort=False):
        try:
            out = fit_outcome(d)
        except Exception as e:  # a singular fit on a degenerate outcome must not sink the report
            log.warning("item-level model for %s/%s failed: %s", task, outcome, e)
            continue
        if len(out):
            frames.append(out.assign(task=task, outcome=outcome))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)[COLUMNS]
