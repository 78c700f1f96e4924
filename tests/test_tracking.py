"""study.tracking, offline: each finished cell becomes a TensorBoard run (event files) and an MLflow run (a
file store), named by its cell id, with its resolved config and final metrics; a relog duplicates nothing.
Skips loudly when the tracker package is absent (`pip install -e .[track]`)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pandas as pd
import pytest
from conftest import TINY_PROTOCOL

from study import io
from study.config import load_protocol
from study.paths import RunPaths
from study.tracking import log_run, report_to_list


def _need(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        msg = f"{pkg} is NOT INSTALLED: report_to {pkg} is not tested (pip install -e .[track])"
        sys.stderr.write(f"\n{'=' * 80}\n{msg}\n{'=' * 80}\n")
        pytest.skip(msg)


@pytest.fixture
def run(write_protocol):
    """A run folder as the runner leaves it: one cell done (config, training log, metrics.csv rows at
    checkpoint 2 and the final step 4), one cell not done (must not be logged)."""
    body = {
        **TINY_PROTOCOL,
        "methods": {"sft": {}, "dpo": {"beta": 0.1}},
        "report_to": ["tensorboard", "mlflow"],
    }
    path = write_protocol(body)
    proto = load_protocol(path)
    rp = RunPaths.for_protocol(path, proto.results_dir)
    done, pending = proto.cells()
    cp = rp.cell(done.name)
    io.write_json(cp.config, done.model_dump(mode="json"))
    io.write_json(cp.status, {"state": "done"})
    cp.train_dir.mkdir(parents=True)
    cp.train_log.write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 - s / 10}) + "\n" for s in range(1, 5))
    )
    rows = [
        {
            "cell": done.name,
            "method": "sft",
            "seed": 0,
            "checkpoint": ck,
            "metric": m,
            "value": v,
            "ci_low": v - 0.1,
            "ci_high": v + 0.1,
            "task": "snark",
            "n": 4,
        }
        for ck, m, v in [
            (2, "newtask/success", 0.25),
            (4, "newtask/success", 0.75),
            (4, "kl/forward_newtask", 0.5),
            (4, "emergence/onset/newtask/success", float("nan")),
        ]
    ]
    pd.DataFrame(rows).to_csv(rp.metrics, index=False)
    return rp, proto, done, pending


def test_report_to_list(run):
    _, proto, _, _ = run
    assert report_to_list(proto) == ["tensorboard", "mlflow"]
    assert report_to_list(proto.model_copy(update={"report_to": []})) == []


def test_tensorboard_event_files(run):
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rp, proto, done, pending = run
    assert log_run(rp, proto, ["tensorboard"]) == {"tensorboard": [done.name]}
    folders = sorted(p.name for p in (rp.root / "tracking" / "tensorboard").iterdir())
    assert folders == [done.name]  # a run per finished cell, named by its id
    acc = EventAccumulator(str(rp.root / "tracking" / "tensorboard" / done.name)).Reload()
    final = acc.Scalars("final/newtask/success")
    assert [(e.step, e.value) for e in final] == [(4, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("newtask/success")] == [(2, 0.25), (4, 0.75)]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert done.key in text or json.loads(text.strip("`").removeprefix("json\n"))["seed"] == 0
    assert log_run(rp, proto, ["tensorboard"]) == {}  # unchanged: not logged again


def test_mlflow_file_store(run, monkeypatch):
    _need("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rp, proto, done, pending = run
    assert log_run(rp, proto, ["mlflow"]) == {"mlflow": [done.name]}
    client = MlflowClient(tracking_uri=(rp.root / "tracking" / "mlruns").absolute().as_uri())
    exp = client.get_experiment_by_name(f"forgetting-study/{rp.root.name}")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == [done.name]
    r = runs[0]
    assert (
        r.data.metrics["final/newtask/success"] == 0.75 and r.data.metrics["final/kl/forward_newtask"] == 0.5
    )
    assert r.data.params["method"] == "sft" and r.data.params["train.steps"] == "4"
    assert r.data.params["train.learning_rate"] == str(done.train.learning_rate)
    history = client.get_metric_history(r.info.run_id, "newtask/success")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.25), (4, 0.75)]
    assert r.info.status == "FINISHED"
    # the second cell finishes: only it is logged on the next call
    io.write_json(rp.cell(pending.name).status, {"state": "done"})
    assert log_run(rp, proto, ["mlflow"]) == {"mlflow": [pending.name]}
    assert len(client.search_runs([exp.experiment_id])) == 2
