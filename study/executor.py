"""Where a study's work runs: in this process (`LocalExecutor`, the default) or on a SLURM cluster through
submitit (`SlurmExecutor`).

    study run protocols/qwen2.5-3b.yaml --executor slurm --partition gpu --gpus-per-cell 1 --time 4:00:00 \\
        --array-parallelism 16 [--cpus-per-cell 8 --mem 64G --wait]
    study status protocols/qwen2.5-3b.yaml       # each cell's state, SLURM job id and job state
    study cancel protocols/qwen2.5-3b.yaml       # scancel every job of the run

On SLURM a run is three submissions: the base measurement as one job (skipped when the run folder already
has it), one job array over the cells not yet done (`--dependency=afterok:<base>`), and the metrics table +
report as a final job (`afterany:<array>`: a failed cell is recorded in its folder and the report is still
written, as in a local run). Every cell is a submitit `Checkpointable`: on timeout or preemption submitit
requeues it, and a requeued (or `scontrol requeue`d, or killed) cell resumes from its last complete
checkpoint through the runner's own resume logic. The job ids go to `results/<run>/slurm/jobs.json`, the
jobs' logs to `results/<run>/slurm/logs/`. The run folder stays the single source of truth: a study started
on SLURM can be finished with a local `study run`, and the other way round.

The jobs run this checkout's code: their Python is the interpreter that submitted them (the project venv)
with the repository root first on PYTHONPATH and as the working directory.

Three entry points are all the jobs need of the runner: `measure_base`, `run_cell` and `finish`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import submitit

from study import io
from study.paths import REPO, RunPaths

# --------------------------------------------------------------------------------- runner entry points
# The only coupling to study.runner: three functions, each a complete unit of work that reads and writes the
# run folder and nothing else, so that any process on any node can do it.


class _LogProgress:
    """The slice of rich's Progress that the runner uses, printing plain lines (a job's log is a file)."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(force_terminal=False, width=120)
        self._totals: dict[int, tuple[str, int]] = {}
        self._last: dict[int, int] = {}

    def add_task(self, description: str, total: int | None = None, **kw) -> int:
        i = len(self._totals)
        self._totals[i] = (description.strip(), total or 0)
        return i

    def update(self, task: int, completed: int | None = None, **kw) -> None:
        name, total = self._totals[task]
        step = 0 if completed is None else completed
        # a line every ~10 % of the steps, not every step
        if completed is not None and (
            step - self._last.get(task, -(10**9)) >= max(total // 10, 1) or step == total
        ):
            self._last[task] = step
            print(f"{name}: step {step}/{total}", flush=True)

    def advance(self, task: int, n: int = 1) -> None:
        pass


def _runner(protocol_path: str | Path):
    from study.runner import Runner

    r = Runner(protocol_path)
    r.start()
    return r


def _log():
    import logging

    return logging.getLogger("study")


def measure_base(protocol_path: str | Path) -> None:
    """Measure the base model for every task of the protocol (a no-op for what is already measured)."""
    r = _runner(protocol_path)
    progress = _LogProgress()
    for task in r.proto.tasks:
        r.measure_base(task, progress)


def run_cell(protocol_path: str | Path, cell_name: str) -> str:
    """Train (or resume) and measure one cell; returns its final state. A failure is written to the cell's
    status.json (as a local run does) and re-raised, so that the job's state says FAILED too. The cell's lock
    is the runner's (filelock: a kernel lock, released when its holder dies, on any node)."""
    from study.metrics import cell_state

    r = _runner(protocol_path)
    cells = {c.name: c for c in r.proto.cells()}
    if cell_name not in cells:
        raise KeyError(
            f"{cell_name} is not a cell of {protocol_path} (the protocol changed since submission?)"
        )
    cell, cp = cells[cell_name], r.run_paths.cell(cell_name)
    if int(os.environ.get("RANK", "0")) > 0:
        # `accelerate launch`: the other processes join process 0's training (DDP) and leave the cell's lock,
        # status and measurements to it
        from study.train import train_cell

        train_cell(cell, cp, r.runtime)
        return "trained"
    try:
        if not r.run_cell(cell, _LogProgress(), wait=False):
            print(f"{cell_name}: another process holds its lock; skipped", flush=True)
            return "locked"
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        _log().error("cell %s failed: %s\n%s", cell_name, reason, traceback.format_exc())
        io.write_json(cp.status, {"state": "failed", "error": reason, "traceback": traceback.format_exc()})
        raise
    return cell_state(r.run_paths, r.proto, cell)["state"]


def finish(protocol_path: str | Path) -> str:
    """Rebuild metrics.csv from the run folder and write the report; returns the metrics path."""
    from study.metrics import collect_metrics
    from study.runner import Runner

    r = Runner(protocol_path)
    path = collect_metrics(r.run_paths, r.proto)
    r.report()
    _track(r.run_paths, r.proto)
    return str(path)


def _track(rp: RunPaths, proto) -> None:
    """Log the run's finished cells to the protocol's trackers; a tracker failing never fails the run."""
    from study.tracking import log_run, report_to_list

    if not report_to_list(proto):
        return
    try:
        log_run(rp, proto)
    except Exception as e:
        _log().error("tracking failed: %s\n%s", e, traceback.format_exc())


# ------------------------------------------------------------------------------------------- executors


class LocalExecutor:
    """This machine: every stage in this process, in order, or in `executor.workers` processes sharing the
    cells (study.runner.Workers)."""

    def run(
        self,
        protocol_path: str | Path,
        only: str | None = None,
        console=None,
        wait: bool = False,
        workers: int | None = None,
    ) -> int:
        from study.runner import Runner

        runner = Runner(protocol_path, console=console)
        code = runner.run(only=only, wait=wait, workers=workers)
        _track(runner.run_paths, runner.proto)
        return code


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_cell: int = 0
    time: str = "4:00:00"
    """Per job: `minutes`, `H:MM:SS` or `D-HH:MM:SS`; a cell that runs out is requeued and resumes."""
    array_parallelism: int = 16
    cpus_per_cell: int | None = None
    mem: str | None = None
    """Per job, sbatch syntax (`64G`); None: the partition's default."""
    max_requeues: int = 3
    """How often submitit requeues a cell that timed out or was preempted."""
    extra: dict = field(default_factory=dict)
    """Further sbatch options, e.g. {"account": "proj", "qos": "high"}."""
    num_processes: int | None = None
    """Processes per cell (None: gpus_per_cell); above 1 the cell runs under `accelerate launch`."""
    accelerate_config: str | None = None
    """An `accelerate config` YAML for multi-process cells."""

    @classmethod
    def from_protocol(cls, executor, **overrides) -> SlurmOptions:
        """From a protocol's `executor:` block (its SLURM fields; `kind` and the local `workers` are not job
        options), with the non-None `overrides` (`study run --partition ...`) on top."""
        spec = executor.model_dump(mode="json", exclude={"kind", "workers"})
        return cls(**(spec | {k: v for k, v in overrides.items() if v is not None}))

    @property
    def processes(self) -> int:
        return self.num_processes or max(self.gpus_per_cell, 1)

    def minutes(self) -> int:
        return parse_minutes(self.time)


def parse_minutes(t: str | int) -> int:
    """SLURM time syntax (`90`, `1:30:00`, `2-00:00:00`, `45:00`) in whole minutes (rounded up)."""
    if isinstance(t, int) or str(t).isdigit():
        return int(t)
    days, _, rest = str(t).rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 2:  # MM:SS, as sbatch reads it
        parts = [0, *parts]
    if len(parts) != 3 or not re.fullmatch(r"\d*", days):
        raise ValueError(f"time {t!r}: use minutes, H:MM:SS or D-HH:MM:SS")
    h, m, s = parts
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


class CellJob(submitit.helpers.Checkpointable):
    """One cell as a submitit job; a Checkpointable (see __init__), so that a timeout or preemption requeues
    it. What it resumes from is the run folder (the last complete training checkpoint and every finished
    stage file), not a pickled state: Checkpointable's `checkpoint()` resubmits the same call."""

    def __init__(self, protocol_path: str, processes: int = 1, accelerate_config: str | None = None):
        self.protocol_path = protocol_path
        self.processes, self.accelerate_config = processes, accelerate_config

    def command(self, cell_name: str, python: str | None = None) -> list[str] | None:
        """The `accelerate launch` command of a multi-process cell (None: the cell runs in this process)."""
        from study.gpu import accelerate_command

        if self.processes <= 1:
            return None
        return accelerate_command(
            self.protocol_path, cell_name, self.processes, self.accelerate_config, python
        )

    def __call__(self, cell_name: str) -> str:
        print(f"cell {cell_name} on {os.uname().nodename}, job {os.environ.get('SLURM_JOB_ID')}", flush=True)
        cmd = self.command(cell_name)
        if cmd is None:
            return run_cell(self.protocol_path, cell_name)
        print("running", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)  # a failure is in the cell's status.json (process 0 wrote it)
        return "launched"


class SlurmExecutor:
    """Submit a run as base job -> cell array (afterok) -> report job (afterany) and record the job ids."""

    def __init__(self, options: SlurmOptions, python: str | None = None):
        self.options = options
        self.python = python or sys.executable

    def _executor(self, folder: Path, name: str, gpus: int):
        o = self.options
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=o.max_requeues, python=self.python)
        params = dict(
            job_name=name,
            time=o.minutes(),
            array_parallelism=o.array_parallelism,
            # the jobs run this checkout's code, wherever they land
            setup=[f"cd {_q(REPO)}", f"export PYTHONPATH={_q(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"],
            stderr_to_stdout=True,
        )
        if o.partition:
            params["partition"] = o.partition
        if gpus:
            params["gpus_per_node"] = gpus
        if o.cpus_per_cell:
            params["cpus_per_task"] = o.cpus_per_cell
        if o.mem:
            params["mem"] = o.mem
        if o.extra:
            params["additional_parameters"] = dict(o.extra)
        ex.update_parameters(**params)
        return ex

    def submit(self, protocol_path: str | Path, only: str | None = None) -> dict:
        from study.config import load_protocol
        from study.metrics import base_stage_path, cell_state, final_stages, stage_done, stage_key

        protocol_path = Path(protocol_path).resolve()
        proto = load_protocol(protocol_path)
        rp = RunPaths.for_protocol(protocol_path, proto.results_dir)
        active = [j for j, st in job_states(rp).items() if st in ACTIVE]
        if active:
            raise RuntimeError(
                f"{rp.root} has SLURM jobs still queued or running ({', '.join(active)}): "
                f"wait for them or `study cancel {protocol_path}` first"
            )
        folder = rp.root / "slurm" / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        name = rp.root.name
        gpus = self.options.gpus_per_cell

        base_todo = any(
            not stage_done(base_stage_path(rp, n, t.name), stage_key(n, s))
            for t in proto.tasks
            for n, s in final_stages(proto, t).items()
            if n != "kl"
        )
        cells = [
            c.name
            for c in proto.cells()
            if (not only or only in c.name) and cell_state(rp, proto, c)["state"] != "done"
        ]
        record: dict = {
            "submitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "protocol": str(protocol_path),
            "options": asdict(self.options),
            "python": self.python,
            "base": None,
            "array": None,
            "report": None,
            "cells": {},
        }
        base_id = None
        if base_todo:
            job = self._executor(folder, f"{name}-base", gpus).submit(measure_base, str(protocol_path))
            base_id = record["base"] = job.job_id
        if cells:
            ex = self._executor(folder, f"{name}-cells", gpus)
            if base_id:
                ex.update_parameters(dependency=f"afterok:{base_id}")
            o = self.options
            jobs = ex.map_array(CellJob(str(protocol_path), o.processes, o.accelerate_config), cells)
            record["array"] = jobs[0].job_id.split("_")[0]
            record["cells"] = {c: j.job_id for c, j in zip(cells, jobs)}
        ex = self._executor(folder, f"{name}-report", 0)
        after = record["array"] or base_id
        if after:
            # afterany: failed cells are recorded in their folders and reported, as in a local run
            ex.update_parameters(dependency=f"afterany:{after}")
        record["report"] = ex.submit(finish, str(protocol_path)).job_id
        _save_record(rp, record)
        return record


def _q(p) -> str:
    import shlex

    return shlex.quote(str(p))


# ------------------------------------------------------------------------------------ the run's job record


def jobs_path(rp: RunPaths) -> Path:
    return rp.root / "slurm" / "jobs.json"


def load_record(rp: RunPaths) -> dict | None:
    path = jobs_path(rp)
    return io.read_json(path) if path.is_file() else None


def _save_record(rp: RunPaths, record: dict) -> None:
    """jobs.json holds the latest submission; earlier ones move to its `history` (a cell's requeues keep
    their job id, a resubmission gets new ones)."""
    old = load_record(rp)
    if old:
        record["history"] = old.pop("history", []) + [old]
    io.write_json(jobs_path(rp), record)


def record_job_ids(record: dict) -> list[str]:
    """Every job id of a submission (the array as a whole, not its tasks)."""
    return [j for j in (record.get("base"), record.get("array"), record.get("report")) if j]


ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "STAGE_OUT",
    "SIGNALING",
    "PREEMPTED",
}


NEVER = "DEPENDENCY_NEVER_SATISFIED"


def _run(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _expand(job: str, array_task: str) -> list[str]:
    """scontrol's ArrayTaskId (`3`, `0-7%2`, `1,3-4`) as `<job>_<i>` ids."""
    out = []
    for part in array_task.split("%")[0].split(","):
        a, _, b = part.partition("-")
        if a.isdigit():
            out += [f"{job}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def query_states(ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job and array task among `ids` (job ids, array job ids expand to their tasks):
    `scontrol show job` (jobs the controller still remembers, MinJobAge), then `squeue -r` (live ones, with
    pending array tasks one by one), then `sacct` (the accounting database, where there is one) for the
    rest. Jobs no source knows are left out."""
    states: dict[str, str] = {}
    if not ids:
        return states
    for jid in ids:
        out = _run(["scontrol", "-o", "show", "job", jid]) or ""
        for line in out.splitlines():
            f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "JobState" not in f:
                continue
            if f.get("ArrayJobId") and f.get("ArrayTaskId"):
                for t in _expand(f["ArrayJobId"], f["ArrayTaskId"]):
                    states[t] = f["JobState"]
            else:
                states[f["JobId"]] = f["JobState"]
    out = _run(["squeue", "-h", "-r", "-o", "%i %T %r", "-j", ",".join(ids)]) or ""
    for line in out.splitlines():
        if len(parts := line.split()) == 3:
            # a job whose dependency failed waits forever: a final state for `wait` (scancel removes it)
            never = parts[1] == "PENDING" and parts[2] == "DependencyNeverSatisfied"
            states[parts[0]] = NEVER if never else parts[1]
    known = {k.split("_")[0] for k in states}
    missing = [j for j in ids if j not in known]
    if missing:
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)]) or ""
        for line in out.splitlines():
            jid, _, state = line.partition("|")
            if jid and state:
                states[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def job_states(rp: RunPaths) -> dict[str, str]:
    """job id -> SLURM state for the run's latest submission (base, each cell's array task, report)."""
    record = load_record(rp)
    if not record:
        return {}
    states = query_states(record_job_ids(record))
    wanted = [record.get("base"), *record.get("cells", {}).values(), record.get("report")]
    return {j: states.get(j, "UNKNOWN") for j in wanted if j}


def cancel(rp: RunPaths) -> list[str]:
    """scancel every job of the run's latest submission; returns the ids cancelled."""
    record = load_record(rp)
    if not record:
        return []
    ids = record_job_ids(record)
    if ids:
        subprocess.run(["scancel", *ids], check=True, capture_output=True, text=True, timeout=60)
        record["cancelled"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        io.write_json(jobs_path(rp), record)
    return ids


def wait(
    rp: RunPaths,
    poll: float = 5.0,
    timeout: float | None = None,
    on_change=None,
    ids: list[str] | None = None,
) -> dict[str, str]:
    """Block until no job of the run's latest submission (or only those in `ids`) is queued or running;
    returns the states. `on_change(states)` is called whenever a state changes (for a transcript)."""
    t0, last, unknown_before = time.time(), None, False
    while True:
        states = job_states(rp)
        if states != last and on_change:
            on_change(states)
        last = states
        mine = [s for j, s in states.items() if ids is None or j in ids]
        if not any(s in ACTIVE for s in mine):
            # UNKNOWN: no source knew the job (a controller briefly unreachable, or a job past MinJobAge
            # without accounting); believe it only when it persists over two polls
            if "UNKNOWN" not in mine or unknown_before:
                return states
            unknown_before = True
        else:
            unknown_before = False
        if timeout is not None and time.time() - t0 > timeout:
            raise TimeoutError(f"SLURM jobs still active after {timeout:.0f} s: {json.dumps(states)}")
        time.sleep(poll)
