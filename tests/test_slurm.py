"""The SLURM executor against a real single-node SLURM (tests/slurm_cluster.py: slurmctld + slurmd + munged
on this machine, partition `cpu`), with the tiny random model:

- a run through SLURM ends with every cell done, the base measured once, and metrics.csv equal to a local
  run's; finishing it locally afterwards redoes nothing;
- a cell whose job is requeued mid-training (`scontrol requeue`) resumes from its last complete checkpoint
  and its training log has every step exactly once;
- a cancelled run (`study cancel`) leaves every JSON file of the run folder readable.

    .venv/bin/python -m pytest tests/test_slurm.py -q -s      # -s shows the job transcript

Skips, loudly, only when the cluster cannot start (the reason and the daemons' logs are in the skip message).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_PROTOCOL
from slurm_cluster import Cluster, ClusterUnavailable
from typer.testing import CliRunner

from study.cli import app
from study.config import load_protocol
from study.executor import SlurmExecutor, SlurmOptions, cancel, load_record, wait
from study.metrics import cell_state as _cell_state
from study.paths import RunPaths
from study.runner import Runner
from study.train import checkpoints

OPTIONS = SlurmOptions(partition="cpu", cpus_per_cell=1, time="10", array_parallelism=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    try:
        c = Cluster(root).start()
    except ClusterUnavailable as e:
        banner = "=" * 100
        msg = f"\n{banner}\nSLURM CLUSTER DID NOT START: the SLURM executor is NOT tested.\n{e}\n{banner}\n"
        sys.stderr.write(msg)
        pytest.skip(msg)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)  # the jobs inherit it too (sbatch exports the environment)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # a local run and a job compute alike
    yield c
    c.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _protocol(path: Path, results: Path, **train) -> Path:
    body = {**TINY_PROTOCOL, "results_dir": str(results), "methods": {"sft": {}, "dpo": {"beta": 0.1}}}
    body["train"] = {**TINY_PROTOCOL["train"], **train}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _say(*parts) -> None:
    print(f"[slurm {time.strftime('%H:%M:%S')}]", *parts, flush=True)


def _transcript(states: dict[str, str]) -> None:
    _say(" ".join(f"{j}={s}" for j, s in states.items()))


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The tiny protocol (SFT and DPO) submitted to SLURM and, meanwhile, run locally; waits for the jobs."""
    root = tmp_path_factory.mktemp("runs")
    (root / "local").mkdir()
    slurm_proto = _protocol(root / "study.yaml", root / "slurm")
    local_proto = _protocol(root / "local" / "study.yaml", root / "local")
    rec = SlurmExecutor(OPTIONS).submit(slurm_proto)
    _say(f"submitted base {rec['base']}, array {rec['array']} {rec['cells']}, report {rec['report']}")
    local_exit = Runner(local_proto).run()  # meanwhile, the same protocol in this process
    rp = RunPaths.for_protocol(slurm_proto, root / "slurm")
    states = wait(rp, poll=1, timeout=240, on_change=_transcript)
    return {
        "root": root,
        "proto": slurm_proto,
        "local_proto": local_proto,
        "rp": rp,
        "record": rec,
        "states": states,
        "local_exit": local_exit,
    }


def test_slurm_run_equals_local_run_and_measures_the_base_once(slurm_run):
    rec, rp, states = slurm_run["record"], slurm_run["rp"], slurm_run["states"]
    assert rec["base"] and rec["array"] and rec["report"] and len(rec["cells"]) == 2
    assert slurm_run["local_exit"] == 0
    assert set(states.values()) == {"COMPLETED"}, (states, _logs(rp))
    assert load_record(rp) == rec  # the run folder has the job ids

    proto = load_protocol(slurm_run["proto"])
    assert all(_cell_state(rp, proto, c)["state"] == "done" for c in proto.cells())
    local = pd.read_csv(slurm_run["root"] / "local" / "study" / "metrics.csv")
    remote = pd.read_csv(rp.metrics)
    assert len(remote) > 10 and set(remote["cell"]) == set(local["cell"])
    key = ["cell", "checkpoint", "metric", "task"]
    pd.testing.assert_frame_equal(
        remote.sort_values(key).reset_index(drop=True),
        local.sort_values(key).reset_index(drop=True),
        rtol=1e-6,
    )
    assert (rp.root / "report.md").is_file()

    base_lines = _base_measurements(rp)
    assert len(base_lines) == 2, base_lines  # newtask and regression, once each (KL has no base)

    # finishing the SLURM run locally redoes nothing: no base measurement, no training
    assert Runner(slurm_run["proto"]).run() == 0
    assert _base_measurements(rp) == base_lines
    assert "resuming" not in rp.log.read_text()

    out = CliRunner().invoke(app, ["status", str(slurm_run["proto"])])
    assert out.exit_code == 0, out.output
    for cell, jid in rec["cells"].items():
        assert cell[:20] in out.output and jid in out.output
    assert "COMPLETED" in out.output
    _say("status:\n" + out.output)


def _more_cells(slurm_run, name: str, methods: dict, seed: int) -> Path:
    """A protocol with the run's name, folder and measurement settings (so its base is already measured) and
    other cells: 400 steps, a checkpoint every 40 (a requeue must land mid-training: a job keeps running
    for seconds after SIGTERM, which submitit ignores, until SLURM kills it)."""
    folder = slurm_run["root"] / name
    folder.mkdir()
    # gradient checkpointing on: it slows the tiny model's steps to what they were when TRL silently enabled it,
    # so that 400 steps outlast the seconds between the first checkpoint and SLURM's kill
    path = _protocol(
        folder / "study.yaml",
        slurm_run["root"] / "slurm",
        steps=400,
        checkpoint_every=40,
        gradient_checkpointing=True,
    )
    body = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**body, "methods": methods, "seeds": [seed]}, sort_keys=False))
    return path


def test_a_requeued_cell_resumes_without_duplicated_steps(slurm_run):
    proto_path = _more_cells(slurm_run, "requeue", {"sft": {}}, seed=0)
    proto = load_protocol(proto_path)
    rp = RunPaths.for_protocol(proto_path, proto.results_dir)
    (cell,) = proto.cells()
    cp = rp.cell(cell.name)

    rec = SlurmExecutor(OPTIONS).submit(proto_path)
    job = rec["cells"][cell.name]
    _say(f"submitted base {rec['base']}, cell {job}, report {rec['report']}")
    assert rec["base"] is None  # the run folder has the base's measurements: no second base job
    _until(lambda: checkpoints(cp.train_dir) if cp.train_dir.is_dir() else [], 150, "a first checkpoint")
    logged = _steps(cp.train_log)
    _say(
        f"cell {job} has checkpoint(s) {[s for s, _ in checkpoints(cp.train_dir)]}, logged up to step "
        f"{max(logged)}: scontrol requeue {job}"
    )
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    seen = []

    def follow(states):
        seen.append(states.get(job))
        _transcript(states)
        if states.get(job) == "PENDING":
            # SLURM holds a requeued job back for a while (BeginTime); let it start at once to save test time
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)

    states = wait(rp, poll=1, timeout=240, on_change=follow, ids=[job])
    assert states[job] == "COMPLETED", (states, _logs(rp))
    assert "PENDING" in seen, seen  # it really went back to the queue
    cancel(rp)  # the report job is not what this test is about
    wait(rp, poll=0.5, timeout=30)
    assert _cell_state(rp, load_protocol(rp.protocol), cell)["state"] == "done"
    log = rp.log.read_text()
    assert f"{cell.name}: resuming from" in log
    steps = _steps(cp.train_log)
    _say(
        f"after the requeue: resumed ({[ln for ln in log.splitlines() if 'resuming' in ln][-1][-60:]}), "
        f"log steps {steps[0]}..{steps[-1]}, {len(steps)} lines with a loss"
    )
    assert steps == list(range(1, cell.train.steps + 1)), steps  # unique and contiguous


def test_a_cancelled_run_leaves_no_corrupt_file(slurm_run):
    proto_path = _more_cells(slurm_run, "cancel", {"sft": {}, "dpo": {"beta": 0.1}}, seed=1)
    # submitted by `study run` with the protocol's `executor:` block (no command-line options)
    body = yaml.safe_load(proto_path.read_text())
    body["executor"] = {
        "kind": "slurm",
        "partition": "cpu",
        "cpus_per_cell": 1,
        "time": "10",
        "array_parallelism": 2,
    }
    proto_path.write_text(yaml.safe_dump(body, sort_keys=False))
    proto = load_protocol(proto_path)
    rp = RunPaths.for_protocol(proto_path, proto.results_dir)
    out = CliRunner().invoke(app, ["run", str(proto_path)])
    assert out.exit_code == 0 and "submitted" in out.output, out.output
    rec = load_record(rp)
    assert rec["options"]["partition"] == "cpu" and rec["options"]["time"] == "10"
    _say(f"submitted base {rec['base']}, array {rec['array']} {rec['cells']}, report {rec['report']}")
    cells = [rp.cell(c.name) for c in proto.cells()]
    _until(
        lambda: any(checkpoints(cp.train_dir) for cp in cells if cp.train_dir.is_dir()),
        150,
        "a cell's first checkpoint",
    )
    out = CliRunner().invoke(app, ["cancel", str(proto_path)])
    assert out.exit_code == 0, out.output
    _say(out.output.strip())
    states = wait(rp, poll=1, timeout=60, on_change=_transcript)
    assert states and set(states.values()) == {"CANCELLED"}, states
    assert load_record(rp)["cancelled"]
    files = [p for p in rp.root.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".json" for p in files) > 10
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())  # raises on a half-written file
        elif p.suffix == ".jsonl":
            [json.loads(line) for line in p.read_text().splitlines()]
    assert not [p for p in files if p.name.endswith(".tmp")]  # no write left half done
    out = CliRunner().invoke(app, ["status", str(proto_path)])
    assert "CANCELLED" in out.output and "partial" in out.output, out.output


# ------------------------------------------------------------------------------------------------ helpers


def _steps(log: Path) -> list[int]:
    """The training steps in a cell's log (one `loss` line per optimizer step)."""
    if not log.is_file():
        return [0]
    return [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r] or [0]


def _base_measurements(rp: RunPaths) -> list[str]:
    return [ln for ln in rp.log.read_text().splitlines() if " INFO base/" in ln]


def _until(cond, timeout: float, what: str) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout:.0f} s")


def _logs(rp: RunPaths) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((rp.root / "slurm" / "logs").glob("*.out"))
    )
