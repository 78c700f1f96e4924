"""The arms of the study: what each method is, what it needs, and its own options.

A method's behaviour lives in the `Method` enum's properties (which TRL trainer it uses, what data it reads,
how many training rows one prompt yields); its options are its own model (as TRL has one config class per
trainer), so `sft: {beta: 0.3}` is an error, not a silent no-op. Any field of the method's TRL config class
can be passed through under `trl:`; it is checked by building that config (`study validate`).

Adding a method: a member here with its properties and options class, its trainer in `study/train.py`, and
(if it reads a new data format) its rows in `study/tasks/__init__.py`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from study.config.base import Strict, sub_errors


class Method(StrEnum):
    """The arms, in table order. `control` is the placebo: the same budget of SFT on answers without the
    target behaviour (the persona task's neutral answers), against which every effect is read."""

    sft = "sft"
    dpo = "dpo"
    kto = "kto"
    orpo = "orpo"
    grpo = "grpo"
    grpo_kl = "grpo_kl"
    grpo_markers = "grpo_markers"
    control = "control"

    @property
    def trainer(self) -> str:
        """The TRL trainer family: sft, dpo, kto, orpo or grpo."""
        return {"control": "sft", "grpo_kl": "grpo", "grpo_markers": "grpo"}.get(self.value, self.value)

    @property
    def data(self) -> Literal["completions", "neutral", "pairs", "unpaired", "prompts"]:
        """The training rows the method reads (see study.tasks)."""
        return {
            "sft": "completions",
            "control": "neutral",
            "dpo": "pairs",
            "orpo": "pairs",
            "kto": "unpaired",
        }.get(self.value, "prompts")

    @property
    def needs_reference_model(self) -> bool:
        """Keeps a frozen reference policy in the loss (DPO, KTO; GRPO only with its KL term)."""
        return self.trainer in ("dpo", "kto") or self is Method.grpo_kl

    @property
    def generates_online(self) -> bool:
        """Samples its own completions during training (on-policy)."""
        return self.trainer == "grpo"

    @property
    def is_control(self) -> bool:
        return self is Method.control

    @property
    def options_class(self) -> type[MethodOptions]:
        return OPTIONS[self]

    @property
    def trl_config(self) -> tuple[str, str]:
        """(module, class) of the TRL config this method trains with."""
        return {
            "sft": ("trl", "SFTConfig"),
            "dpo": ("trl", "DPOConfig"),
            "kto": ("trl", "KTOConfig"),
            "orpo": ("trl.experimental.orpo", "ORPOConfig"),
            "grpo": ("trl", "GRPOConfig"),
        }[self.trainer]


# Fields of the TRL configs that the protocol sets itself: passing them under `trl:` would break the match.
RESERVED_TRL = {
    "output_dir": "the run folder",
    "max_steps": "train.steps",
    "num_train_epochs": "train.steps",
    "per_device_train_batch_size": "train.prompts_per_step",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "the method's learning_rate",
    "seed": "seeds",
    "data_seed": "seeds",
    "save_steps": "train.checkpoint_every",
    "save_strategy": "train.checkpoint_every",
    "max_length": "train.max_length",
    "max_completion_length": "train.max_completion_length",
    "num_generations": "the method's num_generations",
    "beta": "the method's beta",
    "reward_weights": "the task's reward (study.rewards)",
    "report_to": "the protocol's report_to",
    "use_cpu": "model.device",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "gradient_checkpointing": "train.gradient_checkpointing",
}


# The loss variants TRL's trainers implement (TRL's configs accept any string and fail only at the first
# training step; tests/test_protocol_fuzz.py checks these lists against the installed TRL's source).
DPOLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
GRPOLoss = Literal["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]


class MethodOptions(Strict):
    """Options every method has. A budget field given here (steps) breaks the match between methods and
    needs the protocol's `allow_unmatched: true`."""

    learning_rate: float | None = Field(None, gt=0, le=1)
    """This method's learning rate (default: train.learning_rate). Methods differ in the scale they need."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """This method's warm-up fraction (default: train.warmup_ratio)."""
    steps: int | None = Field(None, gt=0, le=1_000_000)
    """Optimizer steps for this method only: unmatched, needs `allow_unmatched: true`."""
    sweep: dict[str, list[Any]] = {}
    """Field -> values: one cell per combination (e.g. `learning_rate: [1e-4, 3e-4, 1e-3]`), so that methods
    can be compared at matched new-task success along their frontiers."""
    trl: dict[str, Any] = {}
    """Any other field of the method's TRL config class, passed through as is (e.g. `optim: adafactor`,
    `lr_scheduler_type: cosine`); checked by building that config in `study validate`."""

    @field_validator("sweep", mode="before")
    @classmethod
    def _sweepable(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # pydantic reports the type
        allowed = sorted(set(cls.model_fields) - {"sweep", "trl"})
        for key, values in v.items():
            if key not in allowed:
                raise ValueError(
                    f"@{key}: cannot sweep {key!r} for this method: sweepable fields are {allowed}"
                )
            if not isinstance(values, list) or not values:
                raise ValueError(f"@{key}: needs a non-empty list of values, e.g. `{key}: [a, b]`")
            if len({repr(x) for x in values}) != len(values):
                raise ValueError(f"@{key}: lists a value twice; list each once")
            for i, x in enumerate(values):  # each value must be a valid value of the field itself
                try:
                    cls.model_validate({key: x})
                except ValidationError as e:
                    raise ValueError(sub_errors(e, f"{key}.{i}")) from None
        return v

    @field_validator("trl")
    @classmethod
    def _not_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in RESERVED_TRL:
                raise ValueError(f"@{key}: set by the protocol: use {RESERVED_TRL[key]} instead")
            if key in cls.model_fields:
                raise ValueError(f"@{key}: an option of this method: set it beside `trl:`, not under it")
        return v


class SFTOptions(MethodOptions):
    """SFT on (prompt, target answer)."""


class ControlOptions(MethodOptions):
    """The placebo arm: SFT at the same budget on answers without the target behaviour."""


class DPOOptions(MethodOptions):
    beta: float = Field(0.1, gt=0, le=100)
    """Preference temperature (how far from the reference the policy may move)."""
    loss_type: DPOLoss = "sigmoid"
    """TRL's DPO loss (`sigmoid`, `ipo`, `hinge`, ...: the losses DPOTrainer implements)."""


class KTOOptions(MethodOptions):
    beta: float = Field(0.1, gt=0, le=100)
    """Preference temperature."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """TRL's KTO loss (`kto`, `apo_zero_unpaired`)."""


class ORPOOptions(MethodOptions):
    beta: float = Field(0.1, gt=0, le=100)
    """Weight λ of the odds-ratio term (one pass, no reference model)."""


class GRPOOptions(MethodOptions):
    beta: float = Field(0.0, ge=0, le=0)
    """KL coefficient: 0 for RL's Razor's arm (its GRPO had no KL term). A KL-penalised GRPO is the separate
    arm `grpo_kl`, so that "GRPO forgets less" is never true by construction."""
    num_generations: int = Field(4, gt=1, le=64)
    """Completions sampled per prompt (a group); completions per step = prompts_per_step × this."""
    temperature: float = Field(1.0, gt=0, le=10)
    """Sampling temperature of the rollouts."""
    loss_type: GRPOLoss | None = None
    """TRL's GRPO loss variant (`grpo`, `dapo`, `dr_grpo`, ...; None: TRL's default)."""
    reward: Literal["combined", "markers_only"] | None = None
    """The proxy reward: None (the task's own: the combined persona reward, or arithmetic's exact match),
    `combined`, or `markers_only` (persona task: the lexicon markers alone, the positive control for surface
    learning)."""


class GRPOKLOptions(GRPOOptions):
    beta: float = Field(0.04, gt=0, le=10)
    """KL coefficient (> 0: this arm is GRPO with a reverse-KL penalty to the reference)."""


class GRPOMarkersOptions(GRPOOptions):
    reward: Literal["markers_only"] = "markers_only"
    """Fixed: this arm is rewarded for the lexicon markers alone (persona task)."""


OPTIONS: dict[Method, type[MethodOptions]] = {
    Method.sft: SFTOptions,
    Method.dpo: DPOOptions,
    Method.kto: KTOOptions,
    Method.orpo: ORPOOptions,
    Method.grpo: GRPOOptions,
    Method.grpo_kl: GRPOKLOptions,
    Method.grpo_markers: GRPOMarkersOptions,
    Method.control: ControlOptions,
}
assert set(OPTIONS) == set(Method), "every method needs its options class"


def rows_per_prompt(method: Method, options: MethodOptions) -> int:
    """Training rows one prompt yields in a batch: the matched budget counts prompts, TRL counts rows.
    KTO sees each prompt's desirable and undesirable answer; GRPO samples a group of completions."""
    if method.trainer == "kto":
        return 2
    if method.trainer == "grpo":
        return options.num_generations
    return 1


def trl_options(method: Method, options: MethodOptions) -> dict[str, Any]:
    """The method's own options as TRL config kwargs (pass-through last, so it can add but not override)."""
    out: dict[str, Any] = {}
    fields = set(type(options).model_fields) - set(MethodOptions.model_fields) - {"reward"}
    for name in sorted(fields):
        value = getattr(options, name)
        if value is None:
            continue
        out[name] = [value] if (name == "loss_type" and method.trainer == "dpo") else value
    return out | dict(options.trl)
