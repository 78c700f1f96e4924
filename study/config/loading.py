"""Reading a protocol file: every way a file can be wrong (unreadable, not UTF-8, not YAML, an alias bomb,
keys given twice, non-finite numbers, schema errors) becomes one line naming the field path and the fix.

    from study.config import load_protocol, ProtocolError
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from study.config.base import hint
from study.config.methods import OPTIONS, Method
from study.config.protocol import Protocol

MAX_FILE_BYTES = 1_000_000  # a protocol is a page of YAML; anything larger is a mistake or an attack
MAX_YAML_ALIASES = 100  # aliases expand at load: a handful is useful, thousands is a billion-laughs bomb
MAX_YAML_NODES = 100_000  # values after expanding aliases: 9 aliases of 9 nest to 9**9 with only 81 aliases
MAX_YAML_DEPTH = 32  # the schema is 5 levels deep; pass-through `trl:` values need a few more


class ProtocolError(ValueError):
    """A protocol file is unreadable or invalid; `problems` holds one line per problem."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, [" ".join(str(p).splitlines()) for p in problems]  # one line each
        super().__init__(f"{path}: " + "; ".join(problems))


RENAMED = {
    ("train", "batch_size"): "renamed to train.prompts_per_step (prompts per optimizer step; GRPO's "
    "completions per step = prompts_per_step × num_generations)"
}


def _dotted(path) -> str:
    """A field path as one printable line: odd keys (empty, control characters, very long) are quoted."""

    def part(p) -> str:
        p = str(p)
        return p if p and p.isprintable() and " " not in p and len(p) <= 40 else repr(p[:40])

    return ".".join(part(p) for p in path) or "(top level)"


def _fix_hint(loc: tuple, msg: str, err_type: str, value: Any = None) -> str:
    parts = [str(p) for p in loc]
    if msg.startswith("@"):  # a validator naming a path below its field (`sweep.<key>.<i>`)
        sub, msg = msg[1:].split(": ", 1)
        parts += sub.split(".")
    field = _dotted(parts)
    if tuple(parts[-2:]) in RENAMED and err_type == "extra_forbidden":
        return f"{field}: {RENAMED[tuple(parts[-2:])]}"
    if err_type == "extra_forbidden" and parts[:1] == ["methods"] and len(parts) == 2:
        return f"{field}: unknown method; use one of {', '.join(Method)}"
    if (
        err_type == "extra_forbidden"
        and parts[:1] == ["methods"]
        and len(parts) == 3
        and parts[1] in set(Method)
    ):
        own = sorted(OPTIONS[Method(parts[1])].model_fields)
        return (
            f"{field}: not an option of {parts[1]} (its options: {', '.join(own)}; any other TRL field "
            f"goes under methods.{parts[1]}.trl)"
        )
    if err_type == "extra_forbidden":
        return f"{field}: unknown field; remove it or check its spelling"
    return f"{field}: {hint(msg, err_type, value)}"


def _walk(node: yaml.Node, path: tuple, depth: int, memo: dict, busy: set, problems: list[str]) -> int:
    """Expanded size of a composed YAML node (aliases counted as often as they are used), refusing
    self-referencing aliases, nesting deeper than MAX_YAML_DEPTH and keys given twice in one mapping."""
    where = _dotted(path)
    if depth > MAX_YAML_DEPTH:
        raise _TooBig(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep; a protocol is a few levels")
    if id(node) in memo:
        size, height = memo[id(node)]
        if depth + height > MAX_YAML_DEPTH:
            raise _TooBig(
                f"{where}: nested more than {MAX_YAML_DEPTH} levels deep; a protocol is a few levels"
            )
        return size
    if id(node) in busy:
        raise _TooBig(f"{where}: an alias refers to itself (a recursive structure); write the value out")
    busy.add(id(node))
    size, height = 1, 0
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            size += _walk(child, (*path, i), depth + 1, memo, busy, problems)
            height = max(height, memo[id(child)][1] + 1)
    elif isinstance(node, yaml.MappingNode):
        seen = set()
        for key, child in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if name in seen:
                    problems.append(
                        f"{_dotted((*path, name))}: given twice in one mapping (YAML "
                        f"would silently keep the last); keep one"
                    )
                seen.add(name)
            size += _walk(key, (*path, name), depth + 1, memo, busy, problems)
            size += _walk(child, (*path, name), depth + 1, memo, busy, problems)
            height = max(height, memo[id(child)][1] + 1, memo[id(key)][1] + 1)
    busy.discard(id(node))
    memo[id(node)] = (size, height)
    if size > MAX_YAML_NODES:
        raise _TooBig(
            f"{where}: expands to more than {MAX_YAML_NODES} values (nested aliases?); a protocol "
            f"is a page of YAML: write the values out"
        )
    return size


class _TooBig(Exception):
    pass


def _non_finite(obj: Any, path: tuple = ()) -> list[str]:
    """Every NaN or infinity in the file, wherever it is (pass-through `trl:` and `sweep:` values too)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{_dotted(path)}: {obj} is not a finite number; use a finite value"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, (*path, k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, (*path, i))]
    return []


def _read_yaml(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ProtocolError(
            path,
            [f"file is {size} bytes; a protocol is at most {MAX_FILE_BYTES}: give the protocol YAML file"],
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(
            path, [f"not UTF-8 text (byte {e.start}): save the protocol as UTF-8 YAML"]
        ) from None
    except OSError as e:
        raise ProtocolError(path, [f"cannot read the file ({e.strerror}): check its permissions"]) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        aliases = sum(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text, Loader=loader))
        if aliases > MAX_YAML_ALIASES:
            raise ProtocolError(
                path,
                [
                    f"{aliases} YAML aliases (more than {MAX_YAML_ALIASES}): write the values "
                    f"out instead of nesting aliases"
                ],
            )
        node = yaml.compose(text, Loader=loader)
        problems: list[str] = []
        if node is not None:
            _walk(node, (), 0, {}, set(), problems)
        if problems:
            raise ProtocolError(path, problems)
        raw = yaml.load(text, Loader=loader)
    except _TooBig as e:
        raise ProtocolError(path, [str(e)]) from None
    except yaml.YAMLError as e:
        raise ProtocolError(path, [f"not valid YAML: {' '.join(str(e).split())}"]) from None
    except (RecursionError, MemoryError):
        raise ProtocolError(path, [f"YAML nested too deeply (more than {MAX_YAML_DEPTH} levels)"]) from None
    problems = _non_finite(raw)
    if problems:
        raise ProtocolError(path, problems)
    return raw


def load_protocol(path: str | Path) -> Protocol:
    """Read and validate a protocol file; raise ProtocolError with one line per problem."""
    path = Path(path)
    if path.is_dir():
        raise ProtocolError(
            path, ["is a folder: give the protocol's YAML file (e.g. protocols/default.yaml)"]
        )
    if not path.is_file():
        raise ProtocolError(path, [f"file not found: {path}; check the path"])
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError(path, ["the file must be a mapping of fields (name, model, tasks, methods, ...)"])
    tasks, methods = raw.get("tasks"), raw.get("methods")
    if tasks is not None and not isinstance(tasks, list):
        raise ProtocolError(path, ["tasks: must be a list, e.g. `tasks: [{name: snark}]`"])
    if methods is not None and not isinstance(methods, dict):
        raise ProtocolError(
            path, ["methods: must be a mapping of method name to options, e.g. `methods: {sft: }`"]
        )
    for task in tasks or []:  # relative data paths are relative to the protocol file
        if isinstance(task, dict) and isinstance(task.get("data"), str):
            task["data"] = str((path.parent / task["data"]).resolve())
    if isinstance(raw.get("results_dir"), str):
        raw["results_dir"] = str((path.parent / raw["results_dir"]).resolve())
    for name, spec in (methods or {}).items():  # an empty block (`sft:`) means "the shared budget"
        if spec is None:
            methods[name] = {}
    try:
        return Protocol.model_validate(raw)
    except ValidationError as e:
        lines = [
            _fix_hint(err["loc"], err["msg"].removeprefix("Value error, "), err["type"], err.get("input"))
            for err in e.errors()
        ]
        raise ProtocolError(path, list(dict.fromkeys(lines))) from None
