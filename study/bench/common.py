"""What every bench part shares: the results folder, the machine's state beside each timing, small limits,
the trained adapters of a run."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from study.paths import RESULTS

if TYPE_CHECKING:
    from study.models import Runtime

BENCH = RESULTS / "bench"


def environment(runtime: Runtime | None = None) -> dict:
    """What a timing depends on besides the code: threads and machine load now (a shared CPU)."""
    import torch

    where = {"device": runtime.device, "dtype": runtime.dtype} if runtime else {}
    return {
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_start": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        **where,
    }


def small_limits(suites: list[str], limit: int) -> dict[str, int]:
    """`limit` items per suite; HumanEval (a generation of up to its token cap per item) a quarter of it."""
    return {s: max(1, limit // 4) if s == "humaneval" else limit for s in suites}


def adapter_dirs(run_root: Path, n: int | None = None) -> list[Path]:
    """The trained adapters of a run, in cell-name order; the first n when n is given."""
    weights = Path(run_root).glob("cells/*/adapter/adapter_model.safetensors")
    found = sorted(p.parent.resolve() for p in weights)
    return found[:n] if n else found


def bench_task(proto):
    """The task a stage benchmark measures on: snark where the protocol has it (every stage applies to it,
    the persona stage only to it), else the first."""
    return next((t for t in proto.tasks if t.name == "snark"), proto.tasks[0])
