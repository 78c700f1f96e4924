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

COLUMNS = [
    "cell",
    "method",
    "seed",
    "checkpoint",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "task",
    "n",
    "flag",
]
MODEL_LEVEL = ("regression", "probe")  # measure the model, not the task: the base is measured once for all
NOT_ON_BASE = ("kl",)
PERSONA_TRACKED = tuple(
    f"persona/{i}" for i in ("marker_rate", "probe", "probe_masked", "self_report", "activation", "judge")
)  # the base's KL to itself is 0 by definition


# --------------------------------------------------------------------------------------- which stages


def final_stages(proto: Protocol, task=None) -> dict[str, object]:
    """Stage name -> settings measured on the base and every final adapter, in the order they run; with a
    `task`, only the stages that task asks for (`tasks[].stages`, default all)."""
    ck = proto.checkpoints
    out = {
        "newtask": proto.newtask,
        "kl": proto.kl,
        "regression": proto.regression,
        "persona": proto.persona,
        "probe": ck.probe if ck is not None else None,
    }
    keep = getattr(task, "stages", None)
    return {k: v for k, v in out.items() if v is not None and (keep is None or k in keep)}


def checkpoint_stages(proto: Protocol, task=None) -> dict[str, object]:
    """Stage name -> settings measured at intermediate checkpoints (the emergence trajectories)."""
    ck = proto.checkpoints
    if ck is None:
        return {}
    out = {}
    wanted = getattr(task, "checkpoint_stages", None)
    for name, settings in final_stages(proto, task).items():
        if wanted is not None and name not in wanted:
            continue
        if name == "kl" and name in ck.stages:
            out[name] = settings.model_copy(update={"metrics": list(ck.kl_metrics)})
        elif name == "persona" and name in ck.stages:
            update = {} if ck.persona_retest else {"retest_seeds": []}
            update |= {} if ck.persona_causal else {"causal": False}
            out[name] = settings.model_copy(update=update)
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
    return [
        (s, d) for s, d in checkpoints(cp.train_dir) if s < cell.train.steps and (keep is None or s in keep)
    ]


def cell_complete(proto: Protocol, cell: Cell, cp: CellPaths) -> bool:
    """Trained, and every stage file of the final adapter and its checkpoints is current."""
    if not (cp.adapter / "adapter_model.safetensors").is_file():
        return False
    if not all(stage_done(cp.stage(n), stage_key(n, s)) for n, s in final_stages(proto, cell.task).items()):
        return False
    ck = checkpoint_stages(proto, cell.task)
    return all(
        stage_done(cp.checkpoint(step) / f"{n}.json", stage_key(n, s))
        for step, _ in intermediate_checkpoints(proto, cell, cp)
        for n, s in ck.items()
    )


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


def current_result(path: Path, name: str, settings) -> dict | None:
    """A stage file if it was measured with these settings and this stage version (a file left by other
    settings or older code is stale: remeasured on the next run, left out of the table now)."""
    if not stage_done(path, stage_key(name, settings)):
        return None
    return io.read_json(path)


def current_rows(path: Path, name: str, settings) -> list[dict]:
    result = current_result(path, name, settings)
    return result["rows"] if result else []


def rename_probe(rows: list[dict]) -> list[dict]:
    """The probe runs the regression code: its rows are `emergence/<suite>/<metric>`."""
    return [{**r, "metric": "emergence/" + r["metric"].removeprefix("lm_eval/")} for r in rows]


def collect_rows(run: RunPaths, proto: Protocol) -> list[dict]:
    """Every current row of the run (base, final adapters, checkpoints) plus the derived families. A failed
    cell contributes no row; a partial one (killed, measurements pending) its current stage files."""
    rows = []
    final = final_stages(proto)
    for task in proto.tasks:
        for name, settings in final_stages(proto, task).items():
            if name not in NOT_ON_BASE:
                rows += [
                    {
                        "cell": f"base-{task.name}",
                        "method": "base",
                        "seed": None,
                        "checkpoint": 0,
                        "task": task.name,
                        **r,
                    }
                    for r in current_rows(base_stage_path(run, name, task.name), name, settings)
                ]
    reg = final.get("regression")
    base_reg = current_result(run.base_model / "regression.json", "regression", reg) if reg else None
    paired = []
    for cell in proto.cells():
        cp = run.cell(cell.name)
        if cell_state(run, proto, cell)["state"] == "failed":  # a diverged or broken cell's stage files (NaN
            continue  # rows, half its stages) are not results; it reruns on the next `study run`
        keep = {"cell": cell.name, "method": cell.method.value, "seed": cell.seed, "task": cell.task.name}
        ck = checkpoint_stages(proto, cell.task)
        for name, settings in final_stages(proto, cell.task).items():
            rows += [
                {**keep, "checkpoint": cell.train.steps, **r}
                for r in current_rows(cp.stage(name), name, settings)
            ]
        for step, _ in intermediate_checkpoints(proto, cell, cp):
            for name, settings in ck.items():
                rows += [
                    {**keep, "checkpoint": step, **r}
                    for r in current_rows(cp.checkpoint(step) / f"{name}.json", name, settings)
                ]
        rows += lora_rows(proto, cell, cp, keep)
        if base_reg and base_reg.get("items") and "regression" in final_stages(proto, cell.task):
            done = [(cell.train.steps, current_result(cp.stage("regression"), "regression", reg))]
            if "regression" in ck:
                done += [
                    (
                        step,
                        current_result(
                            cp.checkpoint(step) / "regression.json", "regression", ck["regression"]
                        ),
                    )
                    for step, _ in intermediate_checkpoints(proto, cell, cp)
                ]
            for step, result in done:
                if result and result.get("items"):
                    paired += paired_forgetting_rows(base_reg, result, {**keep, "checkpoint": step})
    if paired:
        rows += paired
        flags = {r["metric"].split("/")[1]: r.get("flag") for r in paired}
        for r in rows:  # the base's score on a suite at floor carries the flag too
            parts = r["metric"].split("/")
            if r["method"] == "base" and parts[0] == "lm_eval" and flags.get(parts[1]):
                r["flag"] = flags[parts[1]]
    else:
        rows += forgetting_rows(rows)
    if proto.checkpoints is not None:
        rows += paired_onset_rows(run, proto)
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
            out.append(
                {
                    **keep,
                    "checkpoint": step,
                    "metric": "lora/delta_norm",
                    "value": value,
                    "ci_low": value,
                    "ci_high": value,
                    "n": modules,
                }
            )
    return out


def paired_forgetting_rows(base: dict, adapter: dict | list[dict], keep: dict) -> list[dict]:
    """Forgetting of one adapter, paired with the base on the same items (the regression stage's per-item
    records): `forgetting/<suite>` (base − adapter accuracy, on the suite's row metric), its continuous
    twin `forgetting/<suite>/p_gold` (the probability of the gold choice, normalised over the choices) and
    `forgetting/mean` over the suites that are not at floor. A suite whose base score is within its CI of
    chance is flagged `floor` (flag column) and left out of the mean: a model at chance cannot lose what it
    never had. CIs: a bootstrap over the paired item differences (study.stats.forgetting). `adapter` may be a
    list (the seeds of one method, for the report): then the crossed seeds x items interval."""
    from study.stats.forgetting import align_items, floor_flag, paired_forgetting, paired_forgetting_mean

    adapters = adapter if isinstance(adapter, list) else [adapter]
    out, for_mean = [], {}
    for suite in sorted(set.intersection(*(set(a["items"]) for a in adapters))):
        base_recs = base["items"].get(suite)
        if not base_recs:
            continue
        b, a = align_items(base_recs, [ad["items"][suite] for ad in adapters], key="correct")
        if b.size == 0:
            continue
        chance = float(sum(r.get("chance") or 0.0 for r in base_recs) / len(base_recs))
        flag = floor_flag(b, chance)
        value, lo, hi = paired_forgetting(b, a)
        out.append(
            {
                **keep,
                "metric": f"forgetting/{suite}",
                "value": value,
                "ci_low": lo,
                "ci_high": hi,
                "n": int(b.size),
                "flag": flag or None,
            }
        )
        bp, ap = align_items(base_recs, [ad["items"][suite] for ad in adapters], key="p_gold")
        if bp.size:
            value, lo, hi = paired_forgetting(bp, ap)
            out.append(
                {
                    **keep,
                    "metric": f"forgetting/{suite}/p_gold",
                    "value": value,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": int(bp.size),
                    "flag": flag or None,
                }
            )
        if flag != "floor":
            for_mean[suite] = (b, a)
    if for_mean:
        value, lo, hi = paired_forgetting_mean(for_mean)
        out.append(
            {
                **keep,
                "metric": "forgetting/mean",
                "value": value,
                "ci_low": lo,
                "ci_high": hi,
                "n": len(for_mean),
                "flag": None,
            }
        )
    return out


def forgetting_rows(rows: list[dict]) -> list[dict]:
    """Forgetting from the score rows alone, for stage files without per-item records (older runs): the two
    scores' standard errors combined as independent (conservative: base and adapter answer the same items).
    `forgetting/<suite>` = base − adapter for each suite's accuracy row, `forgetting/mean` their mean."""
    from study.measure.regression import METRICS

    z = 1.959963984540054
    # one score per suite (its accuracy row): p_gold, pass@k>1 and canonical_loglik rows are not averaged in
    primary = {f"lm_eval/{suite}/{metric}" for suite, (metric, _) in METRICS.items()}
    base = {(r["task"], r["metric"]): r for r in rows if r["method"] == "base" and r["metric"] in primary}
    out, per_cell = [], {}
    for r in rows:
        if r["method"] == "base" or r["metric"] not in primary or (r["task"], r["metric"]) not in base:
            continue
        b = base[(r["task"], r["metric"])]
        se = ((b["ci_high"] - b["ci_low"]) ** 2 + (r["ci_high"] - r["ci_low"]) ** 2) ** 0.5 / (2 * z)
        diff = b["value"] - r["value"]
        suite = r["metric"].split("/")[1]
        keep = {k: r[k] for k in ("cell", "method", "seed", "checkpoint", "task")}
        out.append(
            {
                **keep,
                "metric": f"forgetting/{suite}",
                "value": diff,
                "ci_low": diff - z * se,
                "ci_high": diff + z * se,
                "n": r.get("n"),
            }
        )
        per_cell.setdefault((r["cell"], r["checkpoint"]), (keep, []))[1].append((diff, se))
    for keep, diffs in per_cell.values():
        mean = sum(d for d, _ in diffs) / len(diffs)
        se = sum(s * s for _, s in diffs) ** 0.5 / len(diffs)
        out.append(
            {
                **keep,
                "metric": "forgetting/mean",
                "value": mean,
                "ci_low": mean - z * se,
                "ci_high": mean + z * se,
                "n": len(diffs),
            }
        )
    return out


# metric -> (stage, record filter, value of a record): the per-prompt values an onset is tested on
PER_PROMPT = {
    "newtask/success": ("newtask", lambda r: r.get("metric") == "newtask/generation", lambda r: r["score"]),
    "kl/forward_newtask": ("kl", lambda r: r.get("metric") == "kl/forward_newtask", lambda r: r.get("kl")),
    **{
        f"persona/{k}": ("persona", lambda r: r.get("set") == "heldout", (lambda k: lambda r: r.get(k))(k))
        for k in ("probe", "probe_masked", "activation")
    },
    "persona/marker_rate": (
        "persona",
        lambda r: r.get("set") == "heldout",
        lambda r: None if r.get("markers") is None else float(r["markers"] > 0),
    ),
}


def _per_prompt(result: dict | None, metric: str) -> dict:
    """{prompt id: value} of one metric in a stage file (samples of one prompt averaged)."""
    if not result:
        return {}
    _, keep, value = PER_PROMPT[metric]
    out: dict = {}
    for r in result.get("responses") or result.get("sequences") or []:
        if keep(r) and (v := value(r)) is not None and math.isfinite(v):
            out.setdefault(r["id"], []).append(float(v))
    return {k: sum(v) / len(v) for k, v in out.items()}


def paired_onset_rows(run: RunPaths, proto: Protocol) -> list[dict]:
    """`emergence/onset/<metric>` per cell: the first step (intermediate checkpoints, then the final adapter)
    at which the paired per-prompt difference from the reference is significant (study.stats.onsets: a
    one-sided paired test per look against the protocol's `checkpoints.min_effect`, Bonferroni over looks x
    indicators, so a cell's family-wise false-onset rate is at most 5%). The reference is the control cell
    of the same task and seed when the protocol has one (the placebo), else the base; KL needs the control
    (the base's KL is 0 by definition, not a measurement). NaN: no onset within the budget. The row sits at
    the cell's final step; `n` = looks."""
    from study.config import Method
    from study.stats.onsets import align_prompts, onsets

    def trajectory(cell: Cell) -> dict[str, dict[int, dict]]:
        final, ck = final_stages(proto, cell.task), checkpoint_stages(proto, cell.task)
        cp = run.cell(cell.name)
        looks = [
            (s, lambda n, s=s: cp.checkpoint(s) / f"{n}.json", ck)
            for s, _ in intermediate_checkpoints(proto, cell, cp)
        ]
        looks.append((cell.train.steps, cp.stage, final))
        out: dict[str, dict[int, dict]] = {}
        for metric, (stage, _, _) in PER_PROMPT.items():
            for step, where, stages in looks:
                if stage in stages:
                    values = _per_prompt(current_result(where(stage), stage, stages[stage]), metric)
                    if values:
                        out.setdefault(metric, {})[step] = values
        return out

    cells = proto.cells()
    controls = {(c.task.name, c.seed): c for c in cells if c.method is Method.control}
    out = []
    for cell in cells:
        traj = {m: t for m, t in trajectory(cell).items() if len(t) >= 2}
        if not traj:
            continue
        control = controls.get((cell.task.name, cell.seed)) if cell.method is not Method.control else None
        ref_traj = trajectory(control) if control else {}
        adapter, reference = {}, {}
        for metric, t in traj.items():
            if control is not None:
                ref = ref_traj.get(metric)
                if not ref or set(ref) != set(t):
                    continue
            elif metric.startswith("kl/"):
                continue  # no control cell: KL has no reference to test against
            else:
                stage = PER_PROMPT[metric][0]
                settings = final_stages(proto, cell.task)[stage]
                ref = _per_prompt(
                    current_result(run.base(cell.task.name) / f"{stage}.json", stage, settings), metric
                )
                if not ref:
                    continue
            a, r = align_prompts(t, ref)
            if r is None or any(len(v) < 2 for v in a.values()):
                continue
            adapter[metric], reference[metric] = a, r
        if not adapter:
            continue
        found = onsets(adapter, reference, min_effect=proto.checkpoints.min_effect)
        keep = {
            "cell": cell.name,
            "method": cell.method.value,
            "seed": cell.seed,
            "task": cell.task.name,
            "checkpoint": cell.train.steps,
        }
        out += [
            {
                **keep,
                "metric": f"emergence/onset/{m}",
                "value": v,
                "ci_low": None,
                "ci_high": None,
                "n": len(adapter[m]),
                "flag": "vs control" if control else "vs base",
            }
            for m, v in found.items()
        ]
    return out
