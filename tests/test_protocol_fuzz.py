"""Hostile and careless protocols: every malformed file gets exit 2 and one clear line per problem naming the
file, the field path and the fix, with no traceback; cheap problems are answered in well under a second.
A Hypothesis property test mutates the shipped protocols: no traceback, exit 0 or 2, every accepted one plans.

    .venv/bin/python -m pytest tests/test_protocol_fuzz.py -q
    .venv/bin/python -m pytest tests/test_protocol_fuzz.py -q -s -k table_summary   # prints the table
"""

from __future__ import annotations

import copy
import random
import re
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from study.cli import app
from study.tasks import snark
from tests.conftest import REPO, TINY_PROTOCOL

GOOD = dict(TINY_PROTOCOL, methods={"sft": {}, "dpo": {"beta": 0.1}})


def _set(body: dict, dotted: str, value) -> dict:
    """A copy of body with `a.b.0.c` set (None deletes the key)."""
    body = copy.deepcopy(body)
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    node = body
    for p in parents:
        node = node[p] if isinstance(node, list) else node.setdefault(p, {})
    if value is _DELETE:
        node.pop(last)
    else:
        node[last] = value
    return body


_DELETE = object()


def mut(**changes) -> dict:
    body = GOOD
    for dotted, value in changes.items():
        body = _set(body, dotted.replace("__", "."), value)
    return body


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")
)
GOOD_YAML = yaml.safe_dump(GOOD, sort_keys=False)

# (class, id, content, field path the problem line names, phase). Content: a dict (dumped as YAML), str (written
# as UTF-8), bytes, or a callable(tmp_path) -> path. Phase "cheap": answered by the schema and file checks
# alone; "full": needs TRL or the model's module tree (allowed more time, runs after the cheap checks pass).
CASES = [
    # unreadable files
    ("unreadable", "folder as protocol path", lambda d: d, "is a folder", "cheap"),
    ("unreadable", "missing file", lambda d: d / "nope.yaml", "file not found", "cheap"),
    ("unreadable", "broken symlink", lambda d: _symlink(d), "file not found", "cheap"),
    ("unreadable", "latin-1 bytes", "description: caf\xe9\n".encode("latin-1"), "not UTF-8", "cheap"),
    ("unreadable", "UTF-16 with BOM", GOOD_YAML.encode("utf-16"), "not UTF-8", "cheap"),
    ("unreadable", "random bytes", random.Random(0).randbytes(2000), "not UTF-8", "cheap"),
    ("unreadable", "NUL byte", "name: a\x00b\n", "not valid YAML", "cheap"),
    ("unreadable", "file over 1 MB", "# " + "x" * 1_100_000 + "\n", "bytes", "cheap"),
    (
        "unreadable",
        "YAML syntax error",
        "tasks: [{name: snark}\nmethods: {sft: {}}\n",
        "not valid YAML",
        "cheap",
    ),
    (
        "unreadable",
        "python object tag",
        "!!python/object/apply:os.system [echo hi]\n",
        "not valid YAML",
        "cheap",
    ),
    ("unreadable", "key given twice", GOOD_YAML + "seeds: [5]\n", "seeds: given twice", "cheap"),
    # not a mapping where a mapping is needed
    ("non-mapping", "top level is a list", "- tasks\n- methods\n", "mapping", "cheap"),
    ("non-mapping", "top level is a string", "hello\n", "mapping", "cheap"),
    ("non-mapping", "empty file", "", "tasks: required", "cheap"),
    ("non-mapping", "methods as a list", mut(methods=["sft", "dpo"]), "methods:", "cheap"),
    ("non-mapping", "tasks as a mapping", mut(tasks={"name": "snark"}), "tasks:", "cheap"),
    ("non-mapping", "tasks as strings", mut(tasks=["snark"]), "tasks.0", "cheap"),
    ("non-mapping", "model as a string", mut(model="tiny-random"), "model", "cheap"),
    ("non-mapping", "train as a list", mut(train=[1, 2]), "train", "cheap"),
    ("non-mapping", "sweep as a list", mut(methods={"sft": {"sweep": [1, 2]}}), "methods.sft.sweep", "cheap"),
    # YAML bombs
    ("alias bomb", "billion laughs under trl", BOMB + GOOD_YAML, "expands to more than", "cheap"),
    ("alias bomb", "200 aliases", "a: &a 1\nl: [" + ", ".join(["*a"] * 200) + "]\n", "aliases", "cheap"),
    (
        "alias bomb",
        "nested 40 deep",
        GOOD_YAML + "description: " + "[" * 40 + "]" * 40 + "\n",
        "nested more",
        "cheap",
    ),
    ("alias bomb", "nested 5000 deep", "x: " + "[" * 5000 + "]" * 5000 + "\n", "nesting depth", "cheap"),
    ("alias bomb", "self-referencing alias", "a: &a [1, *a]\n", "refers to itself", "cheap"),
    # non-finite numbers
    ("non-finite", "beta .nan", mut(methods={"dpo": {"beta": float("nan")}}), "methods.dpo.beta", "cheap"),
    ("non-finite", "beta .inf", mut(methods={"dpo": {"beta": float("inf")}}), "methods.dpo.beta", "cheap"),
    (
        "non-finite",
        "learning_rate -.inf",
        mut(train__learning_rate=float("-inf")),
        "train.learning_rate",
        "cheap",
    ),
    (
        "non-finite",
        "sweep value .nan",
        mut(methods={"sft": {"sweep": {"learning_rate": [1e-3, float("nan")]}}}),
        "methods.sft.sweep.learning_rate.1",
        "cheap",
    ),
    (
        "non-finite",
        "trl value .inf",
        mut(methods={"sft": {"trl": {"max_grad_norm": float("inf")}}}),
        "methods.sft.trl.max_grad_norm",
        "cheap",
    ),
    # duplicates
    ("duplicates", "seeds [0, 0]", mut(seeds=[0, 0]), "seeds", "cheap"),
    ("duplicates", "a task twice", mut(tasks=[{"name": "snark"}, {"name": "snark"}]), "tasks", "cheap"),
    (
        "duplicates",
        "a suite twice",
        mut(regression__suites=["hellaswag", "hellaswag"]),
        "regression.suites",
        "cheap",
    ),
    (
        "duplicates",
        "a sweep value twice",
        mut(methods={"sft": {"sweep": {"learning_rate": [1e-3, 1e-3]}}}),
        "methods.sft.sweep.learning_rate",
        "cheap",
    ),
    (
        "duplicates",
        "a held-out domain twice",
        mut(tasks=[{"name": "snark", "heldout_domains": ["music", "music"]}]),
        "tasks.0.heldout_domains",
        "cheap",
    ),
    (
        "duplicates",
        "a retest seed twice",
        mut(persona={"retest_seeds": [1, 1]}),
        "persona.retest_seeds",
        "cheap",
    ),
    # empty lists
    ("empty", "tasks []", mut(tasks=[]), "tasks", "cheap"),
    ("empty", "methods {}", mut(methods={}), "methods", "cheap"),
    ("empty", "seeds []", mut(seeds=[]), "seeds", "cheap"),
    ("empty", "suites []", mut(regression__suites=[]), "regression.suites", "cheap"),
    (
        "empty",
        "sweep list []",
        mut(methods={"sft": {"sweep": {"learning_rate": []}}}),
        "methods.sft.sweep.learning_rate",
        "cheap",
    ),
    (
        "empty",
        "target_modules []",
        mut(train__lora={"target_modules": []}),
        "train.lora.target_modules",
        "cheap",
    ),
    (
        "empty",
        "heldout_domains []",
        mut(tasks=[{"name": "snark", "heldout_domains": []}]),
        "tasks.0.heldout_domains",
        "cheap",
    ),
    # absurd sizes
    (
        "absurd size",
        "steps 1e30 (YAML text)",
        GOOD_YAML.replace("steps: 4", "steps: 1e30"),
        "train.steps",
        "cheap",
    ),
    ("absurd size", "steps 1.0e20", GOOD_YAML.replace("steps: 4", "steps: 1.0e20"), "train.steps", "cheap"),
    ("absurd size", "steps 10**20", mut(train__steps=10**20), "train.steps", "cheap"),
    ("absurd size", "steps 2.5", mut(train__steps=2.5), "train.steps", "cheap"),
    ("absurd size", "seed 2**40", mut(seeds=[2**40]), "seeds", "cheap"),
    ("absurd size", "seed -1", mut(seeds=[-1]), "seeds", "cheap"),
    ("absurd size", "max_length 10**9", mut(train__max_length=10**9), "train.max_length", "cheap"),
    ("absurd size", "lora r 10**6", mut(train__lora={"r": 10**6}), "train.lora.r", "cheap"),
    (
        "absurd size",
        "10**8 cells of sweeps",
        mut(
            seeds=list(range(1000)),
            methods={
                "sft": {
                    "sweep": {
                        "learning_rate": [i / 1e6 + 1e-6 for i in range(300)],
                        "warmup_ratio": [i / 1000 for i in range(300)],
                    }
                }
            },
        ),
        "cells",
        "cheap",
    ),
    (
        "absurd size",
        "arithmetic n_train 10**6",
        mut(tasks=[{"name": "arithmetic", "n_train": 10**6}]),
        "tasks.0.n_train",
        "cheap",
    ),
    (
        "absurd size",
        "persona direction_prompts 10**9",
        mut(persona={"direction_prompts": 10**9}),
        "persona.direction_prompts",
        "cheap",
    ),
    (
        "absurd size",
        "regression limit 10**12",
        mut(regression__limit={"hellaswag": 10**12}),
        "regression.limit.hellaswag",
        "cheap",
    ),
    # unknown values
    (
        "unknown device",
        "device tpu",
        mut(model={"source": "tiny-random", "device": "tpu"}),
        "model.device",
        "cheap",
    ),
    (
        "unknown device",
        "device cuda:x",
        mut(model={"source": "tiny-random", "device": "cuda:x"}),
        "model.device",
        "cheap",
    ),
    (
        "unknown domain",
        "held-out domain nope",
        mut(tasks=[{"name": "snark", "heldout_domains": ["nope"]}]),
        "tasks.0.heldout_domains",
        "cheap",
    ),
    (
        "unknown domain",
        "every domain held out",
        mut(tasks=[{"name": "snark", "heldout_domains": sorted({r.domain for r in snark.load_rows()})}]),
        "tasks.0.heldout_domains",
        "cheap",
    ),
    (
        "unknown domain",
        "held-out domains on arithmetic",
        mut(tasks=[{"name": "arithmetic", "heldout_domains": ["x"]}]),
        "tasks.0.heldout_domains",
        "cheap",
    ),
    ("unknown field", "misspelt field", mut(train__stpes=3), "train.stpes", "cheap"),
    ("unknown field", "renamed batch_size", mut(train__batch_size=3), "train.batch_size", "cheap"),
    ("unknown field", "unknown method ppo", mut(methods={"ppo": {}}), "methods.ppo", "cheap"),
    ("unknown field", "foreign option", mut(methods={"sft": {"beta": 0.3}}), "methods.sft.beta", "cheap"),
    (
        "loss_type",
        "bogus DPO loss",
        mut(methods={"dpo": {"loss_type": "bogus"}}),
        "methods.dpo.loss_type",
        "cheap",
    ),
    (
        "loss_type",
        "bogus KTO loss",
        mut(methods={"kto": {"loss_type": "bogus"}}),
        "methods.kto.loss_type",
        "cheap",
    ),
    (
        "loss_type",
        "bogus GRPO loss",
        mut(methods={"grpo": {"loss_type": "bogus"}}),
        "methods.grpo.loss_type",
        "cheap",
    ),
    (
        "loss_type",
        "loss under trl:",
        mut(methods={"dpo": {"trl": {"loss_type": ["bogus"]}}}),
        "methods.dpo.trl.loss_type",
        "cheap",
    ),
    # bad values inside sweep:
    (
        "sweep",
        "beta [-1]",
        mut(methods={"dpo": {"sweep": {"beta": [-1]}}}),
        "methods.dpo.sweep.beta.0",
        "cheap",
    ),
    (
        "sweep",
        "learning_rate not a list",
        mut(methods={"sft": {"sweep": {"learning_rate": 0.1}}}),
        "methods.sft.sweep.learning_rate",
        "cheap",
    ),
    (
        "sweep",
        "num_generations ['x']",
        mut(methods={"grpo": {"sweep": {"num_generations": ["x"]}}}),
        "methods.grpo.sweep.num_generations.0",
        "cheap",
    ),
    (
        "sweep",
        "loss_type [bogus]",
        mut(methods={"dpo": {"sweep": {"loss_type": ["sigmoid", "bogus"]}}}),
        "methods.dpo.sweep.loss_type.1",
        "cheap",
    ),
    (
        "sweep",
        "unknown sweep key",
        mut(methods={"sft": {"sweep": {"nope": [1, 2]}}}),
        "methods.sft.sweep.nope",
        "cheap",
    ),
    (
        "sweep",
        "steps [1e30] unmatched",
        mut(allow_unmatched=True, methods={"sft": {"sweep": {"steps": [1e30]}}}),
        "methods.sft.sweep.steps.0",
        "cheap",
    ),
    (
        "sweep",
        "path in a sweep value",
        mut(methods={"grpo": {"sweep": {"loss_type": ["/../../../../outside/x"]}}}),
        "methods.grpo.sweep.loss_type.0",
        "cheap",
    ),
    # files and model sources
    (
        "missing file",
        "general-text file",
        mut(kl__general_text="/no/such/general.jsonl"),
        "kl.general_text",
        "cheap",
    ),
    (
        "missing file",
        "general-text not JSONL",
        lambda d: _with_file(d, "kl.general_text", "plain text\n"),
        "kl.general_text",
        "cheap",
    ),
    (
        "missing file",
        "questionnaire",
        mut(persona={"questionnaire": "/no/such/q.yaml"}),
        "persona.questionnaire",
        "cheap",
    ),
    (
        "missing file",
        "task data folder",
        mut(tasks=[{"name": "snark", "data": "no/such/folder"}]),
        "tasks.0.data",
        "cheap",
    ),
    (
        "missing file",
        "task data is a file",
        lambda d: _with_file(d, "tasks.0.data", "x\n"),
        "tasks.0.data",
        "cheap",
    ),
    ("missing file", "task data malformed", lambda d: _bad_data(d), "tasks.0.data", "cheap"),
    (
        "missing file",
        "results_dir is a file",
        lambda d: _with_file(d, "results_dir", "x\n"),
        "results_dir",
        "cheap",
    ),
    (
        "model source",
        "a file as model source",
        mut(model={"source": "/etc/hostname"}),
        "model.source",
        "cheap",
    ),
    ("model source", "a missing folder", mut(model={"source": "./no/such/model"}), "model.source", "cheap"),
    ("model source", "not a source", mut(model={"source": "not a model"}), "model.source", "cheap"),
    ("model source", "judge not a model", mut(persona={"judge": "gpt 4 please"}), "persona.judge", "cheap"),
    ("model source", "unknown bundled", mut(model={"source": "bundled:nope"}), "model.source", "cheap"),
    # consistency
    (
        "consistency",
        "checkpoints.steps [999]",
        mut(checkpoints={"steps": [999]}),
        "checkpoints.steps",
        "cheap",
    ),
    (
        "consistency",
        "humaneval without opt-in",
        mut(regression__suites=["humaneval"]),
        "regression.confirm_run_unsafe_code",
        "cheap",
    ),
    (
        "consistency",
        "grad_accum not dividing",
        mut(train__grad_accum=3, train__prompts_per_step=4),
        "train",
        "cheap",
    ),
    (
        "consistency",
        "persona without snark",
        mut(tasks=[{"name": "arithmetic"}], persona={}),
        "persona",
        "cheap",
    ),
    (
        "consistency",
        "primary on a missing method",
        mut(primary=[{"metric": "forgetting/mean", "task": "snark", "contrast": ["grpo", "sft"]}]),
        "primary.0.contrast",
        "cheap",
    ),
    (
        "consistency",
        "per-method steps without allow_unmatched",
        mut(methods={"sft": {"steps": 3}}),
        "methods.sft.steps",
        "cheap",
    ),
    # need TRL or the model (slower phase, only after the cheap checks pass)
    (
        "TRL option",
        "unknown trl field",
        mut(methods={"sft": {"trl": {"no_such_option": 1}}}),
        "methods.sft",
        "full",
    ),
    (
        "TRL option",
        "bogus optimizer",
        mut(methods={"sft": {"trl": {"optim": "bogus"}}}),
        "methods.sft",
        "full",
    ),
    (
        "TRL option",
        "bogus scheduler",
        mut(methods={"dpo": {"trl": {"lr_scheduler_type": "nope"}}}),
        "methods.dpo",
        "full",
    ),
    (
        "lora targets",
        "modules the model lacks",
        mut(train__lora={"target_modules": ["q_proj", "nope_proj"]}),
        "train.lora.target_modules",
        "full",
    ),
    (
        "lora targets",
        "a container, not a layer",
        mut(train__lora={"target_modules": ["mlp"]}),
        "train.lora.target_modules",
        "full",
    ),
]


def _symlink(d: Path) -> Path:
    (d / "link.yaml").symlink_to(d / "gone.yaml")
    return d / "link.yaml"


def _with_file(d: Path, field: str, text: str) -> Path:
    (d / "afile").write_text(text)
    return _write(
        d, _set(GOOD, field, str(d / "afile")) if "." in field else {**GOOD, field: str(d / "afile")}
    )


def _bad_data(d: Path) -> Path:
    (d / "data").mkdir()
    (d / "data" / "music.jsonl").write_text('{"id": 1}\n[1, 2]\n')
    return _write(d, mut(tasks=[{"name": "snark", "data": str(d / "data")}]))


def _write(d: Path, body) -> Path:
    path = d / "proto.yaml"
    if isinstance(body, dict):
        body = {"results_dir": str(d / "results"), **body}
        path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    elif isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body)
    return path


def validate(path: Path):
    """`study validate PATH` in process: (exit code, output, seconds, exception other than SystemExit)."""
    t = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", str(path)])
    seconds = time.perf_counter() - t
    crash = result.exception if not isinstance(result.exception, SystemExit | type(None)) else None
    return result.exit_code, result.output, seconds, crash


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Import TRL, torch and the tiny model once, so that a case's time is its own checks."""
    import study.train  # noqa: F401
    from study.models import tiny_model

    tiny_model()


def test_good_protocol_validates(tmp_path):
    code, out, _, crash = validate(_write(tmp_path, GOOD))
    assert crash is None and code == 0, out


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_malformed_protocol_gets_one_clear_line(tmp_path, case):
    _, _, content, field, phase = case
    path = content(tmp_path) if callable(content) else _write(tmp_path, content)
    code, out, seconds, crash = validate(path)
    assert crash is None, f"traceback: {crash!r}"
    assert "Traceback" not in out
    assert code == 2, out
    lines = [ln.strip() for ln in out.splitlines()[1:] if ln.strip()]
    assert lines and all(ln.startswith(f"{path}: ") for ln in lines), out  # every line names the file
    hit = [ln for ln in lines if field in ln]
    assert hit, f"no line names {field!r}:\n{out}"
    assert len(hit[0]) > len(f"{path}: {field}") + 15, hit[0]  # says what is wrong and what to do
    limit = 1.0 if phase == "cheap" else 20.0
    assert seconds < limit, f"{seconds:.2f} s"


def test_table_summary(tmp_path_factory, capsys):
    """The table for the issue's note: class, example, first answer line, exit code, seconds."""
    rows = []
    for cls, name, content, _, _ in CASES:
        d = tmp_path_factory.mktemp("c")
        path = content(d) if callable(content) else _write(d, content)
        code, out, seconds, crash = validate(path)
        first = next((ln.strip().removeprefix(f"{path}: ") for ln in out.splitlines()[1:] if ln.strip()), "")
        rows.append((cls, name, first if crash is None else f"CRASH {crash!r}", code, seconds))
    with capsys.disabled():
        print(f"\n{len(rows)} malformed protocols")
        for cls, name, first, code, seconds in rows:
            print(f"| {cls} | {name} | {first[:150]} | {code} | {seconds:.2f} |")
    assert all(code == 2 for *_, code, _ in rows)


def test_cli_subprocess_answers_in_well_under_a_second(tmp_path):
    """The whole `python -m study.cli validate` process for a cheap problem (imports included)."""
    import subprocess
    import sys

    path = _write(tmp_path, mut(seeds=[0, 0]))
    best = min(
        _timed(
            subprocess.run,
            [sys.executable, "-m", "study.cli", "validate", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    )
    assert best < 3.0  # process start and imports on a shared 2-core machine; the checks themselves < 0.1 s


def _timed(fn, *a, **k) -> float:
    t = time.perf_counter()
    out = fn(*a, **k)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    return time.perf_counter() - t


def test_arithmetic_capacity_is_what_the_task_can_draw():
    """The schema's bound is the task's real number of distinct problems: at capacity both accept and the task
    draws every problem; one more, both refuse (the schema at validation, the task at once)."""
    from pydantic import ValidationError

    from study.config import TaskSpec
    from study.tasks import arithmetic

    ranges = {"add": (1, 6), "sub": (1, 5), "mul": (2, 7)}
    cap = sum(arithmetic.capacity(op, *r) for op, r in ranges.items())
    # equal shares per operation: ask for 3 x the smallest space, which every operation can hold
    n = 3 * min(arithmetic.capacity(op, *r) for op, r in ranges.items())
    spec = TaskSpec(
        name="arithmetic",
        n_train=n - 5,
        n_heldout=5,
        add_range=ranges["add"],
        sub_range=ranges["sub"],
        mul_range=ranges["mul"],
    )
    train, held = arithmetic.problems(n - 5, 5, ranges=ranges)
    assert spec and len({(p.a, p.domain, p.b) for p in train + held}) == n <= cap
    with pytest.raises(ValidationError, match="n_train"):
        TaskSpec(
            name="arithmetic",
            n_train=n - 4,
            n_heldout=5,
            add_range=ranges["add"],
            sub_range=ranges["sub"],
            mul_range=ranges["mul"],
        )
    with pytest.raises(ValueError):
        arithmetic.problems(n - 4, 5, ranges=ranges)


def test_loss_type_choices_match_the_installed_trl():
    """The schema's loss lists are what TRL's trainers implement (TRL's configs accept any string)."""
    import inspect
    import typing

    from trl import DPOTrainer, GRPOTrainer, KTOConfig

    from study.config.methods import DPOLoss, GRPOLoss, KTOOptions

    dpo_src = inspect.getsource(DPOTrainer)
    listed = re.search(r"Unknown loss type: \{loss_type\}\. Should be one of (\[.*?\])", dpo_src, re.S).group(
        1
    )
    assert set(typing.get_args(DPOLoss)) == set(re.findall(r"'(\w+)'", listed))
    grpo_src = inspect.getsource(GRPOTrainer)
    for loss in typing.get_args(GRPOLoss):
        assert f'"{loss}"' in grpo_src
    import dataclasses

    kto = {f.name: f for f in dataclasses.fields(KTOConfig)}["loss_type"].metadata["choices"]
    assert set(typing.get_args(KTOOptions.model_fields["loss_type"].annotation)) == set(kto)


# ------------------------------------------------------------------------------------------ property test

SHIPPED = {p.name: yaml.safe_load(p.read_text()) for p in sorted((REPO / "protocols").glob("*.yaml"))}
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "auto", "sft", "snark", "../../x", "1e30", "all-linear", "cuda:0"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw):
    body = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        *parents, last = path
        node = body
        for p in parents:
            node = node[p]
        action = draw(st.sampled_from(["drop", "replace", "insert"]))
        if action == "drop":
            node.pop(last)
        elif action == "replace":
            node[last] = draw(VALUES)
        elif isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
        else:
            node.insert(draw(st.integers(0, len(node))), draw(VALUES))
    return body


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=mutated())
def test_mutated_shipped_protocols_never_crash_and_accepted_ones_plan(tmp_path_factory, body):
    from study.config import ProtocolError, load_protocol
    from study.plan import plan_rows

    d = tmp_path_factory.mktemp("fuzz")
    path = d / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump({"results_dir": str(d / "results"), **body}, allow_unicode=True))
    except yaml.YAMLError:
        return
    try:
        proto = load_protocol(path)
    except ProtocolError as e:
        assert e.problems and all(isinstance(p, str) and "\n" not in p for p in e.problems)
        event("rejected")
        return
    event("accepted")
    assert plan_rows(proto)  # every accepted protocol plans


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=mutated())
def test_mutated_protocols_through_the_cli(tmp_path_factory, body):
    """The same mutations through `study validate` and `study plan` themselves: exit 0 or 2, no traceback,
    and every protocol validate accepts plans."""
    d = tmp_path_factory.mktemp("cli")
    path = d / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump({"results_dir": str(d / "results"), **body}, allow_unicode=True))
    except yaml.YAMLError:
        return
    code, out, _, crash = validate(path)
    assert crash is None and code in (0, 2) and "Traceback" not in out, out
    if code == 0:
        result = CliRunner().invoke(app, ["plan", str(path)])
        assert result.exit_code == 0 and result.exception is None, result.output
