"""The protocol: one YAML file names the base model, the tasks, the four methods at a matched budget, the
seeds, the sweeps and what to measure. Validated by the pydantic models below; every field documents itself.

    study validate protocols/default.yaml
"""

from __future__ import annotations

import hashlib
import itertools
import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from study.measure.kl import KLEval
from study.measure.persona import PersonaEval  # imports only pydantic, numpy, yaml: no import cycle
from study.measure.regression import RegressionEval  # imports only pydantic: no import cycle

SCHEMA_VERSION = 1  # bump when a change to training makes old cells incomparable


class Method(str, Enum):
    """The four ways of shaping behaviour; properties say what each one needs."""

    sft = "sft"
    dpo = "dpo"
    kto = "kto"
    grpo = "grpo"

    @property
    def needs_reference_model(self) -> bool:
        return self is not Method.sft

    @property
    def needs_pairs(self) -> bool:
        return self is Method.dpo

    @property
    def needs_reward(self) -> bool:
        return self is Method.grpo

    @property
    def generates_online(self) -> bool:
        return self is Method.grpo


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    source: str = "bundled:smollm2-135m-instruct"
    """Hub id (org/name), a local directory, `bundled:smollm2-135m-instruct`, or `tiny-random` (tests)."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bf16 on a CUDA GPU that supports it, else fp32."""
    params_b: float | None = None
    """Parameter count in billions, for `study plan`'s memory estimate (read from the model when absent)."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        from study.models import check_source

        problem = check_source(v)
        if problem:
            raise ValueError(problem)
        return v


class TaskSpec(Strict):
    name: Literal["snark", "arithmetic"]
    """`snark` (the persona task) or `arithmetic` (the verifiable task)."""
    data: Path | None = None
    """snark only: a folder of `<domain>.jsonl` files replacing the bundled dataset."""
    heldout_domains: list[str] | None = None
    """Domains kept out of training entirely (default: the task's documented held-out domains)."""
    n_train: int = Field(1000, gt=0)
    """arithmetic only: number of generated training problems."""
    n_heldout: int = Field(100, gt=0)
    """arithmetic only: number of generated held-out problems (disjoint from training)."""
    system_prompt: str | None = None
    """An optional system message put before every prompt, in training and evaluation alike."""

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"data folder {str(v)!r} does not exist: point it at a folder of <domain>.jsonl files")
        return v


class LoraSpec(Strict):
    r: int = Field(8, gt=0)
    """LoRA rank, shared by every method."""
    alpha: int = Field(16, gt=0)
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainSpec(Strict):
    """The matched budget: every method trains with these unless its own block overrides a field."""

    steps: int = Field(30, gt=0)
    """Optimizer steps per cell."""
    batch_size: int = Field(4, gt=0)
    """Sequences per optimizer step (for GRPO: completions, i.e. batch_size / num_generations prompts)."""
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(128, gt=8)
    """Max tokens of prompt + answer."""
    max_completion_length: int = Field(48, gt=0)
    """Max new tokens GRPO samples per completion."""
    learning_rate: float = Field(5e-4, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    gradient_checkpointing: bool = False
    """Trade compute for memory (worth it for billions of parameters on a GPU, not for 135M on a CPU)."""
    checkpoint_every: int = Field(10, gt=0)
    """Save an adapter checkpoint every k steps (kept for emergence trajectories and for resuming)."""
    lora: LoraSpec = LoraSpec()


class MethodSpec(Strict):
    """Per-method options; any TrainSpec field given here overrides the shared budget for this method."""

    beta: float | None = Field(None, ge=0)
    """DPO/KTO: preference temperature; GRPO: KL coefficient (0 disables the reference model)."""
    num_generations: int | None = Field(None, gt=1)
    """GRPO: completions sampled per prompt (a group)."""
    temperature: float | None = Field(None, gt=0)
    """GRPO: sampling temperature."""
    loss_type: str | None = None
    """The TRL loss variant, passed through (e.g. DPO `sigmoid`, KTO `kto`, GRPO `dapo`)."""
    learning_rate: float | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    sweep: dict[str, list[Any]] = {}
    """Field -> values: one cell per combination (e.g. `learning_rate: [1e-5, 3e-5]`)."""

    @field_validator("sweep")
    @classmethod
    def _sweepable(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        allowed = set(MethodSpec.model_fields) | set(TrainSpec.model_fields)
        for key, values in v.items():
            if key not in allowed - {"sweep", "lora"}:
                raise ValueError(f"cannot sweep {key!r}: sweepable fields are {sorted(allowed - {'sweep', 'lora'})}")
            if not values:
                raise ValueError(f"sweep {key!r} has no values")
        return v


class NewTaskEval(Strict):
    max_new_tokens: int = Field(64, gt=0)
    """Tokens generated per held-out prompt (greedy)."""
    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0)
    """Score at most this many held-out prompts (None: all)."""


def _hellaswag_probe() -> RegressionEval:
    return RegressionEval(suites=["hellaswag"], limit={"hellaswag": 20})


class CheckpointEval(Strict):
    """Measurements at every saved intermediate checkpoint of every cell (protocol field `checkpoints:`): the
    trajectories from which emergence onsets are read. A checkpoint's rows carry its step in the `checkpoint`
    column of metrics.csv; the final adapter's rows carry the final step, the base's step 0."""

    stages: list[Literal["newtask", "kl", "regression", "persona"]] = ["newtask", "kl", "persona"]
    """Protocol stages re-run at each checkpoint, with the protocol's own settings except as below (a stage
    whose block is absent from the protocol is skipped). `regression` runs the full suites at checkpoints."""
    kl_metrics: list[Literal["kl/forward_newtask", "kl/reverse_newtask", "kl/forward_general"]] = [
        "kl/forward_newtask"]
    """KLs measured at checkpoints (same samples and estimator as the final adapter's)."""
    persona_retest: bool = False
    """Also run the persona stage's test-retest sampling at checkpoints (the indicators do not need it)."""
    probe: RegressionEval | None = Field(default_factory=_hellaswag_probe)
    """A cheap regression probe run on the base, every checkpoint and the final adapter (rows
    `emergence/<suite>/<metric>`): by default 20 HellaSwag items. null: none."""
    steps: list[int] | None = None
    """Only these checkpoint steps (None: every saved checkpoint before the final step)."""
    min_effect: dict[str, float] = {}
    """Minimum effect per tracked metric for an emergence onset (study.stats.onsets): the paired per-prompt
    difference from the reference must exceed it, e.g. {persona/probe: 0.05}; absent metrics: 0."""


class Protocol(Strict):
    name: str | None = None
    """Shown in reports; the results folder is named after the protocol file's stem."""
    description: str = ""
    model: ModelSpec = ModelSpec()
    tasks: list[TaskSpec]
    train: TrainSpec = TrainSpec()
    methods: dict[Method, MethodSpec]
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    newtask: NewTaskEval = NewTaskEval()
    kl: KLEval = KLEval()
    """KL drift of each adapter from the base: forward/reverse on held-out prompts, forward on general text."""
    regression: RegressionEval = Field(default_factory=RegressionEval)
    """lm-eval regression suites (MMLU, HellaSwag, TruthfulQA MC2, HumanEval) on the base and every adapter."""
    persona: PersonaEval | None = None
    """Persona coherence (snark only; measured when this block is present): marker rate, embedding probe (and
    masked), self-report, activation projection, optional judge, coherence statistics (`coherence/*`)."""
    checkpoints: CheckpointEval | None = None
    """Measurements at intermediate checkpoints (emergence trajectories and onsets); absent: final only."""
    results_dir: Path | None = None
    """Where run folders go (default: `results/` next to the protocols folder)."""

    @model_validator(mode="after")
    def _grpo_groups_fit(self) -> Protocol:
        spec = self.methods.get(Method.grpo)
        if spec is not None:
            gens = spec.num_generations or 4
            if (self.train.batch_size * self.train.grad_accum) % gens:
                raise ValueError(
                    f"methods.grpo.num_generations={gens} must divide train.batch_size*grad_accum="
                    f"{self.train.batch_size * self.train.grad_accum}"
                )
        return self

    def cells(self) -> list[Cell]:
        """Every (task, method, sweep point, seed) cell with its fully resolved config."""
        out = []
        for task in self.tasks:
            for method, spec in self.methods.items():
                keys = sorted(spec.sweep)
                for point in itertools.product(*(spec.sweep[k] for k in keys)):
                    sweep = dict(zip(keys, point))
                    for seed in self.seeds:
                        out.append(Cell.resolve(self, task, method, spec, sweep, seed))
        return out


class Cell(Strict):
    """One training run: everything that determines its adapter, and nothing else (so it hashes stably)."""

    schema_version: int = SCHEMA_VERSION
    model: str
    dtype: str
    task: TaskSpec
    method: Method
    seed: int
    sweep: dict[str, Any]
    train: TrainSpec
    options: dict[str, Any]

    @classmethod
    def resolve(cls, proto: Protocol, task: TaskSpec, method: Method, spec: MethodSpec, sweep: dict, seed: int):
        overrides = spec.model_dump(exclude={"sweep"}, exclude_none=True) | sweep
        train_fields = set(TrainSpec.model_fields)
        train = proto.train.model_copy(update={k: v for k, v in overrides.items() if k in train_fields})
        options = {k: v for k, v in overrides.items() if k not in train_fields}
        return cls(
            model=proto.model.source,
            dtype=proto.model.dtype,
            task=task,
            method=method,
            seed=seed,
            sweep=sweep,
            train=TrainSpec.model_validate(train.model_dump()),
            options=options,
        )

    @property
    def key(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        sweep = "".join(f"-{k}{v}" for k, v in sorted(self.sweep.items()))
        return f"{self.task.name}-{self.method.value}{sweep}-s{self.seed}-{self.key}"


# ------------------------------------------------------------------------------------------------ loading


class ProtocolError(ValueError):
    """A protocol file is unreadable or invalid; `problems` holds one line per problem."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: " + "; ".join(problems))


def _fix_hint(loc: tuple, msg: str, err_type: str) -> str:
    field = ".".join(str(p) for p in loc) or "(top level)"
    if err_type == "extra_forbidden":
        return f"{field}: unknown field; remove it or check its spelling"
    if err_type == "enum" and "methods" in [str(p) for p in loc]:
        return f"{field}: unknown method; use one of sft, dpo, kto, grpo"
    if err_type in ("greater_than_equal", "greater_than"):
        return f"{field}: {msg}; use a larger value"
    if err_type == "missing":
        return f"{field}: required field is missing; add it"
    return f"{field}: {msg}"


def load_protocol(path: str | Path) -> Protocol:
    """Read and validate a protocol file; raise ProtocolError with one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(path, [f"file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProtocolError(path, [f"not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ProtocolError(path, ["the file must be a mapping of fields (name, model, tasks, methods, ...)"])
    # Relative data paths are relative to the protocol file.
    for task in raw.get("tasks") or []:
        if isinstance(task, dict) and task.get("data"):
            task["data"] = str((path.parent / task["data"]).resolve())
    if raw.get("results_dir"):
        raw["results_dir"] = str((path.parent / raw["results_dir"]).resolve())
    # An empty method block (`sft:`) means "the shared budget, nothing different".
    for name, spec in (raw.get("methods") or {}).items():
        if spec is None:
            raw["methods"][name] = {}
    try:
        return Protocol.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(_fix_hint(err["loc"], msg, err["type"]))
        raise ProtocolError(path, lines) from None
