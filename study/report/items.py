"""Item-level method comparisons: every adapter and the base answer the same held-out prompts and the same
benchmark items, so each method's effect against the base is read item by item (item difficulty cancels) with
the cell (method x seed) as the replicated unit: `study.stats.items.effects_vs_reference` averages each cell's
per-item differences from the base and gives a t-interval over the method's cells (df = cells - 1); p-values
Holm-corrected over the methods of one outcome. (A crossed item x seed mixed model counted items as replicates
of a method and rejected 10-20 % of the time under the null: tests/test_calibration.py.) Outcomes, per item of
the final adapters:

    newtask/success        sigma(m) per held-out prompt (m: persona minus neutral per-token log-likelihood)
    persona/probe          the embedding probe on each held-out greedy answer
    persona/probe_masked   the same with the lexicon markers removed
    lm_eval/<suite>        0/1 correctness per benchmark item (MMLU, HellaSwag; TruthfulQA MC2: its score)

Read from the stage JSONs (they keep every per-item value), so this is a function of the run folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from study import io
from study.stats.items import COLUMNS as ITEM_COLUMNS
from study.stats.items import effects_vs_reference

log = logging.getLogger("study")
COLUMNS = ["task", "outcome", *ITEM_COLUMNS]


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


def _stage_reader(root: Path):
    """A reader of stage JSONs that skips one measured under other settings than the run's protocol.yaml
    (stale, left from before a protocol change), as metrics.csv skips it."""
    import yaml

    proto = (
        yaml.safe_load((root / "protocol.yaml").read_text()) if (root / "protocol.yaml").is_file() else None
    )

    def _read(path: Path) -> dict | None:
        stage = _read_json(path)
        if (
            stage
            and proto is not None
            and proto.get(path.stem) is not None
            and stage.get("config") != proto[path.stem]
        ):
            return None
        return stage

    return _read


def paired_forgetting_summary(root: Path, groups: dict[tuple, list[str]]) -> dict[tuple, tuple]:
    """The paired interval of forgetting over several cells (a method's or an arm's seeds) from the
    regression stage's per-item records: {key: cells} -> {(*key, metric): (mean, low, high)} for every
    forgetting/* metric study.metrics.paired_forgetting_rows gives (the crossed seeds x items interval of
    study.stats.forgetting). Groups with a cell lacking per-item records, or with one cell, are left out."""
    from study.metrics import paired_forgetting_rows

    root = Path(root)
    read = _stage_reader(root)
    base = read(root / "base" / "model" / "regression.json")
    if not base or not base.get("items"):
        return {}
    out = {}
    for key, cells in groups.items():
        regs = [read(root / "cells" / c / "regression.json") for c in cells]
        if len(regs) < 2 or not all(r and r.get("items") for r in regs):
            continue
        for row in paired_forgetting_rows(base, regs, {}):
            out[(*key, row["metric"])] = (row["value"], row["ci_low"], row["ci_high"])
    return out


def item_table(root: Path) -> pd.DataFrame:
    """One row per (cell, outcome, item) of the final adapters and the base: cell, method, seed, task,
    outcome, item, y. A stage file measured under other settings than the run's protocol.yaml (stale, left
    from before a protocol change) is skipped, as metrics.csv skips it."""
    rows = []
    root = Path(root)
    _read = _stage_reader(root)
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
            rows += [
                (cell.name, cfg["method"], str(cfg["seed"]), task, *rec)
                for rec in _records(_read(cell / f"{s}.json"), task)
            ]
    return pd.DataFrame(rows, columns=["cell", "method", "seed", "task", "outcome", "item", "y"])


def fit_outcome(d: pd.DataFrame) -> pd.DataFrame:
    """Each method against the base on one outcome's item-level data (columns method, cell, item, y)."""
    if "base" not in set(d["method"]) or d["item"].nunique() < 3:
        return pd.DataFrame(columns=COLUMNS)
    return effects_vs_reference(d, "base")


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
