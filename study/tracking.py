"""Experiment tracking: each cell of a run logged as a tracker run named by its cell id, with its resolved
config (cell.json), its final metrics (metrics.csv at the cell's final step), its trajectory (every measured
checkpoint, as steps) and its training log (train/log.jsonl). Backends by the protocol's `report_to`:

    report_to: [tensorboard, mlflow]     # in the protocol; wandb too

- tensorboard: event files in results/<run>/tracking/tensorboard/<cell>/ (`tensorboard --logdir` there);
- mlflow: the tracking server in $MLFLOW_TRACKING_URI, else a file store in results/<run>/tracking/mlruns/
  (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri` there), one experiment per run folder;
- wandb: offline runs in results/<run>/tracking/ unless $WANDB_MODE says otherwise (`wandb sync` later).

The trackers are optional (`pip install -e .[track]`): one that is not installed is skipped with a warning.
Logging reads only the run folder, after metrics.csv is written (`log_run`), so a cell is logged the same
whether it ran locally or on SLURM; a cell already logged with the same content is not logged again.
`report_to_list(proto)` is what TRL's `report_to` training argument should get.

    python -m study.tracking results/default     # (re)log a finished run folder
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

from study import io
from study.paths import RunPaths

log = logging.getLogger("study")

BACKENDS = ("tensorboard", "mlflow", "wandb")


def report_to_list(proto) -> list[str]:
    """The protocol's trackers (field `report_to`, default none), for TRL's `report_to` and for `log_run`."""
    got = list(getattr(proto, "report_to", None) or [])
    unknown = [b for b in got if b not in BACKENDS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; known: {', '.join(BACKENDS)}")
    return got


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= _flatten(v, key + ".")
        else:
            out[key] = v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v)
    return out


def cell_records(rp: RunPaths, proto) -> list[dict]:
    """What is logged per finished cell: name, config, final metrics, trajectory and training log."""
    import pandas as pd

    table = pd.read_csv(rp.metrics) if rp.metrics.is_file() else pd.DataFrame(columns=["cell"])
    out = []
    for cell in proto.cells():
        cp = rp.cell(cell.name)
        status = io.read_json(cp.status) if cp.status.is_file() else {}
        if status.get("state") != "done":
            continue
        rows = table[table["cell"] == cell.name]
        values = pd.to_numeric(rows["value"], errors="coerce")
        rows = rows[
            values.notna() & values.abs().ne(float("inf"))
        ]  # NaN (e.g. no onset) is not a metric value
        final = rows[rows["checkpoint"] == cell.train.steps]
        trajectory = [
            (int(r.checkpoint), r.metric, float(r.value))
            for r in rows.itertuples()
            if not r.metric.startswith("emergence/onset/")
        ]
        train = []
        if cp.train_log.is_file():
            for line in cp.train_log.read_text().splitlines():
                row = json.loads(line)
                train += [
                    (row["step"], f"train/{k}", float(v))
                    for k, v in row.items()
                    if k != "step" and isinstance(v, int | float) and math.isfinite(v)
                ]
        config = cell.model_dump(mode="json")
        out.append(
            {
                "cell": cell.name,
                "method": cell.method.value,
                "seed": cell.seed,
                "config": config,
                "final": {r.metric: float(r.value) for r in final.itertuples()},
                "trajectory": trajectory,
                "train": train,
            }
        )
    return out


def _digest(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_run(rp: RunPaths, proto, backends: list[str] | None = None) -> dict[str, list[str]]:
    """Log every finished cell of the run to each backend; returns backend -> cells logged now."""
    backends = report_to_list(proto) if backends is None else backends
    if not backends:
        return {}
    records = cell_records(rp, proto)
    root = rp.root / "tracking"
    done_path = root / "logged.json"
    done = io.read_json(done_path) if done_path.is_file() else {}
    logged: dict[str, list[str]] = {}
    for backend in backends:
        fn = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}[backend]
        todo = [r for r in records if done.get(backend, {}).get(r["cell"]) != _digest(r)]
        if not todo:
            continue
        try:
            fn(rp, todo)
        except ImportError as e:
            warnings.warn(
                f"report_to {backend}: not installed ({e}); `pip install -e .[track]`", stacklevel=2
            )
            continue
        done.setdefault(backend, {}).update({r["cell"]: _digest(r) for r in todo})
        logged[backend] = [r["cell"] for r in todo]
        io.write_json(done_path, done)
        log.info("tracking: %d cell(s) logged to %s", len(todo), backend)
    return logged


def _tensorboard(rp: RunPaths, records: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    for rec in records:
        folder = rp.root / "tracking" / "tensorboard" / rec["cell"]
        shutil.rmtree(folder, ignore_errors=True)  # a relog replaces the cell's events, never duplicates them
        w = SummaryWriter(log_dir=str(folder))
        w.add_text("config", "```json\n" + json.dumps(rec["config"], indent=2) + "\n```", 0)
        for step, metric, value in rec["train"] + rec["trajectory"]:
            w.add_scalar(metric, value, step)
        for metric, value in rec["final"].items():
            w.add_scalar(f"final/{metric}", value, rec["config"]["train"]["steps"])
        w.close()


def _mlflow(rp: RunPaths, records: list[dict]) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        # the run folder's own file store: no server, no database; MLflow 3 keeps the file backend in
        # maintenance mode and asks for this opt-in (`mlflow migrate-filestore` converts it to sqlite)
        uri = (rp.root / "tracking" / "mlruns").absolute().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    name = f"forgetting-study/{rp.root.name}"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    now = int(time.time() * 1000)
    for rec in records:
        run = client.create_run(
            exp_id,
            run_name=rec["cell"],
            tags={"cell": rec["cell"], "method": rec["method"], "seed": str(rec["seed"])},
        )
        rid = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flatten(rec["config"]).items()]
        metrics = [Metric(m, v, now, s) for s, m, v in rec["train"] + rec["trajectory"]]
        metrics += [
            Metric(f"final/{m}", v, now, rec["config"]["train"]["steps"]) for m, v in rec["final"].items()
        ]
        for i in range(0, max(len(params), len(metrics), 1), 100):  # log_batch takes at most 100 params
            client.log_batch(
                rid,
                metrics=metrics[i : i + 100],
                params=params[i : i + 100],
                tags=[RunTag("study.run", str(rp.root))] if i == 0 else [],
            )
        client.set_terminated(rid)


def _wandb(rp: RunPaths, records: list[dict]) -> None:
    import wandb

    folder = rp.root / "tracking"
    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        run = wandb.init(
            project=f"forgetting-study-{rp.root.name}",
            name=rec["cell"],
            config=rec["config"],
            dir=str(folder),
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="finish_previous",
        )
        for step, metric, value in sorted(rec["train"] + rec["trajectory"]):
            run.log({metric: value}, step=step)
        run.summary.update({f"final/{m}": v for m, v in rec["final"].items()})
        run.finish()


if __name__ == "__main__":
    import sys

    from study.config import load_protocol

    run = Path(sys.argv[1])
    print(log_run(RunPaths(run), load_protocol(run / "protocol.yaml")))
