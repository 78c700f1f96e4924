"""The schema of the study: the protocol and every stage's settings. Imports nothing else from `study`, so
any module (train, measure, report, cli) can read it without pulling in models or torch."""

from study.config.base import BUNDLED, BUNDLED_PREFIX, TINY, Strict, check_source, source_kind
from study.config.loading import ProtocolError, load_protocol
from study.config.methods import OPTIONS, Method, MethodOptions, rows_per_prompt, trl_options
from study.config.protocol import (
    SCHEMA_VERSION,
    Cell,
    LoraSpec,
    ModelSpec,
    Primary,
    Protocol,
    TaskSpec,
    TrainSpec,
)
from study.config.stages import (
    KL_METRICS,
    PERSONA_PROMPT,
    SUITES,
    CheckpointEval,
    KLEval,
    NewTaskEval,
    PersonaEval,
    RegressionEval,
)

__all__ = [
    "BUNDLED",
    "BUNDLED_PREFIX",
    "KL_METRICS",
    "OPTIONS",
    "PERSONA_PROMPT",
    "SCHEMA_VERSION",
    "SUITES",
    "TINY",
    "Cell",
    "CheckpointEval",
    "KLEval",
    "LoraSpec",
    "Method",
    "MethodOptions",
    "ModelSpec",
    "NewTaskEval",
    "PersonaEval",
    "Primary",
    "Protocol",
    "ProtocolError",
    "RegressionEval",
    "Strict",
    "TaskSpec",
    "TrainSpec",
    "check_source",
    "load_protocol",
    "rows_per_prompt",
    "source_kind",
    "trl_options",
]
