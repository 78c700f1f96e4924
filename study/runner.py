"""Run a protocol end to end, resumably: `study run protocols/default.yaml`.

A cell's folder is named after a hash of its resolved training config, so a rerun finds finished work:
a cell with an adapter is not retrained, a stage whose JSON exists (for the same stage config) is not
re-measured, a killed training resumes from its last complete checkpoint. The base model's measurements
are made once per protocol (results/<protocol>/base/<task>/). One failing cell is recorded as failed with
its reason and the others go on; the run exits non-zero if any failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from study import io
from study.paths import REPO, RunPaths
from study.protocol import Cell, Protocol, load_protocol

log = logging.getLogger("study")


# ------------------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """A measurement of one model, configured by a protocol field (`field`, default: the stage's name).

    `run(model, tokenizer, data, cfg) -> {"rows": [...], ...}`; `on_base`: whether the base model is
    measured too (once per protocol). Measurement modules are imported only when a stage runs.
    """

    name: str
    module: str
    on_base: bool = True
    per_task: bool = True  # False: measures the model, not the task (the base is measured once, not per task)
    base_cache: str | None = None  # a file in base/<task>/ where the stage keeps what it derives from the base
    field: str | None = None  # dotted protocol field holding the settings (default: `name`)
    reads: tuple[str, ...] = ()  # stages of the same model whose results it reuses (when they exist)
    rename: tuple[str, str] | None = None  # metric prefix (old, new) applied to its rows

    def settings(self, proto: Protocol):
        obj = proto
        for part in (self.field or self.name).split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def enabled(self, proto: Protocol) -> bool:
        return self.settings(proto) is not None

    def run(self, model, tokenizer, data, cfg, cache: Path | None = None, previous: dict | None = None):
        import importlib

        module = importlib.import_module(self.module)
        if not self.per_task:
            out = module.run(model, tokenizer, cfg)
        else:
            kwargs = {"cache": cache} if self.base_cache else {}
            if self.reads:
                kwargs["previous"] = previous or {}
            out = module.run(model, tokenizer, data, cfg, **kwargs)
        if self.rename:
            old, new = self.rename
            for r in out["rows"]:
                if r["metric"].startswith(old):
                    r["metric"] = new + r["metric"][len(old):]
        return out


STAGES = [
    Stage("newtask", "study.measure.newtask"),
    Stage("kl", "study.measure.kl", on_base=False),  # the base's KL to itself is 0 by definition
    Stage("regression", "study.measure.regression", per_task=False),
    # only when the protocol has a `persona:` block; the base's persona direction is computed once and reused;
    # the newtask stage's greedy answers to the same prompts are reused instead of generated again
    Stage("persona", "study.measure.persona", base_cache="persona_direction.npz", reads=("newtask",)),
    # a cheap regression probe for the emergence trajectories (protocol `checkpoints.probe`)
    Stage("probe", "study.measure.regression", per_task=False, field="checkpoints.probe",
          rename=("lm_eval/", "emergence/")),
]


def active_stages(proto: Protocol) -> list[Stage]:
    return [s for s in STAGES if s.enabled(proto)]


def checkpoint_settings(proto: Protocol, stage: Stage):
    """A stage's settings at intermediate checkpoints (None: not measured there)."""
    ck = proto.checkpoints
    if ck is None or not stage.enabled(proto):
        return None
    if stage.name == "probe":
        return ck.probe
    if stage.name not in ck.stages:
        return None
    cfg = stage.settings(proto)
    if stage.name == "kl":
        return cfg.model_copy(update={"metrics": list(ck.kl_metrics)})
    if stage.name == "persona" and not ck.persona_retest:
        return cfg.model_copy(update={"retest_seeds": []})
    return cfg


def checkpoint_stages(proto: Protocol) -> list[tuple[Stage, object]]:
    return [(s, c) for s in STAGES if (c := checkpoint_settings(proto, s)) is not None]


def intermediate_checkpoints(proto: Protocol, cell: Cell, cp) -> list[tuple[int, Path]]:
    """The cell's saved checkpoints before its final step that the protocol measures."""
    from study.train import checkpoints  # lightweight: only globbing

    if proto.checkpoints is None or not cp.train_dir.is_dir():
        return []
    keep = proto.checkpoints.steps
    return [(s, d) for s, d in checkpoints(cp.train_dir)
            if s < cell.train.steps and (keep is None or s in keep)]


def base_stage_path(run: RunPaths, stage: Stage, task: str) -> Path:
    return (run.base(task) if stage.per_task else run.root / "base" / "model") / f"{stage.name}.json"


def _stage_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def _settings_hash(settings) -> str:
    return _stage_hash(settings.model_dump(mode="json"))


def _stage_done(path: Path, cfg_hash: str) -> bool:
    if not path.is_file():
        return False
    try:
        return io.read_json(path).get("config_hash") == cfg_hash
    except (json.JSONDecodeError, OSError):
        return False


# -------------------------------------------------------------------------------------------- manifest


def _git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except OSError:
        return {"commit": None, "dirty": None}


def manifest(runtime) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "lm_eval", "scikit-learn"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "git": _git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "device": runtime.device,
        "dtype": runtime.dtype,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------- status


def cell_state(run: RunPaths, cell: Cell) -> dict:
    """{"state": done|failed|partial|pending, ...} read from the cell's folder alone."""
    cp = run.cell(cell.name)
    if cp.status.is_file():
        st = io.read_json(cp.status)
        if st.get("state") in ("done", "failed"):
            return st
    from study.train import checkpoints  # lightweight: only globbing

    steps = [s for s, _ in checkpoints(cp.train_dir)] if cp.train_dir.is_dir() else []
    if (cp.adapter / "adapter_model.safetensors").is_file():
        return {"state": "partial", "detail": "trained, measurements pending"}
    if steps:
        return {"state": "partial", "detail": f"checkpoint at step {steps[-1]}/{cell.train.steps}"}
    return {"state": "pending"}


# -------------------------------------------------------------------------------------------- metrics


COLUMNS = ["cell", "method", "seed", "checkpoint", "metric", "value", "ci_low", "ci_high", "task", "n"]


def _current_rows(path: Path, settings) -> list[dict]:
    """A stage file's rows if it was measured with these settings (a file left by other settings, e.g. from
    before a protocol change, is stale: it is remeasured on the next run and left out of the table now)."""
    if not _stage_done(path, _settings_hash(settings)):
        return []
    return io.read_json(path)["rows"]


def collect_metrics(run: RunPaths, proto: Protocol) -> Path:
    """Rebuild metrics.csv from the stage files of the run (base and cells) that match the protocol's
    current settings: one tidy table."""
    import pandas as pd

    rows = []
    for task in proto.tasks:
        for stage in (s for s in active_stages(proto) if s.on_base):
            for r in _current_rows(base_stage_path(run, stage, task.name), stage.settings(proto)):
                rows.append({"cell": f"base-{task.name}", "method": "base", "seed": None,
                             "checkpoint": 0, "task": task.name, **r})
    ck = checkpoint_stages(proto)
    for cell in proto.cells():
        cp = run.cell(cell.name)
        keep = {"cell": cell.name, "method": cell.method.value, "seed": cell.seed, "task": cell.task.name}
        for stage in active_stages(proto):
            rows += [{**keep, "checkpoint": cell.train.steps, **r}
                     for r in _current_rows(cp.stage(stage.name), stage.settings(proto))]
        for step, _ in intermediate_checkpoints(proto, cell, cp) if ck else ():
            for stage, settings in ck:
                rows += [{**keep, "checkpoint": step, **r}
                         for r in _current_rows(cp.checkpoint(step) / f"{stage.name}.json", settings)]
        rows += lora_rows(proto, cell, cp, keep)
    rows += forgetting_rows(rows)
    if proto.checkpoints is not None:
        rows += onset_rows(rows)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["seed"] = df["seed"].astype("Int64")  # the base has no seed: an empty cell, not NaN-as-float
    io.write_text(run.metrics, df.to_csv(index=False))
    return run.metrics


def lora_rows(proto: Protocol, cell: Cell, cp, keep: dict) -> list[dict]:
    """`lora/delta_norm` (the adapter's ||ΔW||_F, exact: its CI is the value) for the final adapter and every
    intermediate checkpoint that is measured."""
    from study.lora_norm import delta_norm

    found = [(cell.train.steps, cp.adapter)] + [(s, d) for s, d in intermediate_checkpoints(proto, cell, cp)]
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


# ------------------------------------------------------------------------------------------------- run


def _quiet_libraries() -> None:
    """Our progress bars and log replace the libraries' per-step prints and load bars."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")


def _setup_logging(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


class Runner:
    def __init__(self, protocol_path: str | Path, console=None):
        from rich.console import Console

        self.path = Path(protocol_path)
        self.proto = load_protocol(self.path)
        self.run_paths = RunPaths.for_protocol(self.path, self.proto.results_dir)
        self.console = console or Console()
        self._host = None

    def host(self):
        """The base model for measurements: loaded once per process, adapters swapped in."""
        if self._host is None:
            from study.models import AdapterHost

            self._host = AdapterHost(self.proto.model.source, self.runtime)
        return self._host

    def run(self, only: str | None = None) -> int:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Table

        from study.models import resolve_runtime

        rp = self.run_paths
        _quiet_libraries()
        _setup_logging(rp.log)
        self.runtime = resolve_runtime(self.proto.model.device, self.proto.model.dtype)
        io.write_text(rp.protocol, yaml.safe_dump(self.proto.model_dump(mode="json"), sort_keys=False))
        io.write_json(rp.manifest, manifest(self.runtime))
        cells = [c for c in self.proto.cells() if not only or only in c.name]
        log.info("run %s: %d cells on %s/%s", self.path, len(cells), self.runtime.device, self.runtime.dtype)

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn()]
        failed: list[tuple[str, str]] = []
        t0 = time.time()
        with Progress(*columns, console=self.console, transient=False) as progress:
            overall = progress.add_task("cells", total=len(cells))
            for task in self.proto.tasks:
                try:
                    self._measure_base(task, progress)
                except Exception as e:  # the cells can still be trained and measured; the run will exit 1
                    reason = f"{type(e).__name__}: {e}"
                    failed.append((f"base/{task.name}", reason))
                    log.error("base measurement for %s failed: %s\n%s", task.name, reason, traceback.format_exc())
                    progress.console.print(f"[red]base measurement failed[/] ({task.name}): {reason}")
            for cell in cells:
                try:
                    self._run_cell(cell, progress)
                except Exception as e:  # one failing cell never stops the others
                    reason = f"{type(e).__name__}: {e}"
                    failed.append((cell.name, reason))
                    log.error("cell %s failed: %s\n%s", cell.name, reason, traceback.format_exc())
                    io.write_json(rp.cell(cell.name).status, {"state": "failed", "error": reason,
                                                              "traceback": traceback.format_exc()})
                    progress.console.print(f"[red]failed[/] {cell.name}: {reason}")
                progress.advance(overall)
        collect_metrics(rp, self.proto)
        self._report()

        table = Table(title=f"{self.path.name}: {len(cells) - len(failed)}/{len(cells)} cells done "
                            f"in {time.time() - t0:.0f} s")
        for col in ("cell", "state", "newtask/success"):
            table.add_column(col)
        for cell in cells:
            st = cell_state(rp, cell)
            table.add_row(cell.name, st["state"], _fmt_success(rp.cell(cell.name).stage("newtask")))
        self.console.print(table)
        self.console.print(f"metrics: {rp.metrics}\nlog: {rp.log}")
        for name, reason in failed:
            self.console.print(f"[red]FAILED[/] {name}: {reason}")
        return 1 if failed else 0

    def _report(self) -> None:
        """Statistics, figures and report.md from the run's files (study.report, no model code). A failing
        report never fails the run: the measurements are on disk and `study report RUN` redoes it."""
        from study.report import report_run

        try:
            path = report_run(self.run_paths.root)
            self.console.print(f"report: {path}")
        except Exception as e:
            log.error("report failed: %s\n%s", e, traceback.format_exc())
            self.console.print(f"[yellow]report failed[/] ({type(e).__name__}: {e}); "
                               f"rerun with: study report {self.run_paths.root}")

    def _measure(self, model, tokenizer, data, out_dir: Path, progress=None, label="", base=False,
                 stages: list[tuple[Stage, object]] | None = None) -> None:
        """Run every stage not yet done for this model into `out_dir` (the base: its base/ files).
        `stages`: (stage, settings) pairs, default the protocol's final-adapter stages."""
        rp = self.run_paths
        for stage, settings in stages if stages is not None else self._final_stages():
            if base and not stage.on_base:
                continue
            cfg = settings.model_dump(mode="json")
            h = _stage_hash(cfg)

            def where(s: Stage) -> Path:
                return base_stage_path(rp, s, data.name) if base else out_dir / f"{s.name}.json"

            path = where(stage)
            if _stage_done(path, h):
                continue
            t = time.time()
            if progress is not None:
                progress.console.print(f"  measuring {stage.name} for {label}")
            cache = rp.base(data.name) / stage.base_cache if stage.base_cache else None
            by_name = {s.name: s for s in STAGES}
            previous = {r: io.read_json(where(by_name[r])) for r in stage.reads if where(by_name[r]).is_file()}
            result = stage.run(model, tokenizer, data, settings, cache=cache, previous=previous)
            result |= {"config_hash": h, "config": cfg, "seconds": time.time() - t}
            io.write_json(path, result)
            log.info("%s %s: %.1f s", label, stage.name, time.time() - t)

    def _final_stages(self) -> list[tuple[Stage, object]]:
        return [(s, s.settings(self.proto)) for s in active_stages(self.proto)]

    def _cell_done(self, cell: Cell, cp) -> bool:
        if not (cp.adapter / "adapter_model.safetensors").is_file():
            return False
        if not all(_stage_done(cp.stage(s.name), _settings_hash(c))
                   for s, c in self._final_stages()):
            return False
        ck = checkpoint_stages(self.proto)
        return all(_stage_done(cp.checkpoint(step) / f"{s.name}.json", _settings_hash(c))
                   for step, _ in intermediate_checkpoints(self.proto, cell, cp) for s, c in ck)

    def _measure_base(self, task, progress) -> None:
        from study.tasks import build

        out = self.run_paths.base(task.name)
        todo = [(s, c) for s, c in self._final_stages() if s.on_base]
        rp = self.run_paths
        if all(_stage_done(base_stage_path(rp, s, task.name), _settings_hash(c))
               for s, c in todo):
            return
        host = self.host()
        with host.attached(None) as model:
            self._measure(model, host.tokenizer, build(task), out, progress, f"base/{task.name}", base=True)

    def _run_cell(self, cell: Cell, progress) -> None:
        cp = self.run_paths.cell(cell.name)
        with _CellLock(cp.root) as got:
            if not got:
                progress.console.print(f"  {cell.name}: running in another process, skipped")
                return
            self._run_cell_locked(cell, cp, progress)

    def _run_cell_locked(self, cell: Cell, cp, progress) -> None:
        from study.tasks import build
        from study.train import train_cell

        if self._cell_done(cell, cp):
            if cell_state(self.run_paths, cell)["state"] != "done":
                io.write_json(cp.status, {"state": "done"})
            return
        io.write_json(cp.config, cell.model_dump(mode="json"))
        io.write_json(cp.status, {"state": "running"})
        t = time.time()
        bar = progress.add_task(f"  {cell.name}", total=cell.train.steps)
        train_cell(cell, cp, self.runtime, progress=lambda step: progress.update(bar, completed=step))
        progress.update(bar, completed=cell.train.steps, visible=False)
        train_s = time.time() - t
        host = self.host()
        data = build(cell.task)
        with host.attached(cp.adapter) as model:
            self._measure(model, host.tokenizer, data, cp.root, progress, cell.name)
        ck = checkpoint_stages(self.proto)
        for step, folder in intermediate_checkpoints(self.proto, cell, cp) if ck else ():
            with host.attached(folder) as model:
                self._measure(model, host.tokenizer, data, cp.checkpoint(step), progress,
                              f"{cell.name}@{step}", stages=ck)
        io.write_json(cp.status, {"state": "done", "train_seconds": train_s, "total_seconds": time.time() - t})
        log.info("cell %s done in %.0f s", cell.name, time.time() - t)


class _CellLock:
    """An exclusive lock file per cell, so that two runners on one run folder (e.g. one per GPU) never train
    the same cell; a lock whose process is gone is taken over."""

    def __init__(self, root: Path):
        self.path = root / ".lock"

    def __enter__(self) -> bool:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                self.held = True
                return True
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                    os.kill(pid, 0)  # raises if that process is gone
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # stale: its runner died
                    continue
                except PermissionError:
                    pass
                break
        self.held = False
        return False

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _fmt_success(path: Path) -> str:
    if not path.is_file():
        return "-"
    for r in io.read_json(path)["rows"]:
        if r["metric"] == "newtask/success":
            return f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    return "-"
