"""Run a protocol end to end, resumably: `study run protocols/default.yaml`.

Orchestration only: what a stage measures is in `study.pipeline` / `study.measure`, what the files mean in
`study.metrics`. A cell's folder is named after a hash of its resolved training config, so a rerun finds
finished work: a trained cell is not retrained, a stage whose file carries the current key (settings +
stage version) is not re-measured, a killed training resumes from its last complete checkpoint. The base is
measured once per protocol, under a lock. Cells are locked with `filelock` (kernel locks, released by the OS
when a process dies), so several runners may share a run folder; one failing cell is recorded with its
reason and the others go on; the run exits non-zero if any failed or was left to another process.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml
from filelock import FileLock, Timeout
from rich.markup import escape

from study import basecache, io
from study.config import Cell, Protocol, load_protocol
from study.measure import VERSIONS
from study.metrics import (
    base_stage_path,
    cell_complete,
    cell_state,
    checkpoint_stages,
    collect_metrics,
    final_stages,
    intermediate_checkpoints,
    stage_done,
    stage_key,
)
from study.paths import REPO, RunPaths

log = logging.getLogger("study")
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "lm_eval", "scikit-learn")


def git_state() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(runtime) -> dict:
    """What a result was measured with: code, libraries, hardware."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "device": runtime.device,
        "dtype": runtime.dtype,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "stage_versions": dict(VERSIONS),
    }


class _LogFile(logging.FileHandler):
    """The run's log file. A write that fails (a full disk) is dropped with one line on stderr, once, not a
    traceback per record: the run goes on, or stops, on its own terms."""

    def handleError(self, record) -> None:
        if not getattr(self, "_warned", False):
            self._warned = True
            print(
                f"study: cannot write the log {self.baseFilename} ({sys.exc_info()[1]}); records are dropped",
                file=sys.stderr,
            )


def _setup_logging(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in [h for h in log.handlers if isinstance(h, _LogFile) and h.baseFilename == str(path.resolve())]:
        log.removeHandler(old)  # a second Runner in one process (tests) logs each record once
        old.close()
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


class Runner:
    def __init__(self, protocol_path: str | Path, console=None):
        from rich.console import Console

        self.path = Path(protocol_path)
        self.proto: Protocol = load_protocol(self.path)
        self.run_paths = RunPaths.for_protocol(self.path, self.proto.results_dir)
        self.console = console or Console()
        self._host = None
        self._vllm = None
        self.env: dict = {}

    def host(self):
        """The base model for measurements: loaded once per process, adapters swapped in."""
        if self._host is None:
            from study.models import AdapterHost

            self._host = AdapterHost(self.proto.model.source, self.runtime, self.proto.model.revision)
        return self._host

    def vllm(self, adapter):
        """model.engine vllm: this process's vLLM engine (one for the base) set to `adapter` (None: the
        base); engine hf: None."""
        if self.proto.model.engine != "vllm":
            return None
        if self._vllm is None:
            from study.gpu import VllmSession
            from study.models import local_path

            self._vllm = VllmSession(self.proto, local_path(self.proto.model.source), self.runtime.dtype)
        return self._vllm.use(adapter)

    def start(self, worker: bool = False) -> None:
        """Resolve the runtime and record this start (manifest.json keeps every start, not only the last). A
        `worker` of a shared run only resolves the runtime and logs: the process that started the run
        cleaned up and recorded it (removing temporary files now could remove one being written)."""
        from study.gpu import missing_extra
        from study.models import quiet_libraries, resolve_runtime

        if missing := missing_extra(self.proto):  # before any model loads (TRL would fail after)
            raise RuntimeError(f"{self.path}: {missing[0]}")
        rp = self.run_paths
        quiet_libraries()
        _setup_logging(rp.log)
        if worker:
            self.runtime = resolve_runtime(self.proto.model.device, self.proto.model.dtype)
            self.env = environment(self.runtime)
            return
        removed = io.remove_orphans(rp.root)
        if removed:
            log.info(
                "removed %d orphaned temporary file(s) left by a killed run: %s",
                len(removed),
                ", ".join(str(p.relative_to(rp.root)) for p in removed[:5]),
            )
        self.runtime = resolve_runtime(self.proto.model.device, self.proto.model.dtype)
        self.env = environment(self.runtime)
        io.write_text(rp.protocol, yaml.safe_dump(self.proto.model_dump(mode="json"), sort_keys=False))
        try:
            starts = io.read_json(rp.manifest).get("starts", [])
        except (OSError, json.JSONDecodeError, AttributeError):
            starts = []
        starts.append(
            {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "protocol": str(self.path), **self.env}
        )
        io.write_json(rp.manifest, {"starts": starts})

    def run(self, only: str | None = None, wait: bool = False, workers: int | None = None) -> int:
        """Every cell of the protocol (those whose name contains `only`), then metrics.csv and the report.
        `workers` (default: the protocol's executor.workers): above 1, that many processes on this machine
        share the cells by their locks, each with its share of the CPU threads (study.runner.Workers)."""
        from study.models import resolve_runtime

        workers = workers or self.proto.executor.workers
        if workers > 1 and resolve_runtime(self.proto.model.device, self.proto.model.dtype).device == "cpu":
            return self._run_shared(only, wait, workers)
        return self._run(only, wait)

    def _run_shared(self, only: str | None, wait: bool, workers: int) -> int:
        import torch

        threads = torch.get_num_threads()
        pool = Workers(self.path, self.run_paths.root, workers - 1, max(1, threads // workers), only)
        torch.set_num_threads(max(1, threads // workers))
        try:
            code = self._run(only, wait, pool=pool)  # starts the pool once the pre-run checks pass
        finally:
            pool.stop()
            torch.set_num_threads(threads)
        return code

    def work(self, only: str | None = None) -> int:
        """A worker process of a shared run (`study run --worker`): the cells nobody holds, no report. A task's
        base is measured (or waited for, under its lock) before its first cell only where a cell reads it
        (the persona direction); the process that started the run measures every base."""
        from study.models import ModelUnavailable

        self.start(worker=True)
        cells = [c for c in self.proto.cells() if not only or only in c.name]
        log.info("worker %d: %d cells", os.getpid(), len(cells))

        ready: set[str] = set()  # tasks whose base this worker has seen measured
        broken: set[str] = set()  # tasks whose base failed here: their cells are left to the parent
        for cell in cells:
            task = cell.task.name
            if task in broken:
                continue
            if "persona" in final_stages(self.proto, cell.task) and task not in ready:
                try:
                    self.measure_base(cell.task)
                    ready.add(task)
                except ModelUnavailable:
                    raise
                except Exception as e:  # no cell's status is touched: the parent may hold one of them
                    log.error("worker %d: base/%s failed (%s); its cells are left", os.getpid(), task, e)
                    broken.add(task)
                    continue
            try:
                self.run_cell(cell, None, wait=False)
            except ModelUnavailable:
                raise  # no cell can run: stop this worker (exit 1), the parent reports the model
            except Exception as e:  # recorded in its status.json (under its lock); the parent reports it
                self._failed(cell, e, _NullProgress())
        return 0

    def _run(self, only: str | None = None, wait: bool = False, pool: Workers | None = None) -> int:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from study.models import ModelUnavailable

        rp = self.run_paths
        try:
            self.start()
        except OSError as e:  # a full or read-only results folder: nothing can be recorded, so stop here
            self.console.print(f"[red]cannot write to {rp.root}[/]: {e}")
            return 1
        cells = [c for c in self.proto.cells() if not only or only in c.name]
        log.info("run %s: %d cells on %s/%s", self.path, len(cells), self.runtime.device, self.runtime.dtype)
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        ]
        failed: list[tuple[str, str]] = []
        elsewhere: list[str] = []
        t0 = time.time()
        problem = self.check_instruments()
        if problem:
            self.console.print(f"[red]pre-run check failed[/]: {problem}")
            log.error("pre-run check failed: %s", problem)
            return 2
        if pool is not None:
            pool.start()
            log.info(
                "run %s: %d processes share the cells, %d threads each", self.path, pool.n + 1, pool.threads
            )
        with Progress(*columns, console=self.console, transient=False) as progress:
            weight = _planned_seconds(self.proto, cells)
            # one bar for the whole run, in planned seconds (study.plan) so that its ETA counts the base and
            # every cell by its expected cost, not by its count; the per-cell bars show training steps
            overall = progress.add_task("study", total=sum(weight.values()) or None)
            try:
                for task in self.proto.tasks:
                    try:
                        self.measure_base(task, progress)
                    except ModelUnavailable:
                        raise
                    except Exception as e:  # the cells can still be trained and measured; the run will exit 1
                        failed.append((f"base/{task.name}", self._failed(None, e, progress)))
                    progress.advance(overall, weight.get(f"base/{task.name}", 0.0))
                for cell in cells:
                    try:  # beside workers, skip what they hold (waiting would run the cells one by one)
                        if not self.run_cell(cell, progress, wait=wait and pool is None):
                            elsewhere.append(cell.name)
                    except ModelUnavailable:
                        raise
                    except Exception as e:  # one failing cell never stops the others
                        failed.append((cell.name, self._failed(cell, e, progress)))
                    progress.advance(overall, weight.get(cell.name, 0.0))
            except ModelUnavailable as e:  # no cell can run without the model: stop now, not once per cell
                failed.append(("model", self._failed(None, e, progress)))
            if pool is not None:  # the cells the workers held: wait for them, then take any they left
                for problem in pool.join():
                    log.error("%s", problem)
                    progress.console.print(f"[red]{escape(problem)}[/]", highlight=False)
                left, elsewhere = elsewhere, []
                for name in left:
                    cell = next(c for c in cells if c.name == name)
                    try:
                        st = io.read_json(rp.cell(name).status) if rp.cell(name).status.is_file() else {}
                        if st.get("state") == "failed":
                            failed.append((name, st.get("error", "failed in a worker process")))
                        elif not self.run_cell(cell, progress, wait=wait):
                            elsewhere.append(name)
                    except ModelUnavailable as e:
                        failed.append(("model", self._failed(None, e, progress)))
                        break
                    except Exception as e:  # as in the main loop: one failing cell never stops the others
                        failed.append((name, self._failed(cell, e, progress)))
        try:
            collect_metrics(rp, self.proto)
        except OSError as e:  # a full disk: the stage files are intact, `study report RUN` rebuilds the table
            failed.append(("metrics.csv", self._failed(None, e, progress)))
        self.report()
        self._summary(cells, failed, elsewhere, time.time() - t0)
        return 1 if failed or elsewhere else 0

    def _failed(self, cell: Cell | None, e: Exception, progress) -> str:
        """Record a failure; a failure while recording it (a full disk) is logged, never raised."""
        reason = f"{type(e).__name__}: {e}"
        where = cell.name if cell else "the run"
        log.error("%s failed: %s\n%s", where, reason, traceback.format_exc())
        progress.console.print(f"[red]failed[/] {escape(where)}: {escape(reason)}", highlight=False)
        if cell is not None:
            try:
                io.write_json(
                    self.run_paths.cell(cell.name).status,
                    {"state": "failed", "error": reason, "traceback": traceback.format_exc()},
                )
            except Exception as e2:
                log.error("could not record the failure of %s: %s", cell.name, e2)
        return reason

    def _summary(self, cells, failed, elsewhere, seconds: float) -> None:
        from rich.table import Table

        rp = self.run_paths
        names = {c.name for c in cells}
        done = len(cells) - len({n for n, _ in failed if n in names}) - len(elsewhere)
        table = Table(title=f"{self.path.name}: {done}/{len(cells)} cells done here in {seconds:.0f} s")
        for col in ("cell", "state", "newtask/success"):
            table.add_column(col)
        for cell in cells:
            st = cell_state(rp, self.proto, cell)
            table.add_row(cell.name, st["state"], _fmt_success(rp.cell(cell.name).stage("newtask")))
        self.console.print(table)
        self.console.print(f"metrics: {rp.metrics}\nlog: {rp.log}")
        for name in elsewhere:
            self.console.print(f"[yellow]SKIPPED[/] {name}: held by another process (rerun, or use --wait)")
        for name, reason in failed:
            self.console.print(f"[red]FAILED[/] {name}: {reason}")

    def report(self) -> None:
        """Statistics, figures and report.md from the run's files (study.report, no model code). A failing
        report never fails the run: the measurements are on disk and `study report RUN` redoes it."""
        from study.report import report_run

        try:
            path = report_run(self.run_paths.root)
            self.console.print(f"report: {path}")
        except Exception as e:
            log.error("report failed: %s\n%s", e, traceback.format_exc())
            self.console.print(
                f"[yellow]report failed[/] ({type(e).__name__}: {e}); "
                f"rerun with: study report {self.run_paths.root}"
            )

    def check_instruments(self) -> str | None:
        """Pre-run checks of the instruments, before anything is trained: the persona probe must separate
        persona from neutral text it was not fitted on (raises ProbeCheckFailed, with the AUC, below the
        protocol's `persona.external_auc_min`)."""
        if self.proto.persona is None:
            return None
        from study.config import TaskSpec
        from study.measure.persona_stats import ProbeCheckFailed, check_probe
        from study.tasks import build

        snark = next((t for t in self.proto.tasks if t.name == "snark"), TaskSpec(name="snark"))
        try:
            out = check_probe(build(snark), self.proto.persona.external_auc_min, self.proto.persona.probe_c)
        except ProbeCheckFailed as e:
            return str(e)
        log.info("persona probe on the external set: AUC %.3f", out["external_auc"])
        return None

    # ------------------------------------------------------------------------------------------ base

    def measure_base(self, task, progress=None) -> None:
        """The base's measurements for one task, once per protocol (under a lock: one runner measures)."""
        from study.pipeline import measure_model
        from study.tasks import build

        rp = self.run_paths
        stages = final_stages(self.proto, task)
        if all(
            stage_done(base_stage_path(rp, n, task.name), stage_key(n, s))
            for n, s in stages.items()
            if n != "kl"
        ):
            return
        rp.base(task.name).mkdir(parents=True, exist_ok=True)
        with FileLock(str(rp.root / "base" / ".lock")):
            host = self.host()
            say = _say(progress, f"base/{task.name}")
            where = lambda n: base_stage_path(rp, n, task.name)  # noqa: E731
            direction = rp.base(task.name) / "persona_direction.npz"
            measured = {n: s for n, s in stages.items() if n != "kl"}
            if reused := basecache.restore(host.fingerprint, task, measured, where, direction):
                log.info("base/%s: reused %s from %s", task.name, ", ".join(reused), basecache.root())
                say(f"reused {', '.join(reused)} from the base cache")
            with host.attached(None) as model:
                measure_model(
                    model,
                    host.tokenizer,
                    build(task),
                    stages,
                    where,
                    direction,
                    base=True,
                    say=say,
                    runtime=self.runtime,
                    label=f"base/{task.name}",
                    vllm=self.vllm(None),
                )
            basecache.store(host.fingerprint, task, measured, where, direction)

    # ------------------------------------------------------------------------------------------ cells

    def run_cell(self, cell: Cell, progress=None, wait: bool = False) -> bool:
        """Train and measure one cell; False if another process holds it (and `wait` is not set)."""
        cp = self.run_paths.cell(cell.name)
        cp.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cp.lock))
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            if progress is not None:
                progress.console.print(f"  {cell.name}: held by another process, skipped")
            return False
        try:
            self._run_cell_locked(cell, cp, progress)
        finally:
            lock.release()
        return True

    def _run_cell_locked(self, cell: Cell, cp, progress) -> None:
        from study.pipeline import measure_model
        from study.tasks import build
        from study.train import train_cell

        if cell_complete(self.proto, cell, cp):
            return
        io.write_json(cp.config, cell.model_dump(mode="json"))
        io.write_json(cp.status, {"state": "running"})
        t = time.time()
        bar = progress.add_task(f"  {cell.name}", total=cell.train.steps) if progress is not None else None

        def step(n: int) -> None:
            if bar is not None:
                progress.update(bar, completed=n)

        train_cell(cell, cp, self.runtime, progress=step, report_to=self.proto.report_to)
        if bar is not None:
            progress.update(bar, completed=cell.train.steps, visible=False)
        train_s = time.time() - t
        host, data = self.host(), build(cell.task)
        direction = self.run_paths.base(cell.task.name) / "persona_direction.npz"
        with host.attached(cp.adapter) as model:
            measure_model(
                model,
                host.tokenizer,
                data,
                final_stages(self.proto, cell.task),
                cp.stage,
                direction,
                say=_say(progress, cell.name),
                runtime=self.runtime,
                vllm=self.vllm(cp.adapter),
            )
        ck = checkpoint_stages(self.proto, cell.task)
        for n, folder in intermediate_checkpoints(self.proto, cell, cp) if ck else ():
            with host.attached(folder) as model:
                measure_model(
                    model,
                    host.tokenizer,
                    data,
                    ck,
                    lambda s, n=n: cp.checkpoint(n) / f"{s}.json",
                    direction,
                    say=_say(progress, f"{cell.name}@{n}"),
                    runtime=self.runtime,
                    vllm=self.vllm(folder),
                )
        io.write_json(
            cp.record,
            {
                "cell": cell.name,
                "model": {"source": cell.model, "revision": cell.revision, "fingerprint": host.fingerprint},
                **self.env,
            },
        )
        io.write_json(
            cp.status, {"state": "done", "train_seconds": train_s, "total_seconds": time.time() - t}
        )
        log.info("cell %s done in %.0f s (process %d)", cell.name, time.time() - t, os.getpid())


class _NullProgress:
    class console:  # noqa: N801 - stands in for rich's Progress.console
        @staticmethod
        def print(*a, **k) -> None:
            pass


def _die_with_parent() -> None:
    """In a worker, before it execs (Linux): the kernel sends it SIGTERM when the process that started it
    dies, however it dies (SIGKILL included), so no worker trains on alone; its cell resumes on a rerun."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


class Workers:
    """The other processes of a shared local run (`executor.workers` > 1): each runs `study run --worker`,
    which takes the cells nobody holds (the cell locks decide) with `threads` CPU threads, and writes its
    console to `<run>/workers/worker-<i>.log`. On this 2-core CPU, two GRPO trainings side by side with one
    thread each took 60.9 s for 2 x 5 steps where one after the other with two threads took 2 x 40.9 s
    (small-batch generation is bound by per-operation overhead, not by the cores' arithmetic)."""

    def __init__(self, protocol: Path, root: Path, n: int, threads: int, only: str | None = None):
        self.protocol, self.root, self.n, self.threads, self.only = protocol, root, n, threads, only
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        env = os.environ | {f"{lib}_NUM_THREADS": str(self.threads) for lib in ("OMP", "MKL", "OPENBLAS")}
        (self.root / "workers").mkdir(parents=True, exist_ok=True)
        for i in range(1, self.n + 1):
            cmd = [sys.executable, "-m", "study.cli", "run", str(self.protocol), "--worker"]
            cmd += ["--only", self.only] if self.only else []
            with open(self.root / "workers" / f"worker-{i}.log", "ab") as out:
                self.procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
                    )
                )

    def join(self) -> list[str]:
        """Wait for every worker; one line per worker that did not exit 0 (its cells are redone or reported
        by the parent's final pass; its console is in workers/worker-<i>.log)."""
        return [
            f"worker {i} exited with status {code}: see {self.root / 'workers' / f'worker-{i}.log'}"
            for i, code in enumerate((p.wait() for p in self.procs), start=1)
            if code != 0
        ]

    def stop(self) -> None:
        """The parent is leaving (done, failed or interrupted): no worker outlives it."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _planned_seconds(proto, cells) -> dict[str, float]:
    """Planned CPU/GPU seconds per cell name and per `base/<task>` (study.plan); 1 each if the plan fails, so
    the bar then counts cells."""
    try:
        from study.plan import base_seconds, estimate

        out = {c.name: estimate(c, proto, None).seconds for c in cells}
        base = base_seconds(proto, None) / max(1, len(proto.tasks))
        return out | {f"base/{t.name}": base for t in proto.tasks}
    except Exception as e:  # the plan is a guide for the ETA, never a reason for a run to fail
        log.info("no planned times for the progress bar (%s): counting cells", e)
        return {c.name: 1.0 for c in cells}


def _say(progress, label: str):
    def say(msg: str) -> None:
        if progress is not None:
            progress.console.print(f"  {msg} for {label}")

    return say


def _fmt_success(path: Path) -> str:
    if not path.is_file():
        return "-"
    for r in io.read_json(path)["rows"]:
        if r["metric"] == "newtask/success":
            return f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    return "-"
