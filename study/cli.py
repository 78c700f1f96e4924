"""The `study` command.

study validate protocols/default.yaml     check a protocol; one line per problem
study plan protocols/default.yaml         every cell with estimated time (and GPU memory), no model loaded
study run protocols/default.yaml          run (or resume) the study
study run P --executor slurm --partition gpu --gpus-per-cell 1   the same as SLURM jobs (study.executor)
study status protocols/default.yaml       done / partial / pending / failed per cell (+ SLURM job states)
study cancel protocols/default.yaml       cancel the run's SLURM jobs
study report results/default [--paper]    stats, figures, report.md (and paper/generated/ + the PDF)
study compare results/a results/b         runs side by side per method, and a comparison figure
study bench [--only train,kl,...]         stage speeds -> results/bench/
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from study.config import ProtocolError, load_protocol

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="forgetting-study: SFT/DPO/KTO/GRPO forgetting."
)
console = Console()
err = Console(stderr=True)


def _say_problems(protocol: Path, problems: list[str]) -> None:
    err.print(f"[red]{protocol}: invalid protocol[/]", soft_wrap=True, highlight=False)
    for line in problems:  # one line per problem, never wrapped (greppable: file, field path, fix)
        err.print(f"  {protocol}: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(path: Path):
    try:
        return load_protocol(path)
    except ProtocolError as e:
        _say_problems(e.path, e.problems)


def _problems(protocol: Path, proto) -> None:
    """The checks that need more than the schema, cheap ones first: the tasks' data (a second), then TRL
    building each method's config and the LoRA targets against the model's modules (seconds: they import
    TRL and torch, so they run only when everything else is right)."""
    from study.tasks import check_task

    problems = [p for i, t in enumerate(proto.tasks) if (p := check_task(t, f"tasks.{i}"))]
    if problems:
        _say_problems(protocol, problems)
    from study.models import check_lora_targets
    from study.train import check_trl_options

    problems = check_trl_options(proto)
    if p := check_lora_targets(proto.model.source, proto.train.lora.target_modules, proto.model.revision):
        problems.append(f"train.lora.target_modules: {p}")
    if problems:
        _say_problems(protocol, problems)


@app.command()
def validate(protocol: Path) -> None:
    """Validate a protocol file: exit 0 if good, else one line per problem naming the field and the fix."""
    proto = _load(protocol)
    _problems(protocol, proto)
    per_task = "; ".join(
        f"{t.name}: {', '.join(m.value for m in proto.methods if t.methods is None or m in t.methods)}"
        for t in proto.tasks
    )
    console.print(
        f"[green]ok[/] {protocol}: {len(proto.cells())} cells "
        f"(methods x sweeps x {len(proto.seeds)} seeds per task; {per_task})"
    )
    if proto.allow_unmatched:
        console.print("[yellow]allow_unmatched: the methods' budgets differ; the report says so[/]")
    _gpu_notes(proto)


def _gpu_notes(proto) -> None:
    """One line per GPU path the protocol uses that has not run on a GPU here, and per setting that needs
    the gpu extra when it is not installed (`study run` refuses such a protocol; writing one is fine)."""
    from study.gpu import missing_extra, unverified_paths

    for line in unverified_paths(proto) + missing_extra(proto):
        console.print(f"[yellow]note[/] {line}", highlight=False, soft_wrap=True)


def budget_table(proto) -> Table:
    """The matched budget per method: prompts per optimizer step are the same for all; TRL's rows follow."""
    from study.config import rows_per_prompt

    t = proto.train
    title = "matched budget" + (" (allow_unmatched: budgets differ)" if proto.allow_unmatched else "")
    table = Table(title=title)
    for col in (
        "method",
        "prompts/step",
        "TRL rows/step",
        "steps",
        "prompts seen",
        "max length",
        "LoRA r",
        "learning rate(s)",
    ):
        table.add_column(col)
    for method, spec in proto.methods.items():
        steps = spec.steps or t.steps
        lrs = spec.sweep.get("learning_rate") or [spec.learning_rate or t.learning_rate]
        rows = t.prompts_per_step * rows_per_prompt(method, spec)
        table.add_row(
            method.value,
            str(t.prompts_per_step),
            str(rows),
            str(steps),
            str(steps * t.prompts_per_step),
            str(t.max_length),
            str(t.lora.r),
            ", ".join(f"{x:g}" for x in lrs) + _unswept(proto, method, spec, t),
        )
    return table


def _unswept(proto, method, spec, t) -> str:
    """' (snark: 0.002)' for the tasks that train this method without its sweep (`tasks[].sweeps: false`)."""
    if not spec.sweep:
        return ""
    tasks = [x.name for x in proto.tasks if not x.sweeps and (x.methods is None or method in x.methods)]
    return f" ({', '.join(tasks)}: {spec.learning_rate or t.learning_rate:g})" if tasks else ""


@app.command()
def plan(
    protocol: Path,
    gpu: str = typer.Option(
        None,
        help="GPU type for the estimate (default: A100-80GB for a CUDA protocol, else "
        "this CPU); one of study.plan.GPUS",
    ),
    generation: str = typer.Option("hf", help="GPU generation engine: hf (generate) or vllm"),
    usd_per_gpu_hour: float = typer.Option(None, help="price of one GPU-hour, for the cost"),
    array_parallelism: int = typer.Option(16, help="SLURM cells at once, for the wall time"),
    gpus_per_cell: int = typer.Option(1, help="GPUs per cell job, for GPU-hours and cost"),
) -> None:
    """Every cell with its estimated training and measurement time and peak memory, totals, cost and SLURM
    wall time; loads no model. Every estimate not measured on this machine is listed as an assumption."""
    from study.plan import GPUS, is_gpu_protocol, plan_rows, summary

    proto = _load(protocol)
    console.print(budget_table(proto))
    _gpu_notes(proto)
    if gpu is not None and gpu not in GPUS:
        err.print(f"[red]--gpu {gpu}[/]: use one of {', '.join(GPUS)}")
        raise typer.Exit(2)
    if generation not in ("hf", "vllm"):
        err.print(f"[red]--generation {generation}[/]: use hf or vllm")
        raise typer.Exit(2)
    rows = plan_rows(proto, gpu=gpu, generation=generation)
    device = rows[0]["device"] if rows else (gpu or "cpu")
    on_gpu = device != "cpu"
    table = Table(
        title=f"{protocol}: {len(rows)} cells on {device}" + (f" ({generation} generation)" if on_gpu else "")
    )
    for col in ("cell", "method", "seed", "sweep", "steps", "train", "measure", "total", "peak mem"):
        table.add_column(col)
    for r in rows:
        sweep = ", ".join(f"{k}={v}" for k, v in r["sweep"].items()) or "-"
        mem = f"{r['peak_memory_gb']:.1f} GB" + ("" if r["fits"] else " (does not fit)")
        table.add_row(
            r["cell"],
            r["method"],
            str(r["seed"]),
            sweep,
            str(r["steps"]),
            _dur(r["train_seconds"]),
            _dur(r["measure_seconds"]),
            _dur(r["seconds"]),
            mem,
        )
    console.print(table)
    s = summary(
        proto,
        rows,
        device if on_gpu else None,
        generation,
        array_parallelism,
        gpus_per_cell,
        usd_per_gpu_hour,
    )
    console.print(
        f"training {_dur(s['train_seconds'])} + measurement {_dur(s['measure_seconds'])} "
        f"+ base {_dur(s['base_seconds'])} = {_dur(s['device_seconds'])} of "
        f"{'GPU' if on_gpu else 'CPU'} time in one process; peak memory {s['peak_memory_gb']:.1f} GB",
        highlight=False,
    )
    if not on_gpu and proto.executor.workers > 1:
        console.print(
            f"with executor.workers {proto.executor.workers} (processes sharing the cells and the cores): "
            f"about {_dur(s['local_wall_seconds'])} of wall time here (study.plan.CPU_WORKER_SPEEDUP)",
            highlight=False,
        )
    if on_gpu:
        cost = (
            f", ${s['usd']:,.0f} at ${usd_per_gpu_hour}/GPU-hour"
            if "usd" in s
            else " (--usd-per-gpu-hour for cost)"
        )
        console.print(
            f"{s['gpu_hours']:.1f} GPU-hours at {gpus_per_cell} GPU(s) per cell{cost}", highlight=False
        )
    console.print(
        f"SLURM wall time at --array-parallelism {array_parallelism}: {_dur(s['slurm_wall_seconds'])} "
        f"(base job, then the cell array, then the report; queue waits not counted)",
        highlight=False,
    )
    console.print(power_report(protocol, proto)[0])  # what this design can detect, beside what it costs
    notes = sorted({a for r in rows for a in r["assumptions"]})
    if not on_gpu and not is_gpu_protocol(proto):
        notes.append("CPU figures: measured on this 2-core machine (make bench); another CPU differs")
    for a in notes:
        console.print(f"[yellow]assumption[/] {a}", highlight=False)
    if on_gpu:
        from study import plan as P

        console.print(
            f"GPU model ({device}: {GPUS[device].bf16_tflops:g} TFLOP/s bf16, "
            f"{GPUS[device].bandwidth_gbs:g} GB/s, {GPUS[device].memory_gb:g} GB; vendor datasheet): "
            f"training at {P.TRAIN_MFU:.0%} MFU, scoring at {P.SCORE_MFU:.0%}, decode step = max(weights "
            f"/ ({P.BANDWIDTH_EFFICIENCY:.0%} of bandwidth), {P.DECODE_OVERHEAD_S[generation] * 1e3:.0f} "
            f"ms {generation} overhead); GRPO generation counted; see study/plan.py",
            highlight=False,
        )


@app.command()
def run(
    protocol: Path,
    only: str = typer.Option(None, help="run only cells whose name contains this"),
    executor: str = typer.Option(
        None,
        help="local (this process) or slurm (jobs through submitit); default: "
        "the protocol's executor.kind, else local",
    ),
    partition: str = typer.Option(None, help="slurm: partition"),
    gpus_per_cell: int = typer.Option(None, help="slurm: GPUs per job (base and cells)"),
    time: str = typer.Option(
        None, help="slurm: time limit per job (default 4:00:00; a cell past it is requeued)"
    ),
    array_parallelism: int = typer.Option(None, help="slurm: cells running at once (default 16)"),
    cpus_per_cell: int = typer.Option(None, help="slurm: CPUs per job"),
    mem: str = typer.Option(None, help="slurm: memory per job, e.g. 64G"),
    wait: bool = typer.Option(
        False,
        "--wait",
        help="local: wait for cells another process holds (default: skip "
        "them and exit non-zero); slurm: block until every job ends",
    ),
    workers: int = typer.Option(
        None,
        min=1,
        max=64,
        help="local, CPU: processes sharing the cells and the CPU threads (default: the protocol's "
        "executor.workers, else 1)",
    ),
    worker: bool = typer.Option(False, "--worker", hidden=True, help="a worker of a shared local run"),
) -> None:
    """Run (or resume) a study: train every cell, measure it, write results/<protocol>/metrics.csv."""
    from study.executor import LocalExecutor
    from study.gpu import missing_extra

    proto = _load(protocol)
    _problems(protocol, proto)
    if missing := missing_extra(proto):
        _say_problems(protocol, missing)
    executor = executor or proto.executor.kind
    if worker:  # started by a shared run's first process (study.runner.Workers)
        from study.runner import Runner

        raise typer.Exit(Runner(protocol).work(only=only))
    if executor == "local":
        raise typer.Exit(
            LocalExecutor().run(protocol, only=only, console=console, wait=wait, workers=workers)
        )
    if executor != "slurm":
        err.print(f"[red]--executor {executor}[/]: use local or slurm")
        raise typer.Exit(2)
    from study.executor import SlurmExecutor, SlurmOptions
    from study.executor import wait as wait_jobs
    from study.paths import RunPaths

    given = {
        "partition": partition,
        "gpus_per_cell": gpus_per_cell,
        "time": time,
        "array_parallelism": array_parallelism,
        "cpus_per_cell": cpus_per_cell,
        "mem": mem,
    }
    opts = SlurmOptions.from_protocol(proto.executor, **given)
    try:
        rec = SlurmExecutor(opts).submit(protocol, only=only)
    except (RuntimeError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    console.print(
        f"submitted: base {rec['base'] or '(already measured)'}, cells array {rec['array'] or '(none)'} "
        f"({len(rec['cells'])} cells), report {rec['report']}"
    )
    rp = RunPaths.for_protocol(protocol, proto.results_dir)
    console.print(f"job ids: {rp.root / 'slurm' / 'jobs.json'}; `study status {protocol}` to follow")
    if wait:
        states = wait_jobs(
            rp,
            on_change=lambda s: console.print(" ".join(f"{j}={st}" for j, st in s.items()), highlight=False),
        )
        bad = {j: s for j, s in states.items() if s != "COMPLETED"}
        raise typer.Exit(1 if bad else 0)


@app.command("run-cell", hidden=True)
def run_cell(protocol: Path, cell: str) -> None:
    """Train and measure one cell in this process (what `accelerate launch` runs for a multi-GPU cell)."""
    from study.executor import run_cell as run_one

    state = run_one(protocol, cell)
    console.print(f"{cell}: {state}", highlight=False)
    raise typer.Exit(0 if state in ("done", "trained", "locked") else 1)


@app.command()
def cancel(protocol: Path) -> None:
    """Cancel every SLURM job of the run (base, cell array, report); finished work stays in the run folder."""
    from study.executor import cancel as cancel_jobs
    from study.paths import RunPaths

    proto = _load(protocol)
    ids = cancel_jobs(RunPaths.for_protocol(protocol, proto.results_dir))
    console.print(f"cancelled {', '.join(ids)}" if ids else "no SLURM jobs recorded for this run")


@app.command()
def status(protocol: Path) -> None:
    """Show each cell's state (done / partial / pending / failed) from the run folder."""
    from study.executor import job_states, load_record
    from study.metrics import cell_state
    from study.paths import RunPaths

    proto = _load(protocol)
    rp = RunPaths.for_protocol(protocol, proto.results_dir)
    record = load_record(rp)
    jobs = job_states(rp) if record else {}
    table = Table(title=f"{rp.root}")
    for col in ("cell", "state", "detail", *(["slurm job", "slurm state"] if record else [])):
        table.add_column(col)
    counts: dict[str, int] = {}
    for cell in proto.cells():
        st = cell_state(rp, proto, cell)
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        colour = {"done": "green", "failed": "red", "partial": "yellow"}.get(st["state"], "white")
        jid = (record or {}).get("cells", {}).get(cell.name)
        slurm = [jid or "-", jobs.get(jid, "-") if jid else "-"] if record else []
        table.add_row(
            cell.name, f"[{colour}]{st['state']}[/]", st.get("error") or st.get("detail") or "", *slurm
        )
    console.print(table)
    if record:
        for what in ("base", "report"):
            if record.get(what):
                console.print(
                    f"slurm {what} job {record[what]}: {jobs.get(record[what], '-')}", highlight=False
                )
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@app.command()
def report(
    run: Path,
    paper: bool = typer.Option(
        False, "--paper", help="also regenerate paper/generated/ and build paper/main.pdf"
    ),
    strict: bool = typer.Option(False, "--strict", help="exit 1 if a pre-paper check fails"),
    collect: bool = typer.Option(
        True,
        "--collect/--no-collect",
        help="first rebuild metrics.csv from the run's stage files (needs protocol.yaml)",
    ),
) -> None:
    """Statistics, figures and report.md for a run folder; with --paper also paper/generated/ and the PDF."""
    import pandas as pd

    from study.report import report_run

    if collect and (run / "protocol.yaml").is_file():  # measurements made since the last run ended count too
        from study.metrics import collect_metrics
        from study.paths import RunPaths

        collect_metrics(RunPaths(run), load_protocol(run / "protocol.yaml"))
    if not (run / "metrics.csv").is_file():
        err.print(f"[red]{run}/metrics.csv not found[/]: run `study run PROTOCOL` first")
        raise typer.Exit(2)
    path = report_run(run, paper=paper, console=lambda m: console.print(m, markup=False, highlight=False))
    checks = pd.read_csv(run / "stats" / "checks.csv")
    for _, c in checks.iterrows():
        colour = "green" if c.ok else "red"
        console.print(f"[{colour}]{'pass' if c.ok else 'FAIL'}[/] {c.check}: {c.detail}", highlight=False)
    console.print(f"report: {path}")
    if strict and not checks["ok"].all():
        raise typer.Exit(1)


@app.command()
def compare(runs: list[Path]) -> None:
    """Print runs side by side per method (forgetting per benchmark, KL, coherence); write a comparison figure."""
    from study.report.compare import write_comparison

    if len(runs) < 2:
        err.print("[red]give two or more run folders[/]")
        raise typer.Exit(2)
    missing = [r for r in runs if not (r / "metrics.csv").is_file()]
    if missing:
        err.print(f"[red]no metrics.csv in[/] {', '.join(map(str, missing))}")
        raise typer.Exit(2)
    wide, out = write_comparison(runs)
    table = Table(title=" vs ".join(r.name for r in runs) + " (mean over cells [95% CI])")
    for col in wide.columns:
        table.add_column(str(col))
    for row in wide.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    console.print(table)
    console.print(f"written: {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Stage speeds against the machine's own roofline -> results/bench/ (`study bench --help` for parts)."""
    from study.bench import main

    main(ctx.args)


def power_report(protocol: Path, proto):
    """(the MDE table, the rows, the sizes, the run paths) of a protocol's primary outcomes."""
    import json

    import numpy as np

    from study.paths import RunPaths
    from study.stats.power import power_table, protocol_sizes

    rp = RunPaths.for_protocol(protocol, proto.results_dir)
    item_sd = {}
    reg = rp.root / "base" / "model" / "regression.json"  # per-item records, when the base was measured
    if reg.is_file():
        for suite, recs in (json.loads(reg.read_text()).get("items") or {}).items():
            p = np.array([r["correct"] for r in recs if r.get("correct") is not None], float)
            if len(p) > 1:  # paired base-adapter difference at agreement 0.8 (the prior's assumption)
                item_sd[f"forgetting/{suite}"] = float(np.sqrt(2 * p.mean() * (1 - p.mean()) * 0.2))
        if item_sd:
            item_sd["forgetting"] = float(np.sqrt(np.mean(np.square(list(item_sd.values())))))
    primaries, sizes = protocol_sizes(proto)
    df = power_table(primaries, sizes, item_sd)
    table = Table(title=f"{protocol}: minimum detectable effects at 80 % power")
    for col in (
        "metric",
        "task",
        "contrast",
        "seeds",
        "items",
        "sd cell",
        "alpha each",
        "MDE",
        "MDE / sd cell",
        "source",
    ):
        table.add_column(col)
    for r in df.itertuples():
        table.add_row(
            r.metric,
            str(r.task),
            f"{r.a} - {r.b}",
            str(r.seeds),
            str(r.n_items),
            f"{r.sd_cell:.3g}",
            f"{r.alpha_each:.3g}",
            f"{r.mde:.3g}",
            f"{r.mde_cell_sd:.2f}",
            r.source + (f"; {r.note}" if r.note else ""),
        )
    return table, df, sizes, rp


@app.command()
def power(protocol: Path) -> None:
    """Minimum detectable effect (80 % power) of each primary outcome from the protocol's sizes and the base's
    per-item variances (measured ones from the run folder's base/, else stated priors); writes power.json."""
    import json

    table, df, sizes, rp = power_report(protocol, _load(protocol))
    console.print(table)
    rp.root.mkdir(parents=True, exist_ok=True)
    (rp.root / "power.json").write_text(
        json.dumps({"sizes": sizes, "rows": df.to_dict("records")}, indent=1, default=str)
    )
    console.print(f"written: {rp.root / 'power.json'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def calibrate(ctx: typer.Context) -> None:
    """Null and planted-effect simulations of every statistic -> results/calibration/ (cached by code hash)."""
    from study.stats.calibrate import main

    raise typer.Exit(main(ctx.args))


def _dur(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


if __name__ == "__main__":
    app()
