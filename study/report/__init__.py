"""The report: statistics, figures, a Markdown report and the paper's generated files, from a run folder alone.

    study report results/smoke                    # stats/, figures/, report.md in the run folder
    study report results/smoke --paper            # ... and paper/generated/ (+ the PDF if TeX is installed)
    study compare results/a results/b

Everything here is a pure function of the run's files (mainly metrics.csv, cells/*/cell.json and the
optional per-item stage JSONs). Nothing imports torch, transformers, peft, trl or model code, so a copied
run folder regenerates the report and the paper on a laptop.

Modules: data (loading, summaries), checks (what must hold before a paper, and the latest calibration of the
statistics), stats (the report's primitives: fits, permutation tests, effect sizes; Holm, Kendall's W, paired t
and mixed-model contrasts come from the shared, torch-free `study.stats`), analysis (those applied to a run),
figures, markdown, paper, compare.
"""

from __future__ import annotations

from pathlib import Path


def report_run(run_dir: str | Path, paper: bool = False, console=print) -> Path:
    """Compute the statistics, draw the figures and write report.md (and paper/generated/ if `paper`).

    The runner calls this at the end of every run; returns the path of report.md.
    """
    from study.report.analysis import run_stats
    from study.report.data import load_run
    from study.report.figures import make_figures
    from study.report.markdown import write_markdown

    run = load_run(run_dir)
    stats = run_stats(run)
    figs = make_figures(run, stats, run.root / "figures")
    path = write_markdown(run, stats, figs)
    if paper:
        from study.report.paper import build_paper

        build_paper(run, stats, figs, console=console)
    return path
