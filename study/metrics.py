"""What a run's files mean: which stage files a protocol expects, which are current, and the tidy table
built from them (metrics.csv). Pure functions on files and rows; no torch, no model, so the runner and the
report share one implementation and a copied run folder can be re-tabulated anywhere.

    from study.metrics import collect_metrics; collect_metrics(RunPaths(Path("results/default")), proto)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from study import io
from study.config import Cell, Protocol
from study.measure import VERSIONS
from study.paths import CellPaths, RunPaths, checkpoints

log = logging.getLogger("study")

COLUMNS = ["cell", "method", "seed", "checkpoint", "metric", "value", "ci_low", "ci_high", "task", "n"]
MODEL_LEVEL = ("regression", "probe")  # measure the model, not the task: the base is measured once for all
NOT_ON_BASE = ("kl",)  # the base's KL to itself is 0 by definition


# --------------------------------------------------------------------------------------- which stages


def final_stages(proto: Protocol) -> dict[str, object]:
    """Stage name -> settings measured on the base and every final adapter, in the order they run."""
    ck = proto.checkpoints
    out = {"newtask": proto.newtask, "kl": proto.kl, "regression": proto.regression, "persona": proto.persona,
           "probe": ck.probe if ck is not None else None}
    return {k: v for k, v in out.items() if v is not None}


def checkpoint_stages(proto: Protocol) -> dict[str, object]:
    """Stage name -> settings measured at intermediate checkpoints (the emergence trajectories)."""
    ck = proto.checkpoints
    if ck is None:
        return {}
    out = {}
    for name, settings in final_stages(proto).items():
        if name == "kl" and name in ck.stages:
            out[name] = settings.model_copy(update={"metrics": list(ck.kl_metrics)})
        elif name == "persona" and name in ck.stages:
            out[name] = settings if ck.persona_retest else settings.model_copy(update={"retest_seeds": []})
        elif name == "probe" or name in ck.stages:
            out[name] = settings
    return out


def stage_key(name: str, settings) -> str:
    """A stage file's cache key: its settings and its stage's code version."""
    blob = {"settings": settings.model_dump(mode="json"), "version": VERSIONS[name]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]


def stage_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return io.read_json(path).get("config_hash") == key
    except (json.JSONDecodeError, OSError):
        return False


def base_stage_path(run: RunPaths, name: str, task: str) -> Path:
    return (run.base_model if name in MODEL_LEVEL else run.base(task)) / f"{name}.json"


def intermediate_checkpoints(proto: Protocol, cell: Cell, cp: CellPaths) -> list[tuple[int, Path]]:
    """The cell's saved checkpoints before its final step that the protocol measures."""
    if proto.checkpoints is None or not cp.train_dir.is_dir():
        return []
    keep = proto.checkpoints.steps
    return [(s, d) for s, d in checkpoints(cp.train_dir) if s < cell.train.steps and (keep is None or s in keep)]


def cell_complete(proto: Protocol, cell: Cell, cp: CellPaths) -> bool:
    """Trained, and every stage file of the final adapter and its checkpoints is current."""
    if not (cp.adapter / "adapter_model.safetensors").is_file():
        return False
    if not all(stage_done(cp.stage(n), stage_key(n, s)) for n, s in final_stages(proto).items()):
        return False
    ck = checkpoint_stages(proto)
    return all(stage_done(cp.checkpoint(step) / f"{n}.json", stage_key(n, s))
               for step, _ in intermediate_checkpoints(proto, cell, cp) for n, s in ck.items())


def cell_state(run: RunPaths, proto: Protocol, cell: Cell) -> dict:
    """{"state": done|failed|partial|pending, ...}, computed from the cell's files and their keys (a failure
    is read from status.json only while the cell is not complete)."""
    cp = run.cell(cell.name)
    if cell_complete(proto, cell, cp):
        return {"state": "done"}
    if cp.status.is_file():
        try:
            st = io.read_json(cp.status)
        except (json.JSONDecodeError, OSError):
            st = {}
        if st.get("state") == "failed":
            return st
    steps = [s for s, _ in checkpoints(cp.train_dir)] if cp.train_dir.is_dir() else []
    if (cp.adapter / "adapter_model.safetensors").is_file():
        return {"state": "partial", "detail": "trained, measurements pending"}
    if steps:
        return {"state": "partial", "detail": f"checkpoint at step {steps[-1]}/{cell.train.steps}"}
    return {"state": "pending"}


# ---------------------------------------------------------------------------------------------- table


def current_rows(path: Path, name: str, settings) -> list[dict]:
    """A stage file's rows if it was measured with these settings and this stage version (a file left by
    other settings or older code is stale: remeasured on the next run, left out of the table now)."""
    if not stage_done(path, stage_key(name, settings)):
        return []
    return io.read_json(path)["rows"]


def rename_probe(rows: list[dict]) -> list[dict]:
    """The probe runs the regression code: its rows are `emergence/<suite>/<metric>`."""
    return [{**r, "metric": "emergence/" + r["metric"].removeprefix("lm_eval/")} for r in rows]


def collect_rows(run: RunPaths, proto: Protocol) -> list[dict]:
    """Every current row of the run (base, final adapters, checkpoints) plus the derived families. A failed
    cell contributes no row; a partial one (killed, measurements pending) its current stage files."""
    rows = []
    final = final_stages(proto)
    for task in proto.tasks:
        for name, settings in final.items():
            if name not in NOT_ON_BASE:
                rows += [{"cell": f"base-{task.name}", "method": "base", "seed": None, "checkpoint": 0,
                          "task": task.name, **r}
                         for r in current_rows(base_stage_path(run, name, task.name), name, settings)]
    ck = checkpoint_stages(proto)
    for cell in proto.cells():
        cp = run.cell(cell.name)
        if cell_state(run, proto, cell)["state"] == "failed":  # a diverged or broken cell's stage files (NaN
            continue  # rows, half its stages) are not results; it reruns on the next `study run`
        keep = {"cell": cell.name, "method": cell.method.value, "seed": cell.seed, "task": cell.task.name}
        for name, settings in final.items():
            rows += [{**keep, "checkpoint": cell.train.steps, **r} for r in current_rows(cp.stage(name), name, settings)]
        for step, _ in intermediate_checkpoints(proto, cell, cp):
            for name, settings in ck.items():
                rows += [{**keep, "checkpoint": step, **r}
                         for r in current_rows(cp.checkpoint(step) / f"{name}.json", name, settings)]
        rows += lora_rows(proto, cell, cp, keep)
    rows += forgetting_rows(rows)
    if proto.checkpoints is not None:
        rows += onset_rows(rows)
    return rows


def collect_metrics(run: RunPaths, proto: Protocol) -> Path:
    """Rebuild metrics.csv from the run's current stage files: one tidy table."""
    import pandas as pd

    df = pd.DataFrame(collect_rows(run, proto), columns=COLUMNS)
    df["seed"] = df["seed"].astype("Int64")  # the base has no seed: an empty cell, not NaN-as-float
    io.write_text(run.metrics, df.to_csv(index=False))
    return run.metrics


def lora_rows(proto: Protocol, cell: Cell, cp: CellPaths, keep: dict) -> list[dict]:
    """`lora/delta_norm` (the adapter's ||ΔW||_F, exact: its CI is the value) for the final adapter and every
    intermediate checkpoint that is measured."""
    from study.lora_norm import delta_norm

    found = [(cell.train.steps, cp.adapter), *intermediate_checkpoints(proto, cell, cp)]
    out = []
    for step, folder in found:
        if (folder / "adapter_model.safetensors").is_file():
            try:
                value, modules = delta_norm(folder)
            except Exception as e:  # a corrupt adapter: its cell is marked failed elsewhere; no row here
                log.warning("lora/delta_norm of %s: %s", folder, e)
                continue
            out.append({**keep, "checkpoint": step, "metric": "lora/delta_norm", "value": value, "ci_low": value,
                        "ci_high": value, "n": modules})
    return out


def forgetting_rows(rows: list[dict]) -> list[dict]:
    """`forgetting/<suite>` = base score - adapter score for every `lm_eval/<suite>/<metric>` row, and their
    mean `forgetting/mean`. CI: the two scores' standard errors (from their CIs) combined as independent,
    which is conservative since base and adapter answer the same items."""
    z = 1.959963984540054
    base = {(r["task"], r["metric"]): r for r in rows if r["method"] == "base" and r["metric"].startswith("lm_eval/")}
    out, per_cell = [], {}
    for r in rows:
        if r["method"] == "base" or not r["metric"].startswith("lm_eval/") or (r["task"], r["metric"]) not in base:
            continue
        b = base[(r["task"], r["metric"])]
        se = ((b["ci_high"] - b["ci_low"]) ** 2 + (r["ci_high"] - r["ci_low"]) ** 2) ** 0.5 / (2 * z)
        diff = b["value"] - r["value"]
        suite = r["metric"].split("/")[1]
        keep = {k: r[k] for k in ("cell", "method", "seed", "checkpoint", "task")}
        out.append({**keep, "metric": f"forgetting/{suite}", "value": diff, "ci_low": diff - z * se,
                    "ci_high": diff + z * se, "n": r.get("n")})
        per_cell.setdefault((r["cell"], r["checkpoint"]), (keep, []))[1].append((diff, se))
    for keep, diffs in per_cell.values():
        mean = sum(d for d, _ in diffs) / len(diffs)
        se = sum(s * s for _, s in diffs) ** 0.5 / len(diffs)
        out.append({**keep, "metric": "forgetting/mean", "value": mean, "ci_low": mean - z * se,
                    "ci_high": mean + z * se, "n": len(diffs)})
    return out


def tracked(metric: str) -> bool:
    """Metrics whose emergence onset is read: the new-task success (held-out and in-domain), the forward KL,
    each persona indicator (not its per-domain values), the regression probe and mean forgetting."""
    parts = metric.split("/")
    return (metric in ("newtask/success", "newtask/success_indomain", "kl/forward_newtask", "forgetting/mean")
            or (parts[0] == "persona" and len(parts) == 2)
            or (parts[0] == "emergence" and len(parts) == 3))


def onset_rows(rows: list[dict]) -> list[dict]:
    """`emergence/onset/<metric>` per cell: the first step (intermediate checkpoints, then the final adapter)
    whose 95% CI excludes the base's value (0 for KL and forgetting, which the base has by definition);
    empty (NaN) if none does within the budget. The row sits at the cell's final step; `n` = steps examined."""
    base = {(r["task"], r["metric"]): r["value"] for r in rows if r["method"] == "base"}
    traj: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] != "base" and tracked(r["metric"]) and r.get("ci_low") is not None:
            traj.setdefault((r["cell"], r["metric"]), []).append(r)
    out = []
    for (_, metric), points in traj.items():
        ref = 0.0 if metric.startswith(("kl/", "forgetting/")) else base.get((points[0]["task"], metric))
        steps = sorted({p["checkpoint"] for p in points})
        if ref is None or len(steps) < 2:  # no base to compare with, or no trajectory (final step only)
            continue
        points.sort(key=lambda p: p["checkpoint"])
        onset = next((p["checkpoint"] for p in points
                      if p["ci_low"] is not None and p["ci_high"] is not None
                      and not (p["ci_low"] <= ref <= p["ci_high"])), math.nan)
        last = points[-1]
        out.append({k: last[k] for k in ("cell", "method", "seed", "checkpoint", "task")}
                   | {"metric": f"emergence/onset/{metric}", "value": onset, "ci_low": None, "ci_high": None,
                      "n": len(steps)})
    return out
