"""The protocol: one YAML file names the base model, the tasks, the methods at a matched budget, the
seeds, the sweeps, the primary outcomes and what to measure. Every field documents itself.

    study validate protocols/default.yaml
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from study.config.base import Strict, check_source
from study.config.methods import OPTIONS, Method, MethodOptions, rows_per_prompt
from study.config.stages import CheckpointEval, KLEval, NewTaskEval, PersonaEval, RegressionEval

SCHEMA_VERSION = 2  # bump when a change to training makes old cells incomparable (2: prompts_per_step)
# Distinct arithmetic problems: operations are drawn in turn and `mul` has only 29 x 29 operand pairs
# (study.tasks.arithmetic._draw), so more problems than 3 x 841 can never be drawn (tests check the number).
MAX_CELLS = 100_000  # tasks x methods x sweep points x seeds; more is a typo (and would not fit in memory)


class ModelSpec(Strict):
    source: str = "bundled:smollm2-135m-instruct"
    """Hub id (org/name), a local directory, `bundled:smollm2-135m-instruct`, or `tiny-random` (tests)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub model; recorded with every cell. None: the default."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bf16 on a CUDA GPU that supports it, else fp32."""
    params_b: float | None = Field(None, gt=0, le=10_000)
    """Parameter count in billions, for `study plan`'s memory estimate (read from the model when absent)."""
    engine: Literal["hf", "vllm"] = "hf"
    """Inference engine of the measurement stages: `hf` (transformers; everywhere) or `vllm` (a CUDA GPU and
    the gpu extra, `make install-gpu`): lm-eval's `vllm` model for the regression suites with the
    adapter as `lora_local_path`, and vLLM sampling for the newtask and persona answers and KL's samples.
    KL's exact scoring, the persona probe's hidden states and its steering stay in transformers (they need
    the full distribution or the activations). Not yet run on a GPU in this project (README, GPU paths)."""
    vllm_gpu_memory_utilization: float = Field(0.4, gt=0, lt=1)
    """engine vllm: share of GPU memory each vLLM engine may take (the transformers copy of the model that
    scores and trains shares the GPU with it)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """engine vllm: GPUs each vLLM engine shards the model over."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        problem = check_source(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?|mps", v):
            raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda, cuda:N or mps")
        return v


class TaskSpec(Strict):
    name: Literal["snark", "arithmetic"]
    """`snark` (the persona task) or `arithmetic` (the verifiable task)."""
    data: Path | None = None
    """snark only: a folder of `<domain>.jsonl` files replacing the bundled dataset."""
    heldout_domains: list[str] | None = None
    """Domains kept out of training entirely (default: the task's documented held-out domains)."""
    n_train: int = Field(1000, gt=0, le=1_000_000)
    """arithmetic only: number of generated training problems."""
    n_heldout: int = Field(100, gt=0, le=100_000)
    """arithmetic only: number of generated held-out problems (disjoint from training, commuted twins too)."""
    ops: list[Literal["add", "sub", "mul"]] = Field(
        default_factory=lambda: ["add", "sub", "mul"], min_length=1
    )
    """arithmetic only: the operations (domains), dealt round-robin."""
    add_range: tuple[int, int] = (1, 30)
    """arithmetic only: inclusive range of both operands of `+` (sets the difficulty: the bundled model's
    held-out exact match is 0.26 [0.21, 0.31] at the defaults; tasks/arithmetic.py)."""
    sub_range: tuple[int, int] = (1, 20)
    """arithmetic only: inclusive range of both operands of `-`."""
    mul_range: tuple[int, int] = (2, 28)
    """arithmetic only: inclusive range of both operands of `*`."""
    system_prompt: str | None = None
    """An optional system message put before every prompt, in training and evaluation alike."""
    methods: list[Method] | None = None
    """The protocol's methods trained on this task (default: all of them); e.g. no control arm on a track
    whose question does not read against one. Not part of a cell's key (it does not change the adapter)."""
    stages: list[Literal["newtask", "kl", "regression", "persona", "probe"]] | None = None
    """The protocol's measurement stages run on this task's base and cells, at the final step and at
    checkpoints (default: all of them). The default study measures forgetting (`regression`) on the
    arithmetic track only, where RL's Razor asks its question. Not part of a cell's key."""
    sweeps: bool = True
    """Train the methods' sweeps (`methods.<m>.sweep`) on this task; `false`: one point per method, at its own
    `learning_rate` (else `train.learning_rate`). The default study sweeps the arithmetic track, whose
    matched-success comparison needs each method's frontier, and not the snark track, whose contrast (GRPO vs
    the control) is read at the shared budget. Not part of a cell's key."""
    checkpoint_stages: list[Literal["newtask", "kl", "regression", "persona"]] | None = None
    """The stages re-run at this task's intermediate checkpoints, a subset of `checkpoints.stages` (default: all
    of those the task measures). The default study's snark track leaves newtask out (its persona stage generates
    the answers it reads). Not part of a cell's key."""

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: Path | None) -> Path | None:
        if v is not None and Path(v).is_file():
            raise ValueError(f"data {str(v)!r} is a file: point it at a folder of <domain>.jsonl files")
        if v is not None and not Path(v).is_dir():
            raise ValueError(
                f"data folder {str(v)!r} does not exist: point it at a folder of <domain>.jsonl files"
            )
        return v

    @field_validator("add_range", "sub_range", "mul_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] <= v[1] <= 1_000_000:
            raise ValueError(f"{list(v)}: give [low, high] with 0 <= low <= high <= 1000000")
        return v

    @field_validator("heldout_domains")
    @classmethod
    def _domains(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(
                "list each held-out domain once, at least one (or remove the field for the default)"
            )
        return v

    @model_validator(mode="after")
    def _arithmetic_fits(self) -> TaskSpec:
        """Each operation's share of the problems must fit its operand space (distinct up to commutation);
        the same rule as study.tasks.arithmetic.check_sizes, here so that `study validate` says it at once."""
        if self.name != "arithmetic":
            return self
        total = self.n_train + self.n_heldout
        for i, op in enumerate(self.ops):
            lo, hi = getattr(self, f"{op}_range")
            m = hi - lo + 1
            room = m * (m + 1) // 2 if op in ("add", "mul") else m * m
            need = total // len(self.ops) + (i < total % len(self.ops))
            if need > room:
                raise ValueError(
                    f"@n_train: {need} distinct {op} problems asked for, but operands in "
                    f"[{lo}, {hi}] give {room}; widen {op}_range or ask for fewer problems"
                )
        return self

    @model_validator(mode="after")
    def _own_fields(self) -> TaskSpec:
        """Fields of the other task are errors, not silently ignored."""
        other = {
            "snark": ("n_train", "n_heldout", "ops", "add_range", "sub_range", "mul_range"),
            "arithmetic": ("data", "heldout_domains"),
        }[self.name]
        for field in other:  # (compared with the default, so a dumped protocol.yaml loads again)
            default = type(self).model_fields[field].get_default(call_default_factory=True)
            if getattr(self, field) != default:
                raise ValueError(f"@{field}: not a field of the {self.name} task; remove it")
        return self


class LoraSpec(Strict):
    r: int = Field(8, gt=0, le=1024)
    """LoRA rank, shared by every method."""
    alpha: int = Field(16, gt=0, le=4096)
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names the model has (checked against the
    model's modules by `study validate` for tiny, bundled, local and cached hub models)."""

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or not all(v)):
            raise ValueError("list each module name once, at least one (or `all-linear`)")
        if isinstance(v, str) and not v:
            raise ValueError("empty: use `all-linear` or a list of module names")
        return v


class TrainSpec(Strict):
    """The matched budget: every method sees the same prompts per optimizer step, steps, max length and
    LoRA; TRL's per-device batch is derived per method (prompts × rows per prompt)."""

    steps: int = Field(30, gt=0, le=1_000_000)
    """Optimizer steps per cell."""
    prompts_per_step: int = Field(4, gt=0, le=4096)
    """Prompts per optimizer step, for every method: SFT/DPO/ORPO see that many rows, KTO twice as many
    (each prompt's desirable and undesirable answer), GRPO prompts × num_generations completions."""
    grad_accum: int = Field(1, gt=0, le=1024)
    """Gradient accumulation steps (prompts per step are split over them)."""
    max_length: int = Field(128, gt=8, le=131072)
    """Max tokens of prompt + answer."""
    max_completion_length: int = Field(48, gt=0, le=32768)
    """Max new tokens GRPO samples per completion."""
    learning_rate: float = Field(5e-4, gt=0, le=1)
    """Default learning rate (a method's own `learning_rate` or sweep overrides it)."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Fraction of steps with linear warm-up."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (worth it for billions of parameters on a GPU, not for 135M on a CPU)."""
    checkpoint_every: int = Field(10, gt=0, le=1_000_000)
    """Save an adapter checkpoint every k steps (kept for emergence trajectories and for resuming)."""
    max_grad_norm_abort: float = Field(1e4, gt=0, le=1e30)
    """Divergence guard: fail the cell (with the step) when a logged gradient norm (before clipping) exceeds
    this. A non-finite loss or gradient norm always fails it. Healthy LoRA runs stay below ~100."""
    max_weight_norm_abort: float = Field(1e4, gt=0, le=1e30)
    """Divergence guard: fail the cell when the LoRA update's size ||ΔW||_F (over all modules, as the metric
    `lora/delta_norm` reports it) exceeds this at a logging step, or is not finite. Healthy runs stay well
    below 100; a diverged one reaches 1e10."""
    lora: LoraSpec = LoraSpec()
    """The LoRA adapter, shared by every method."""

    @model_validator(mode="after")
    def _accum_divides(self) -> TrainSpec:
        if self.prompts_per_step % self.grad_accum:
            raise ValueError(
                f"@grad_accum: {self.grad_accum} must divide prompts_per_step={self.prompts_per_step}; "
                f"change one of them"
            )
        return self


class Primary(Strict):
    """A pre-declared primary outcome: Holm's correction runs across the primaries; everything else in the
    report is exploratory."""

    metric: str
    """A metric of metrics.csv (e.g. `forgetting/mean`, `persona/probe_masked`); `@matched` reads it at
    matched new-task success along each method's frontier (e.g. `forgetting/mean@matched`)."""
    task: str
    """The task whose cells it compares (`snark` or `arithmetic`)."""
    contrast: tuple[str, str]
    """Two methods of the protocol, a against b (e.g. `[grpo, sft]`, `[grpo, control]`)."""


class ExecutorSpec(Strict):
    """Where `study run` runs the cells (study.executor); `study run --executor/--partition/...` override it."""

    kind: Literal["local", "slurm"] = "local"
    """`local`: this machine; `slurm`: a base job, a job array over the cells, a report job (submitit)."""
    workers: int = Field(1, ge=1, le=64)
    """local, CPU: processes running cells at once, sharing the CPU threads (each gets threads / workers) and
    the cells (by their locks); the one started measures the bases and writes the report. The default study
    runs 2 on 2 cores: small-batch generation is bound by per-operation overhead, so two one-thread processes
    do more than one two-thread process (study.runner.Workers). `study run --workers N` overrides it."""
    partition: str | None = None
    """SLURM partition of every job (None: the cluster's default)."""
    gpus_per_cell: int = Field(0, ge=0, le=64)
    """GPUs per cell job (0: CPU jobs)."""
    time: str = "4:00:00"
    """Per job (minutes, H:MM:SS or D-HH:MM:SS); a cell past it is requeued and resumes."""
    array_parallelism: int = Field(16, gt=0, le=10_000)
    """Cells running at once in the job array."""
    cpus_per_cell: int | None = Field(None, gt=0, le=1024)
    """CPUs per cell job (None: SLURM's default)."""
    mem: str | None = None
    """Per job, sbatch syntax (e.g. `64G`)."""
    max_requeues: int = Field(3, ge=0, le=100)
    """How often a preempted or timed-out cell job is requeued."""
    extra: dict[str, Any] = {}
    """Further sbatch options, e.g. {account: proj, qos: high}."""
    num_processes: int | None = Field(None, ge=1, le=512)
    """Processes per cell (data-parallel training, one per GPU); None: gpus_per_cell. Above 1 a cell job runs
    `accelerate launch --num_processes N [--config_file F] -m study.cli run-cell PROTOCOL CELL`
    (study.gpu.accelerate_command): every process trains, process 0 measures. Not yet run on GPUs here."""
    accelerate_config: Path | None = None
    """An `accelerate config` YAML for multi-process cells (mixed precision, FSDP, DeepSpeed); None:
    accelerate's defaults and --num_processes."""

    @field_validator("accelerate_config")
    @classmethod
    def _config_file(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(
                f"{str(v)!r} is not a file: point it at a YAML written by `accelerate config`, or remove it"
            )
        return v

    @property
    def processes(self) -> int:
        """Processes per cell: num_processes, else one per GPU (at least one)."""
        return self.num_processes or max(self.gpus_per_cell, 1)


class _MethodsBase(Strict):
    """The methods of a protocol, each with its own options; read like a mapping Method -> options."""

    def items(self) -> list[tuple[Method, MethodOptions]]:
        return [(m, getattr(self, m.value)) for m in Method if getattr(self, m.value) is not None]

    def keys(self) -> list[Method]:
        return [m for m, _ in self.items()]

    def get(self, method: Method | str, default=None):
        return getattr(self, Method(method).value, None) or default

    def __getitem__(self, method: Method | str) -> MethodOptions:
        found = self.get(method)
        if found is None:
            raise KeyError(method)
        return found

    def __contains__(self, method: object) -> bool:
        return isinstance(method, str) and method in set(Method) and self.get(method) is not None

    def __len__(self) -> int:
        return len(self.items())

    def __iter__(self):  # iterate like a mapping: over the methods present (pydantic's iterates fields)
        return iter(self.keys())


Methods = create_model(
    "Methods",
    __base__=_MethodsBase,
    **{
        m.value: (OPTIONS[m] | None, Field(None, description=(OPTIONS[m].__doc__ or m.value).strip()))
        for m in Method
    },
)


class Protocol(Strict):
    name: str | None = None
    """Shown in reports; the results folder is named after the protocol file's stem."""
    description: str = ""
    """One line on what the protocol is for."""
    model: ModelSpec = ModelSpec()
    """The base model every method starts from."""
    tasks: list[TaskSpec] = Field(min_length=1)
    """The tasks (tracks): `snark` (persona) and/or `arithmetic` (verifiable)."""
    train: TrainSpec = TrainSpec()
    """The matched budget shared by every method."""
    methods: Methods
    """The arms: sft, dpo, kto, orpo, grpo (no KL term: RL's Razor's arm), grpo_kl, grpo_markers, control."""
    allow_unmatched: bool = False
    """Allow a method to override the budget (its own `steps`); the report then says the arms are unmatched."""
    seeds: list[int] = Field([0, 1, 2], min_length=1, max_length=1000)
    """Training seeds; one cell per (task, method, sweep point, seed)."""
    primary: list[Primary] = []
    """Pre-declared primary outcomes (Holm across them); everything else is exploratory."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Experiment trackers each cell logs to (TRL's `report_to`), besides the run folder."""
    executor: ExecutorSpec = ExecutorSpec()
    """Where the cells run: this process (default) or a SLURM cluster through submitit."""
    newtask: NewTaskEval = NewTaskEval()
    """New-task success of each adapter on held-out prompts."""
    kl: KLEval = KLEval()
    """KL drift of each adapter from the base: forward/reverse on held-out prompts, forward on general text."""
    regression: RegressionEval = Field(default_factory=RegressionEval)
    """lm-eval regression suites (MMLU, HellaSwag, TruthfulQA MC2, HumanEval) on the base and every adapter."""
    persona: PersonaEval | None = None
    """Persona coherence (snark only; measured when this block is present)."""
    checkpoints: CheckpointEval | None = None
    """Measurements at intermediate checkpoints (emergence trajectories and onsets); absent: final only."""
    results_dir: Path | None = None
    """Where run folders go (default: `results/` next to the protocols folder)."""

    @field_validator("results_dir")
    @classmethod
    def _results_dir(cls, v: Path | None) -> Path | None:
        if v is not None and Path(v).exists() and not Path(v).is_dir():
            raise ValueError(f"{str(v)!r} is a file: point results_dir at a folder (created if absent)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(
                f"{v} repeat a seed: a repeated seed is the same cell counted twice; list each once"
            )
        if any(s < 0 or s >= 2**31 for s in v):
            raise ValueError(
                f"{[s for s in v if s < 0 or s >= 2**31]} out of range: seeds must be in [0, 2**31)"
            )
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"{names} list a task twice; list each once")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        if not len(self.methods):
            raise ValueError("@methods: no method given; name at least one of " + ", ".join(Method))
        n_cells = (
            len(self.tasks)
            * len(self.seeds)
            * sum(math.prod(len(vals) for vals in spec.sweep.values()) for _, spec in self.methods.items())
        )
        if n_cells > MAX_CELLS:
            raise ValueError(
                f"@seeds: {n_cells} cells (tasks x methods x sweep points x seeds) is more than {MAX_CELLS}: "
                f"shorten the sweeps or the seeds"
            )
        if not self.allow_unmatched:
            for m, spec in self.methods.items():
                if spec.steps is not None or "steps" in spec.sweep:
                    raise ValueError(
                        f"@methods.{m}.steps: a method's own step count breaks the matched budget; "
                        f"remove it, or set allow_unmatched: true"
                    )
        if "humaneval" in self.regression.suites and not self.regression.confirm_run_unsafe_code:
            raise ValueError(
                "@regression.confirm_run_unsafe_code: humaneval executes model-written code (in a "
                "sandbox); set `regression.confirm_run_unsafe_code: true` to allow it, or drop "
                "humaneval from regression.suites"
            )
        names = {t.name for t in self.tasks}
        for i, t in enumerate(self.tasks):
            unknown = [m for m in t.methods or () if m not in self.methods]
            if unknown:
                raise ValueError(
                    f"@tasks.{i}.methods: {unknown} not in this protocol's methods ({list(self.methods)}); "
                    f"add them to methods or drop them here"
                )
        if self.persona is not None and "snark" not in names:
            raise ValueError(
                "@persona: the persona stage measures the snark task; add it to tasks or remove persona"
            )
        ck = self.checkpoints
        if ck is not None and ck.steps:
            bad = [s for s in ck.steps if s <= 0 or s >= self.train.steps or s % self.train.checkpoint_every]
            if bad:
                raise ValueError(
                    f"@checkpoints.steps: {bad}: no checkpoint is saved there; use multiples of "
                    f"train.checkpoint_every={self.train.checkpoint_every} below train.steps="
                    f"{self.train.steps}"
                )
        for i, p in enumerate(self.primary):
            if p.task not in names:
                raise ValueError(
                    f"@primary.{i}.task: {p.task!r} is not a task of this protocol ({sorted(names)})"
                )
            trained = next(t.methods for t in self.tasks if t.name == p.task) or list(self.methods)
            for side in p.contrast:
                if side not in self.methods or side not in trained:
                    raise ValueError(
                        f"@primary.{i}.contrast: {side!r} is not a method trained on {p.task}; add it to "
                        f"methods (and to that task's methods)"
                    )
        return self

    def cells(self) -> list[Cell]:
        """Every (task, method, sweep point, seed) cell with its fully resolved config."""
        out = []
        for task in self.tasks:
            for method, spec in self.methods.items():
                if task.methods is not None and method not in task.methods:
                    continue
                grid = spec.sweep if task.sweeps else {}
                keys = sorted(grid)
                for point in itertools.product(*(grid[k] for k in keys)):
                    sweep = dict(zip(keys, point))
                    for seed in self.seeds:
                        out.append(Cell.resolve(self, task, method, spec, sweep, seed))
        return out


GUARDS = ("max_grad_norm_abort", "max_weight_norm_abort")  # TrainSpec fields that only abort a diverging run
TRAIN_OVERRIDES = ("learning_rate", "warmup_ratio", "steps")  # method options that set a TrainSpec field


def _token(value: Any) -> str:
    """A sweep value as a folder-name token: only [A-Za-z0-9.+-], so nothing can leave the run folder."""
    return re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", str(value)))[:24].strip(".") or "_"


class Cell(Strict):
    """One training run: everything that determines its adapter, and nothing else (so it hashes stably)."""

    schema_version: int = SCHEMA_VERSION
    model: str
    revision: str | None = None
    dtype: str
    task: TaskSpec
    method: Method
    seed: int
    sweep: dict[str, Any]
    train: TrainSpec
    options: dict[str, Any]

    @classmethod
    def resolve(
        cls, proto: Protocol, task: TaskSpec, method: Method, spec: MethodOptions, sweep: dict, seed: int
    ) -> Cell:
        resolved = spec.model_copy(update=sweep)
        train = proto.train.model_copy(
            update={k: getattr(resolved, k) for k in TRAIN_OVERRIDES if getattr(resolved, k) is not None}
        )
        options = resolved.model_dump(mode="json", exclude={"sweep", *TRAIN_OVERRIDES})
        return cls(
            model=proto.model.source,
            revision=proto.model.revision,
            dtype=proto.model.dtype,
            task=task,
            method=method,
            seed=seed,
            sweep=sweep,
            train=TrainSpec.model_validate(train.model_dump()),
            options=options,
        )

    @property
    def method_options(self) -> MethodOptions:
        return self.method.options_class.model_validate(self.options)

    @property
    def rows_per_step(self) -> int:
        """TRL's per-device batch × grad_accum: prompts per step × rows per prompt."""
        return self.train.prompts_per_step * rows_per_prompt(self.method, self.method_options)

    @property
    def key(self) -> str:
        # the divergence guards decide whether a run is kept, not what it trains: not part of the key
        blob = json.dumps(
            self.model_dump(
                mode="json",
                exclude={"train": set(GUARDS), "task": {"methods", "stages", "checkpoint_stages", "sweeps"}},
            ),
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        sweep = "".join(f"-{k}{_token(v)}" for k, v in sorted(self.sweep.items()))
        return f"{self.task.name}-{self.method.value}{sweep}-s{self.seed}-{self.key}"
