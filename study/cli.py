"""The `study` command.

    study validate protocols/default.yaml     check a protocol; one line per problem
    study plan protocols/default.yaml         every cell with estimated time (and GPU memory), no model loaded
    study run protocols/default.yaml          run (or resume) the study
    study status protocols/default.yaml       done / partial / pending / failed per cell
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

app = typer.Typer(add_completion=False, no_args_is_help=True, help="forgetting-study: SFT/DPO/KTO/GRPO forgetting.")
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
    if (p := check_lora_targets(proto.model.source, proto.train.lora.target_modules, proto.model.revision)):
        problems.append(f"train.lora.target_modules: {p}")
    if problems:
        _say_problems(protocol, problems)


@app.command()
def validate(protocol: Path) -> None:
    """Validate a protocol file: exit 0 if good, else one line per problem naming the field and the fix."""
    proto = _load(protocol)
    _problems(protocol, proto)
    console.print(f"[green]ok[/] {protocol}: {len(proto.cells())} cells "
                  f"({len(proto.tasks)} tasks x {len(proto.methods)} methods x sweeps x {len(proto.seeds)} seeds)")
    if proto.allow_unmatched:
        console.print("[yellow]allow_unmatched: the methods' budgets differ; the report says so[/]")


@app.command()
def plan(protocol: Path) -> None:
    """Print every cell with an estimate of its time (and GPU memory for GPU protocols); loads no model."""
    from study.plan import plan_rows

    proto = _load(protocol)
    rows = plan_rows(proto)
    gpu = rows and rows[0]["device"] == "gpu"
    table = Table(title=f"{protocol}: {len(rows)} cells on {'a GPU (rough)' if gpu else 'this CPU'}")
    for col in ("cell", "method", "seed", "sweep", "steps", "est. time", *(["est. GPU memory"] if gpu else [])):
        table.add_column(col)
    for r in rows:
        sweep = ", ".join(f"{k}={v}" for k, v in r["sweep"].items()) or "-"
        extra = [f"{r['gpu_memory_gb']:.1f} GB"] if gpu else []
        table.add_row(r["cell"], r["method"], str(r["seed"]), sweep, str(r["steps"]), _dur(r["seconds"]), *extra)
    console.print(table)
    total = sum(r["seconds"] for r in rows)
    console.print(f"training total: {_dur(total)} (measurement stages come on top; see `make bench`)")


@app.command()
def run(protocol: Path, only: str = typer.Option(None, help="run only cells whose name contains this"),
        wait: bool = typer.Option(False, "--wait", help="wait for cells another process holds, not skip them"),
        ) -> None:
    """Run (or resume) a study: train every cell, measure it, write results/<protocol>/metrics.csv."""
    from study.runner import Runner

    _problems(protocol, _load(protocol))
    raise typer.Exit(Runner(protocol, console=console).run(only=only, wait=wait))


@app.command()
def status(protocol: Path) -> None:
    """Show each cell's state (done / partial / pending / failed) from the run folder."""
    from study.metrics import cell_state
    from study.paths import RunPaths

    proto = _load(protocol)
    rp = RunPaths.for_protocol(protocol, proto.results_dir)
    table = Table(title=f"{rp.root}")
    for col in ("cell", "state", "detail"):
        table.add_column(col)
    counts: dict[str, int] = {}
    for cell in proto.cells():
        st = cell_state(rp, proto, cell)
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        colour = {"done": "green", "failed": "red", "partial": "yellow"}.get(st["state"], "white")
        table.add_row(cell.name, f"[{colour}]{st['state']}[/]", st.get("error") or st.get("detail") or "")
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@app.command()
def report(
    run: Path,
    paper: bool = typer.Option(False, "--paper", help="also regenerate paper/generated/ and build paper/main.pdf"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 if a pre-paper check fails"),
    collect: bool = typer.Option(True, "--collect/--no-collect",
                                 help="first rebuild metrics.csv from the run's stage files (needs protocol.yaml)"),
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


def _dur(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


if __name__ == "__main__":
    app()
