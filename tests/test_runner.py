"""The runner on the tiny model: a full study, resuming after a kill, skipping done work, isolating failures."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from study import io
from study.config import load_protocol
from study.metrics import COLUMNS
from study.metrics import cell_state as _cell_state
from study.paths import RunPaths
from study.runner import Runner
from tests.conftest import TINY_PROTOCOL


def cell_state(run: RunPaths, cell):
    """The cell's state as `study status` computes it, from its files and the run's resolved protocol."""
    return _cell_state(run, load_protocol(run.protocol), cell)


def _adapter_mtimes(run: RunPaths):
    return {
        p.parent.parent.name: p.stat().st_mtime_ns
        for p in run.cells.glob("*/adapter/adapter_model.safetensors")
    }


def test_full_run_then_rerun_skips(write_protocol):
    path = write_protocol(TINY_PROTOCOL)
    runner = Runner(path)
    assert runner.run() == 0
    run = runner.run_paths
    df = pd.read_csv(run.metrics)
    assert list(df.columns[:8]) == COLUMNS[:8]
    assert (df.cell == "stats").any() and (run.root / "report.md").is_file()  # the report ran at the end
    df = df[df.cell != "stats"]  # the report's summary rows
    cells = load_protocol(path).cells()
    assert set(df["cell"]) == {c.name for c in cells} | {"base-snark"}
    success = df[df.metric == "newtask/success"]
    assert len(success) == len(cells) + 1
    assert ((success.value >= success.ci_low) & (success.value <= success.ci_high)).all()
    assert (run.root / "protocol.yaml").is_file() and io.read_json(run.manifest)["starts"][-1]["versions"][
        "trl"
    ]
    assert "done" in run.log.read_text()
    before = _adapter_mtimes(run)
    base_before = (run.base("snark") / "newtask.json").stat().st_mtime_ns
    assert Runner(path).run() == 0
    assert _adapter_mtimes(run) == before  # nothing retrained
    assert (run.base("snark") / "newtask.json").stat().st_mtime_ns == base_before  # base measured once


def test_failing_cell_does_not_stop_others(write_protocol, monkeypatch):
    import study.train as train

    real = train.make_trainer

    def boom(cell, *a, **k):
        if cell.method == "dpo":
            raise RuntimeError("simulated failure")
        return real(cell, *a, **k)

    monkeypatch.setattr(train, "make_trainer", boom)
    path = write_protocol(TINY_PROTOCOL)
    runner = Runner(path)
    assert runner.run() == 1
    states = {c.method.value: cell_state(runner.run_paths, c) for c in load_protocol(path).cells()}
    assert states["dpo"]["state"] == "failed" and "simulated failure" in states["dpo"]["error"]
    assert all(s["state"] == "done" for m, s in states.items() if m != "dpo")
    monkeypatch.setattr(train, "make_trainer", real)
    assert Runner(path).run() == 0  # a rerun retries the failed cell only


def test_corrupt_adapter_marks_cell_failed(write_protocol):
    path = write_protocol(dict(TINY_PROTOCOL, methods={"sft": {}, "kto": {}}))
    runner = Runner(path)
    assert runner.run() == 0
    cell = load_protocol(path).cells()[0]
    cp = runner.run_paths.cell(cell.name)
    (cp.adapter / "adapter_model.safetensors").write_bytes(b"not a tensor file")
    cp.stage("newtask").unlink()
    assert Runner(path).run() == 1
    assert cell_state(runner.run_paths, cell)["state"] == "failed"


def test_kill_mid_cell_then_resume(write_protocol):
    body = dict(
        TINY_PROTOCOL,
        methods={"sft": {}, "dpo": {}},
        train=dict(TINY_PROTOCOL["train"], steps=30, checkpoint_every=5),
    )
    path = write_protocol(body)
    run = RunPaths.for_protocol(path, load_protocol(path).results_dir)
    cells = load_protocol(path).cells()
    second = run.cell(cells[1].name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "run", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(second.train_dir.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(second.train_dir.glob("checkpoint-*")), "the second cell never reached a checkpoint"
    assert not (second.adapter / "adapter_model.safetensors").exists()
    first_adapter = run.cell(cells[0].name).adapter / "adapter_model.safetensors"
    first_mtime = first_adapter.stat().st_mtime_ns
    assert cell_state(run, cells[1])["state"] in ("partial", "pending")

    assert Runner(path).run() == 0
    assert first_adapter.stat().st_mtime_ns == first_mtime  # the done cell was not redone
    assert "resuming from" in run.log.read_text()
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in second.train_log.read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # no duplicated steps after the resume
    assert all(cell_state(run, c)["state"] == "done" for c in cells)


@pytest.mark.parametrize("broken", ["checkpoint"])
def test_incomplete_checkpoint_is_dropped(tmp_path, broken):
    from study.train import _drop_incomplete, checkpoints

    d = tmp_path / "train"
    (d / "checkpoint-10").mkdir(parents=True)
    (d / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"x")
    assert checkpoints(d) == []
    _drop_incomplete(d)
    assert not (d / "checkpoint-10").exists()


def test_forgetting_rows_are_base_minus_adapter():
    from study.metrics import forgetting_rows

    def row(cell, method, metric, value, half):
        return {
            "cell": cell,
            "method": method,
            "seed": 0,
            "checkpoint": 4,
            "task": "snark",
            "metric": metric,
            "value": value,
            "ci_low": value - half,
            "ci_high": value + half,
            "n": 100,
        }

    rows = [
        row("base-snark", "base", "lm_eval/mmlu/acc", 0.30, 0.05),
        row("c", "sft", "lm_eval/mmlu/acc", 0.25, 0.05),
        row("base-snark", "base", "lm_eval/hellaswag/acc_norm", 0.40, 0.05),
        row("c", "sft", "lm_eval/hellaswag/acc_norm", 0.42, 0.05),
        row("c", "sft", "newtask/success", 0.9, 0.1),
    ]
    out = {r["metric"]: r for r in forgetting_rows(rows)}
    assert set(out) == {"forgetting/mmlu", "forgetting/hellaswag", "forgetting/mean"}
    assert out["forgetting/mmlu"]["value"] == pytest.approx(0.05)
    assert out["forgetting/hellaswag"]["value"] == pytest.approx(-0.02)
    assert out["forgetting/mean"]["value"] == pytest.approx(0.015)
    half = out["forgetting/mmlu"]["ci_high"] - out["forgetting/mmlu"]["value"]
    assert half == pytest.approx(0.05 * 2**0.5)


def test_cell_lock_excludes_a_second_runner_and_is_released_when_its_process_dies(write_protocol):
    """Kernel locks (filelock): a live holder makes a second runner skip the cell and exit non-zero; a
    holder killed with SIGKILL leaves nothing to clean up."""
    path = write_protocol(dict(TINY_PROTOCOL, methods={"sft": {}}))
    runner = Runner(path)
    cell = load_protocol(path).cells()[0]
    cp = runner.run_paths.cell(cell.name)
    cp.root.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(600)",
            str(cp.lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert runner.run() == 1  # skipped: another process holds it
        assert not (cp.adapter / "adapter_model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    assert Runner(path).run() == 0  # the dead holder's lock is gone with it
    assert cell_state(runner.run_paths, cell)["state"] == "done"


def test_checkpoints_are_measured_and_carry_their_step(write_protocol):
    body = dict(
        TINY_PROTOCOL,
        methods={"sft": {}, "grpo": {"num_generations": 4}},
        checkpoints={"probe": {"suites": ["hellaswag"], "limit": {"hellaswag": 3}}},
    )
    path = write_protocol(body)
    runner = Runner(path)
    assert runner.run() == 0
    df = pd.read_csv(runner.run_paths.metrics)
    df = df[df.cell != "stats"]
    cells = [c for c in df.cell.unique() if not c.startswith("base")]
    for cell in cells:
        d = df[df.cell == cell]
        assert sorted(d.checkpoint.unique()) == [2, 4]  # checkpoint-2, then the final adapter
        at2 = set(d[d.checkpoint == 2].metric)
        assert {"newtask/success", "kl/forward_newtask", "emergence/hellaswag/acc_norm"} <= at2
        assert "kl/reverse_newtask" not in at2 and "lm_eval/hellaswag/acc_norm" not in at2  # final-only
        assert {"kl/reverse_newtask", "lm_eval/hellaswag/acc_norm", "emergence/hellaswag/acc_norm"} <= set(
            d[d.checkpoint == 4].metric
        )
        onsets = d[d.metric.str.startswith("emergence/onset/")]
        # paired per-prompt onsets against the base (no control cell here: KL, whose base value is 0 by
        # definition, gets none; the probe has no per-prompt values); the rule's calibration is in
        # tests/test_calibration.py
        assert "emergence/onset/newtask/success" in set(onsets.metric)
        assert "emergence/onset/kl/forward_newtask" not in set(onsets.metric)
        assert (onsets.checkpoint == 4).all() and (onsets.flag == "vs base").all()
    base = df[df.cell == "base-snark"]
    assert "emergence/hellaswag/acc_norm" in set(base.metric)  # the probe's base value, measured once
    run = runner.run_paths
    stamp = {p: p.stat().st_mtime_ns for p in run.cells.glob("*/checkpoints/*/*.json")}
    assert len(stamp) == 2 * 3  # two cells × (newtask, kl, probe) at step 2
    assert Runner(path).run() == 0
    assert {p: p.stat().st_mtime_ns for p in run.cells.glob("*/checkpoints/*/*.json")} == stamp  # not redone
    # a stage file measured under other settings (a protocol changed since) is stale: left out of the table
    from study.metrics import collect_metrics

    stale = run.cell(cells[0]).stage("newtask")
    io.write_json(stale, io.read_json(stale) | {"config_hash": "other"})
    df = pd.read_csv(collect_metrics(run, load_protocol(path)))
    d = df[df.cell == cells[0]]
    assert "newtask/success" not in set(d[d.checkpoint == 4].metric)
    assert "newtask/success" in set(d[d.checkpoint == 2].metric)


def test_stage_version_bump_recomputes_exactly_that_stage(write_protocol, monkeypatch):
    """A stage's VERSION is part of its files' key: bumping it remeasures that stage's files and nothing
    else; each cell records the commit, library versions, model fingerprint and stage versions; the manifest
    keeps every start."""
    from study.measure import VERSIONS

    path = write_protocol(dict(TINY_PROTOCOL, methods={"sft": {}}))
    assert Runner(path).run() == 0
    run = Runner(path).run_paths
    files = {
        p: p.stat().st_mtime_ns
        for p in run.root.rglob("*.json")
        if "train" not in p.parts
        and "stats" not in p.parts
        and p.name not in ("manifest.json", "status.json", "record.json", "cell.json", "power.json")
    }
    monkeypatch.setitem(VERSIONS, "kl", VERSIONS["kl"] + 1)
    assert Runner(path).run() == 0
    changed = {p for p, t in files.items() if p.stat().st_mtime_ns != t}
    assert changed and all(p.name == "kl.json" for p in changed), changed
    assert all(io.read_json(p)["version"] == VERSIONS["kl"] for p in changed)
    cell = load_protocol(path).cells()[0]
    record = io.read_json(run.cell(cell.name).record)
    assert record["git"]["commit"] and "dirty" in record["git"]
    assert record["versions"]["trl"] and record["model"]["fingerprint"]
    assert record["stage_versions"]["kl"] == VERSIONS["kl"]
    assert len(io.read_json(run.manifest)["starts"]) == 2  # two runs, two starts kept


def test_base_measurements_are_shared_across_runs(write_protocol, monkeypatch, tmp_path):
    """A second protocol with the same model, task and stage settings copies the base's files from the base
    cache instead of measuring again; another setting is measured anew."""
    monkeypatch.setenv("STUDY_BASE_CACHE", "1")
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "cache"))
    first = Runner(write_protocol(TINY_PROTOCOL, "first"))
    first.run(only="no-such-cell")
    a = first.run_paths.base("snark") / "newtask.json"
    assert a.is_file() and "reused" not in first.run_paths.log.read_text()
    second = Runner(write_protocol(TINY_PROTOCOL, "second"))
    second.run(only="no-such-cell")
    b = second.run_paths.base("snark") / "newtask.json"
    assert second.run_paths.root != first.run_paths.root
    assert b.read_bytes() == a.read_bytes() and "reused newtask" in second.run_paths.log.read_text()
    other = dict(TINY_PROTOCOL, newtask=dict(TINY_PROTOCOL.get("newtask") or {}, max_new_tokens=7))
    third = Runner(write_protocol(other, "third"))
    third.run(only="no-such-cell")
    assert "reused newtask" not in third.run_paths.log.read_text()
    assert (third.run_paths.base("snark") / "newtask.json").is_file()


def test_shared_run_splits_the_cells_between_processes(write_protocol):
    """executor.workers: 2 processes take the cells by their locks; one report, every cell done once. 12
    cells of ~1-2 s each: the parent alone needs ~20 s, well past a worker's start (~2 s here, idle)."""
    body = TINY_PROTOCOL | {
        "methods": {"sft": {}, "grpo": {"num_generations": 4}},
        "seeds": [0, 1, 2, 3, 4, 5],
        "executor": {"workers": 2},
    }
    path = write_protocol(body)
    runner = Runner(path)
    assert runner.run() == 0
    run = runner.run_paths
    done = [line for line in run.log.read_text().splitlines() if " done in " in line and "cell " in line]
    cells = load_protocol(path).cells()
    assert sorted(line.split("cell ")[1].split()[0] for line in done) == sorted(c.name for c in cells)
    assert len({line.rsplit("process ", 1)[1] for line in done}) == 2  # both processes trained cells
    assert (run.root / "workers" / "worker-1.log").is_file() and (run.root / "report.md").is_file()
    df = pd.read_csv(run.metrics)
    assert set(df.cell) >= {c.name for c in cells}


def test_a_task_without_sweeps_trains_one_point_per_method(write_protocol):
    body = TINY_PROTOCOL | {
        "tasks": [{"name": "arithmetic", "n_train": 40, "n_heldout": 8}, {"name": "snark", "sweeps": False}],
        "methods": {"sft": {"sweep": {"learning_rate": [1e-4, 1e-3]}}, "grpo": {"num_generations": 4}},
    }
    cells = load_protocol(write_protocol(body)).cells()
    by_task = {
        t: sorted(c.name.rsplit("-", 1)[0] for c in cells if c.task.name == t)
        for t in ("arithmetic", "snark")
    }
    assert by_task["arithmetic"] == [
        "arithmetic-grpo-s0",
        "arithmetic-sft-learning_rate0.0001-s0",
        "arithmetic-sft-learning_rate0.001-s0",
    ]
    snark_sft = next(c for c in cells if c.task.name == "snark" and c.method == "sft")
    assert by_task["snark"] == ["snark-grpo-s0", "snark-sft-s0"] and snark_sft.train.learning_rate == 1e-3


def test_workers_die_with_the_process_that_started_them(write_protocol):
    """A shared run's parent killed with SIGKILL (no `finally` runs) takes its workers with it (the kernel's
    parent-death signal); a rerun then finishes the study."""
    body = TINY_PROTOCOL | {
        "methods": {"sft": {}, "grpo": {"num_generations": 4}},
        "seeds": [0, 1, 2],
        "executor": {"workers": 2},
    }
    path = write_protocol(body)
    run = Runner(path).run_paths
    parent = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "run", str(path)], stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        worker = None
        while time.time() < deadline and worker is None:
            time.sleep(0.5)
            out = subprocess.run(
                ["pgrep", "-f", f"study.cli run {path} --worker"], capture_output=True, text=True
            )
            worker = int(out.stdout.split()[0]) if out.stdout.strip() else None
        assert worker is not None, "no worker process started"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(60):
            state = subprocess.run(["ps", "-o", "stat=", "-p", str(worker)], capture_output=True, text=True)
            if not state.stdout.strip() or state.stdout.strip().startswith("Z"):  # gone, or dead and unreaped
                break
            time.sleep(0.5)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its parent by 30 s")
    finally:
        if parent.poll() is None:
            parent.kill()
    assert Runner(path).run(workers=1) == 0
    assert all(cell_state(run, c)["state"] == "done" for c in load_protocol(path).cells())
