"""`python -m study.report RUN [--paper]`: stats, figures and report.md for a run folder (and the paper).

The same as `study report RUN [--paper]`; usable before the CLI command lands, and on a laptop holding only a
copied run folder.
"""

from __future__ import annotations

import argparse

from study.report import report_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m study.report", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder, e.g. results/smoke")
    ap.add_argument("--paper", action="store_true", help="also regenerate paper/generated/ and build the PDF")
    args = ap.parse_args(argv)
    path = report_run(args.run, paper=args.paper)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
