"""The architecture's rules, tested: one schema module that imports nothing else from the package, no
import cycle, report/metrics/stats torch-free, train and measure independent, nothing importing the runner
or the CLI, and every config field documented."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.conftest import REPO

PACKAGE = REPO / "study"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules of `study` imported by a file (resolved to the most specific existing module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("study")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("study"):
            out.add(node.module)
            out |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()
            }
    return out


FILES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def test_config_imports_nothing_else_from_study():
    for name, path in FILES.items():
        if name.startswith("study.config"):
            bad = {m for m in _imports(path) if not m.startswith("study.config")}
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycle_at_module_level():
    graph = {
        n: {m for m in _imports(p, top_level_only=True) if m in FILES and m != n} for n, p in FILES.items()
    }
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(m) :], m]))
            if not state.get(m):
                visit(m, [*stack, m])
        state[n] = 2

    for n in graph:
        if not state.get(n):
            visit(n, [n])


@pytest.mark.parametrize("rule", ["train-measure", "runner-cli"])
def test_layering(rule):
    for name, path in FILES.items():
        imported = _imports(path)
        if rule == "train-measure":
            if name.startswith("study.measure"):
                assert not {m for m in imported if m.startswith("study.train")}, name
            if name.startswith("study.train"):
                assert not {m for m in imported if m.startswith("study.measure")}, name
        else:
            if name not in ("study.cli", "study.runner", "study.executor"):
                assert not {m for m in imported if m in ("study.runner", "study.cli")}, (
                    f"{name} imports runner/cli"
                )


def test_metrics_and_report_import_no_torch():
    code = (
        "import sys; import study.metrics, study.report, study.report.data; "
        "print('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def _models():
    import study.config as config
    import study.config.methods as methods
    import study.config.protocol as protocol
    import study.config.stages as stages

    seen = []
    for mod in (config, methods, protocol, stages):
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseModel)
                and obj.__module__.startswith("study.config")
            ):
                if obj not in seen:
                    seen.append(obj)
    return seen


def test_every_config_field_has_a_docstring():
    missing = [
        f"{m.__name__}.{name}"
        for m in _models()
        for name, f in m.model_fields.items()
        if not (f.description or "").strip()
        and name
        not in (
            "schema_version",
            "model",
            "revision",
            "dtype",
            "task",
            "method",
            "seed",
            "sweep",
            "train",
            "options",
        )
    ]  # Cell: a record of resolved fields, documented as a whole
    assert not missing, f"fields without a docstring: {missing}"


def test_the_doc_test_can_fail():
    """The docstring test reads pydantic's descriptions: a field without one is caught."""
    from study.config import Strict

    class Undocumented(Strict):
        x: int = 1

    assert not Undocumented.model_fields["x"].description


def _statements(path: Path) -> int:
    """Logical lines of code (tokenize's NEWLINE tokens): what a reader has to read. `ruff format` puts one
    argument per physical line where a call does not fit, which says nothing about a module's size."""
    import tokenize

    with open(path, "rb") as f:
        return sum(1 for t in tokenize.tokenize(f.readline) if t.type == tokenize.NEWLINE)


def test_no_module_is_long():
    long = {n: _statements(p) for n, p in FILES.items() if _statements(p) > 400}
    assert not long, f"modules over 400 logical lines: {long}"
