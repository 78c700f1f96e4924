"""Runs fail loudly and locally: a stalled hub, a diverging training, a full disk, a held cell, a stale status,
a torn log line, file modes and orphaned temporary files. Tiny model, CPU.

    .venv/bin/python -m pytest tests/test_reliability.py -q
"""

from __future__ import annotations

import io as _io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from study import io
from study.config import load_protocol
from study.metrics import cell_state, collect_metrics, final_stages, stage_key
from study.paths import RunPaths
from study.runner import Runner
from tests.conftest import REPO, TINY_PROTOCOL

SFT = dict(TINY_PROTOCOL, methods={"sft": {}})


def _console() -> tuple[Console, _io.StringIO]:
    buf = _io.StringIO()
    return Console(file=buf, width=200), buf


# ------------------------------------------------------------------------------------------------- hub


class Stalled:
    """A hub endpoint on 127.0.0.1 that accepts TCP connections and never answers."""

    def __enter__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)

    def __exit__(self, *exc):
        self.server.close()
        for c in self.held:
            c.close()


def test_stalled_hub_fails_the_run_clearly_within_30_s(write_protocol, tmp_path):
    """`study run` on a hub id, HF_HUB_OFFLINE unset, HF_ENDPOINT at a listener that never answers: a clear
    error naming the endpoint, a non-zero exit and no traceback, in under 30 s (process start included)."""
    path = write_protocol(dict(SFT, model={"source": "someorg/somemodel"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    with Stalled() as endpoint:
        env["HF_ENDPOINT"] = endpoint
        t = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "study.cli", "run", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        seconds = time.time() - t
    text = out.stdout + out.stderr
    print(f"stalled hub: study run exited {out.returncode} after {seconds:.1f} s")
    assert out.returncode != 0
    assert "no answer within" in text and endpoint in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.count("no answer within") <= 3  # said once for the run (and its summary), not once per cell
    assert seconds < 30, f"{seconds:.1f} s"


def test_hub_probe_reads_the_answer(monkeypatch):
    """A hub that answers 404 is reported as 'no such model' at once, not as unreachable."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from study.models import hub_probe, hub_reachable

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        t = time.time()
        assert "HTTP 404" in hub_probe("someorg/somemodel")
        assert hub_reachable() and time.time() - t < 5
    finally:
        server.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_probe("someorg/somemodel") == "HF_HUB_OFFLINE is set" and not hub_reachable()


# ------------------------------------------------------------------------------------------ divergence


@pytest.mark.parametrize("lr", [1e3, 1e30])
def test_divergence_fails_the_cell_naming_the_step(tmp_path, lr):
    """Learning rates the schema refuses (le=1) forced into TRL: the guard stops training at the first bad
    step; without it lr 1e3 finishes 'done' with |ΔW| ~ 1e10 and lr 1e30 logs loss 0.0 with grad_norm NaN."""
    from study.models import Runtime
    from study.paths import CellPaths
    from study.train import DivergenceError, train_cell

    proto_path = tmp_path / "p.yaml"
    proto_path.write_text(json.dumps(dict(SFT, results_dir=str(tmp_path / "r"))))
    cell = load_protocol(proto_path).cells()[0]
    cell = cell.model_copy(update={"train": cell.train.model_copy(update={"learning_rate": lr})})
    cp = CellPaths(tmp_path / "cell")
    with pytest.raises(DivergenceError) as e:
        train_cell(cell, cp, Runtime("cpu", "float32"))
    print(f"lr {lr:g}: {e.value}")
    assert "at step " in str(e.value) and "lower the learning rate" in str(e.value)
    assert not (cp.adapter / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "logs, words",
    [
        ({"loss": 0.0, "grad_norm": float("nan")}, "grad_norm is nan"),  # lr 1e30 as TRL logged it
        ({"loss": float("inf"), "grad_norm": 1.0}, "loss is inf"),
        ({"loss": 1.0, "grad_norm": 5e4}, "grad_norm 5e+04 > train.max_grad_norm_abort"),
        ({"loss": 1.0, "grad_norm": 1.0}, None),
        ({"train_runtime": 3.0}, None),  # the end-of-training summary is not a step
    ],
)
def test_divergence_guard_reads_each_logged_step(logs, words):
    from types import SimpleNamespace

    from study.train import DivergenceError, _callbacks

    cell = load_protocol_from(SFT).cells()[0]
    guard = _callbacks(None, None, cell)[-1]
    state = SimpleNamespace(global_step=7)
    if words is None:
        guard.on_log(None, state, None, logs=logs)
        return
    with pytest.raises(DivergenceError, match="at step 7/4") as e:
        guard.on_log(None, state, None, logs=logs)
    assert words in str(e.value)


def load_protocol_from(body: dict):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        path.write_text(json.dumps(dict(body, results_dir=str(Path(d) / "r"))))
        return load_protocol(path)


def test_failed_cell_reaches_no_row_of_metrics_csv(write_protocol, monkeypatch):
    """A diverged cell (lr 1e3 forced into TRL) is marked failed with the step; its stage files, even current
    ones with NaN values, reach no row of metrics.csv; a partial cell's current files still do."""
    import study.train as train

    real = train.trl_config
    monkeypatch.setattr(train, "trl_config", lambda *a, **k: real(*a, **k, learning_rate=1e3))
    path = write_protocol(SFT)
    console, out = _console()
    runner = Runner(path, console=console)
    assert runner.run() == 1
    proto = runner.proto
    cell = proto.cells()[0]
    st = cell_state(runner.run_paths, proto, cell)
    assert st["state"] == "failed" and "diverged at step" in st["error"], st
    assert "diverged at step" in out.getvalue()
    cp = runner.run_paths.cell(cell.name)
    settings = final_stages(proto)["newtask"]  # a NaN stage file with the current key, as a crash could leave
    io.write_json(
        cp.stage("newtask"),
        {
            "config_hash": stage_key("newtask", settings),
            "rows": [
                {
                    "metric": "newtask/success",
                    "value": float("nan"),
                    "ci_low": float("nan"),
                    "ci_high": float("nan"),
                    "n": 4,
                }
            ],
        },
    )
    df = pd.read_csv(collect_metrics(runner.run_paths, proto))
    assert not (df.cell == cell.name).any() and (df.cell == "base-snark").any()
    io.write_json(cp.status, {"state": "running"})  # a killed cell (not failed): its current files count
    df = pd.read_csv(collect_metrics(runner.run_paths, proto))
    assert (df.cell == cell.name).any()


# ---------------------------------------------------------------------------------------------- disk


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"SKIPPED LOUDLY: cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk test "
            f"needs root and CAP_SYS_ADMIN"
        )
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as f:  # unbuffered: nothing left to fail at close
        for chunk in (65536, 1):
            try:
                while f.write(b"\0" * chunk):
                    pass
            except OSError:
                pass
    return filler


def _no_corrupt_files(root: Path) -> None:
    for p in root.rglob("*.json"):
        json.loads(p.read_text())  # every JSON that exists is whole
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left behind"


def test_full_disk_fails_cleanly_and_the_run_can_continue(write_protocol, tmpfs, monkeypatch, capsys):
    """Results on a 4 MB tmpfs. (1) Full before the start: exit 1 with one line, nothing written. (2) The
    disk fills as the first cell trains: every cell fails (the failure records themselves cannot be written),
    the run still ends with exit 1, a summary and no traceback, and no file is half written. (3) Space
    freed: the rerun finishes every cell."""
    import study.train as train

    body = dict(TINY_PROTOCOL, methods={"sft": {}, "dpo": {}}, results_dir=str(tmpfs))
    path = write_protocol(body)
    filler = _fill(tmpfs)
    console, out = _console()
    assert Runner(path, console=console).run() == 1
    assert "cannot write to" in out.getvalue() and "Traceback" not in out.getvalue()
    filler.unlink()

    real = train.train_cell
    monkeypatch.setattr(train, "train_cell", lambda *a, **k: (_fill(tmpfs), real(*a, **k))[1])
    console, out = _console()
    assert Runner(path, console=console).run() == 1
    text = out.getvalue() + capsys.readouterr().err
    assert "Traceback" not in text and text.count("FAILED") >= 2, text[-3000:]
    assert "No space left" in text and "0/2 cells done" in text
    (tmpfs / "filler").unlink()
    _no_corrupt_files(tmpfs)

    monkeypatch.setattr(train, "train_cell", real)
    console, out = _console()
    assert Runner(path, console=console).run() == 0, out.getvalue()[-3000:]
    _no_corrupt_files(tmpfs)


# ---------------------------------------------------------------------------------------- lock, status


def test_wait_waits_for_a_cell_another_process_holds(write_protocol):
    """Without --wait a held cell is skipped and the run exits 1 saying so; with --wait it waits, then runs."""
    path = write_protocol(SFT)
    runner = Runner(path, console=_console()[0])
    cell = runner.proto.cells()[0]
    cp = runner.run_paths.cell(cell.name)
    cp.root.mkdir(parents=True)
    hold = 8.0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; "
            "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); "
            "time.sleep(float(sys.argv[2]))",
            str(cp.lock),
            str(hold),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.time()
        console, out = _console()
        assert Runner(path, console=console).run() == 1
        assert "SKIPPED" in out.getvalue() and "--wait" in out.getvalue()
        console, out = _console()
        assert Runner(path, console=console).run(wait=True) == 0
        assert time.time() - t >= hold - 1  # it waited for the holder to let go
        assert holder.poll() is not None
    finally:
        holder.kill()
        holder.wait()
    assert cell_state(runner.run_paths, runner.proto, cell)["state"] == "done"


def _fake_complete(run: RunPaths, proto, cell) -> None:
    """The files of a finished cell (an adapter and every stage file with its current key), no training."""
    cp = run.cell(cell.name)
    (cp.adapter).mkdir(parents=True)
    (cp.adapter / "adapter_model.safetensors").write_bytes(b"x")
    for name, settings in final_stages(proto).items():
        io.write_json(cp.stage(name), {"config_hash": stage_key(name, settings), "rows": []})
    io.write_json(cp.status, {"state": "done"})


def test_status_is_computed_from_files_not_a_stale_status_json(write_protocol):
    from typer.testing import CliRunner

    from study.cli import app

    path = write_protocol(SFT)
    proto = load_protocol(path)
    run = RunPaths.for_protocol(path, proto.results_dir)
    cell = proto.cells()[0]
    _fake_complete(run, proto, cell)
    assert cell_state(run, proto, cell)["state"] == "done"
    changed = write_protocol(
        dict(SFT, newtask=dict(SFT["newtask"], limit=3))
    )  # same cell, new stage settings
    proto2 = load_protocol(changed)
    assert proto2.cells()[0].name == cell.name
    assert io.read_json(run.cell(cell.name).status)["state"] == "done"  # the stale cache says done
    assert cell_state(run, proto2, cell)["state"] == "partial"
    out = CliRunner().invoke(app, ["status", str(changed)], env={"COLUMNS": "250"})
    assert "partial" in out.output and "done: " not in out.output, out.output


# ------------------------------------------------------------------------------------------- files


def test_torn_log_line_is_trimmed_on_resume_with_a_log_line_naming_the_file(tmp_path, caplog):
    from study.train import _trim_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.')
    with caplog.at_level(logging.WARNING, logger="study"):
        _trim_log(log, 2)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]
    assert any(str(log) in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)


def test_results_are_0644_and_temp_names_unique(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)

    target = tmp_path / "shared.json"

    def writer(k: int) -> None:
        for i in range(30):
            io.write_json(target, {"writer": k, "i": i, "pad": "x" * 5000})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert io.read_json(target)["i"] == 29  # whole, from one writer; no collision on a shared temp name
    assert not list(tmp_path.glob("*.tmp"))


def test_orphaned_temp_files_are_cleaned_at_start(write_protocol):
    path = write_protocol(SFT)
    runner = Runner(path, console=_console()[0])
    root = runner.run_paths.root
    (root / "cells" / "c").mkdir(parents=True)
    old = [
        root / ".metrics.csv.abc123.tmp",
        root / "cells" / "c" / ".status.json.x1.tmp",
        root / "base" / "snark" / "persona_direction.npz.tmp.npz",
    ]
    old_dir = root / "cells" / "c" / ".adapter.tmp"
    fresh = root / ".manifest.json.live.tmp"  # a live writer's (another runner): younger than a minute
    old_dir.mkdir(parents=True)
    for p in [*old, fresh]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("partial")
    stale = time.time() - 3600
    for p in [*old, old_dir]:
        os.utime(p, (stale, stale))
    runner.start()
    assert not any(p.exists() for p in [*old, old_dir]) and fresh.exists()
    assert "orphaned temporary" in runner.run_paths.log.read_text()
    assert stat.S_IMODE(runner.run_paths.manifest.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_no_fixed_temp_names():
    """No fixed temporary name under study/ outside the modules listed (each with a lock or a unique name)."""
    fixed = []
    for p in sorted((REPO / "study").rglob("*.py")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if ('".tmp' in line or "'.tmp" in line or '.tmp"' in line) and "mkstemp" not in line:
                fixed.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    allowed = (
        "study/train.py",  # .adapter.tmp: written under the cell's lock
        "study/io.py",
        "study/measure/persona_stats.py",
    )  # reported to its owner: to make unique (pid + random)
    assert [f for f in fixed if not f.startswith(allowed)] == [], fixed
