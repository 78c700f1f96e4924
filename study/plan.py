"""`study plan PROTOCOL`: before anything runs and without loading a model, what a protocol will cost:
per cell its training and measurement time and peak memory, and in total the device-hours, the cost at
`--usd-per-gpu-hour`, and the wall time on SLURM at a given array parallelism.

    study plan protocols/default.yaml                      # this CPU (from `make bench` figures)
    study plan protocols/qwen2.5-3b.yaml --gpu H100-80GB --usd-per-gpu-hour 2.5 --array-parallelism 16

Two models, each stating what it rests on (`Estimate.assumptions`, printed under the table):

CPU (measured here). Training: seconds per optimizer step per method, measured with SmolLM2-135M at batch 4
and max length 128 (results/bench/train.json when `make bench` wrote it, else the figures in FIELD_NOTES),
scaled by parameters x tokens per step (x completion length for methods that generate online).
Measurement: each stage's seconds per task on the default protocol, measured by `make study` on this machine
(arithmetic: newtask 9, KL 16, regression 39 s per adapter; snark: newtask 36, KL 19, persona 31 s; a
checkpoint: the task's checkpoint stages, e.g. 51 s arithmetic, 37 s snark; the base 143 s), scaled by the
stage's work (prompts x new tokens, items per suite) relative to that protocol (study/plan_reference.yaml)
and by parameters. Scaling past the measured model (135M) is an assumption, and the output says so.

GPU (not measured here: there is no GPU on this machine). A roofline-style model per GPU type (`GPUS`,
vendor datasheet peaks): training FLOPs 6 N per token (+2 N per token for a reference-model forward) at an
assumed model-FLOPs utilisation; generation (GRPO rollouts, newtask/KL/persona/HumanEval answers) as
sequential decode steps, each costing the larger of one pass over the weights at the memory bandwidth and
an assumed per-step overhead of HF `generate` (kernel launches and Python, which dominate at small batch;
vLLM's is lower, `--generation vllm`); log-likelihood scoring at an assumed inference utilisation.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from study.config import Cell, Method, Protocol
from study.paths import RESULTS

log = logging.getLogger("study")

# ------------------------------------------------------------------------------------ measured on this CPU

# s/step at batch 4, max_length 128, 135M params, fp32, 2 cores (FIELD_NOTES "TRL on CPU"; `make bench`).
# GRPO: 7.4 with gradient checkpointing, which TRL had left on; 6.4 without it (the default's 16 GRPO steps:
# 125-146 s measured by make study, 2026-11-29, with 2 prompts x 4 completions of <= 32 tokens).
CPU_SECONDS_PER_STEP = {Method.sft: 2.1, Method.dpo: 3.0, Method.kto: 1.9, Method.grpo: 6.4}
REF = {"params_b": 0.135, "tokens": 4 * 128, "completion": 48}
# The default protocol's measurement on this CPU, per task and stage of one adapter, seconds (make study on an
# idle 2-core machine, 2026-11-29, protocols/default.yaml as in study/plan_reference.yaml): the final adapter
# (KL's base samples drawn once per process) and an intermediate checkpoint (KL forward only, no causal test;
# snark: persona generates its own answers there).
CPU_STAGE_SECONDS = {
    "arithmetic": {"newtask": 9.0, "kl": 16.0, "regression": 39.0},
    "snark": {"newtask": 36.0, "kl": 19.0, "persona": 31.0, "probe": 8.0},
}
CPU_CHECKPOINT_STAGE_SECONDS = {
    "arithmetic": {"newtask": 8.5, "kl": 3.0, "regression": 39.0},
    "snark": {"kl": 2.8, "persona": 34.0, "newtask": 36.0},
}
# Local runs with executor.workers processes on this 2-core CPU: the wall time is the one-process figure over
# this speed-up, measured on the default study (2026-11-30, 18 cells): its one-process plan, 3028 s, over the
# 2320 s `make study` took with 2 workers of one thread each. Per cell, one thread made the compute-bound
# stages ~1.8x slower (lm-eval 72 s against 39 s) and GRPO training ~1.5x slower, run two at a time.
CPU_WORKER_SPEEDUP = {1: 1.0, 2: 1.31}
CPU_BASE_SECONDS = 143.0  # both tasks' base stages, the probe's pre-run check and the model load (measured)
# Relative CPU cost of one item per suite (FIELD_NOTES stock timings: HellaSwag 0.39 s, MMLU 0.21 s,
# TruthfulQA 2.66 s without / 0.72 s with the shared-prefix cache; HumanEval from the 67 s total at 128 tokens).
CPU_ITEM_SECONDS = {"mmlu": 0.21, "hellaswag": 0.39, "truthfulqa_mc2": 0.72, "humaneval": 1.75}
HUMANEVAL_REF_TOKENS = 128

# ------------------------------------------------------------------------------------- GPU model (assumed)


@dataclass(frozen=True)
class GPU:
    bf16_tflops: float  # dense peak, no sparsity (vendor datasheet)
    bandwidth_gbs: float  # HBM/GDDR peak (vendor datasheet)
    memory_gb: float


GPUS = {
    "A100-80GB": GPU(312, 2039, 80),  # NVIDIA A100 datasheet (SXM)
    "H100-80GB": GPU(989, 3350, 80),  # NVIDIA H100 datasheet (SXM)
    "H200-141GB": GPU(989, 4800, 141),  # NVIDIA H200 datasheet
    "L40S-48GB": GPU(362, 864, 48),  # NVIDIA L40S datasheet
    "A10-24GB": GPU(125, 600, 24),  # NVIDIA A10 datasheet (bf16 dense; 250 is with sparsity)
    "RTX4090-24GB": GPU(165, 1008, 24),  # NVIDIA Ada whitepaper (bf16, fp32 accumulate)
}
DEFAULT_GPU = "A100-80GB"
TRAIN_MFU = 0.35  # assumed: LoRA fine-tuning of a few-B model with gradient checkpointing (typical 30-40 %)
SCORE_MFU = 0.40  # assumed: batched log-likelihood forward passes
BANDWIDTH_EFFICIENCY = 0.6  # assumed: fraction of peak bandwidth a decode step reaches
DECODE_OVERHEAD_S = {"hf": 0.025, "vllm": 0.008}  # assumed per decode step (one token for the whole batch)
GRAD_CKPT_FACTOR = 4 / 3  # gradient checkpointing recomputes the forward: 8 N instead of 6 N per token
# Tokens scored per item by lm-eval (assumed from the stock prompts: choices x (context + continuation)).
SCORED_TOKENS_PER_ITEM = {"mmlu": 4 * 150, "hellaswag": 4 * 90, "truthfulqa_mc2": 8 * 230}
SUITE_SIZES = {"mmlu": 14042, "hellaswag": 10042, "truthfulqa_mc2": 817, "humaneval": 164}  # full test sets
REPORT_SECONDS = 60.0  # the final SLURM job: metrics table + report (assumed: no model, a minute)

ARCH = {  # what `plan` needs of a model, for sources it cannot read offline
    "bundled:smollm2-135m-instruct": {
        "params_b": 0.135,
        "hidden": 576,
        "layers": 30,
        "vocab": 49152,
        "kv": 192,
    },
    "Qwen/Qwen2.5-3B-Instruct": {"params_b": 3.09, "hidden": 2048, "layers": 36, "vocab": 151936, "kv": 256},
    "tiny-random": {"params_b": 0.0001, "hidden": 64, "layers": 2, "vocab": 600, "kv": 64},
}

# --------------------------------------------------------------------------------------------- estimates


@dataclass
class Estimate:
    train_seconds: float
    measure_seconds: float  # final adapter + intermediate checkpoints
    peak_memory_gb: float
    assumptions: set[str] = field(default_factory=set)

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.measure_seconds


def _arch(proto: Protocol) -> tuple[dict, set[str]]:
    notes = set()
    arch = dict(ARCH.get(proto.model.source, {}))
    if proto.model.params_b:
        arch["params_b"] = proto.model.params_b
    if "params_b" not in arch:
        notes.add(f"{proto.model.source}: parameter count unknown, 1B assumed (set model.params_b)")
        arch["params_b"] = 1.0
    if "hidden" not in arch:
        notes.add(f"{proto.model.source}: architecture unknown, hidden/layers/vocab guessed from the size")
    arch.setdefault("hidden", int(2048 * (arch["params_b"] / 3) ** 0.5))
    arch.setdefault("layers", 32)
    arch.setdefault("vocab", 128000)
    arch.setdefault("kv", arch["hidden"] // 4)
    return arch, notes


def _measured_cpu() -> tuple[dict[Method, float], str]:
    path = RESULTS / "bench" / "train.json"
    if path.is_file():
        try:
            got = {Method(m): v["s_per_step"] for m, v in json.loads(path.read_text())["methods"].items()}
            return {**CPU_SECONDS_PER_STEP, **got}, str(path)
        except (KeyError, ValueError, json.JSONDecodeError):
            pass
    return CPU_SECONDS_PER_STEP, "FIELD_NOTES (make bench on this machine)"


def _like(method: Method, known) -> Method:
    """A measured method that does the same kinds of work (online generation, pairs, a reference model)."""

    def sig(m: Method):
        return (m.generates_online, m.data == "pairs", m.needs_reference_model)

    same = [m for m in known if sig(m) == sig(method)]
    close = [m for m in known if m.generates_online == method.generates_online]
    return (same or close or list(known))[0]


def cpu_seconds_per_step(method: Method) -> tuple[float, set[str]]:
    measured, source = _measured_cpu()
    if method in measured:
        return measured[method], set()
    stand_in = _like(method, measured)
    msg = f"{method.value}: no CPU measurement; the figure of {stand_in.value} (same kind of work) is used"
    warnings.warn(msg, stacklevel=2)
    return measured[stand_in], {msg}


def _heldout_prompts(task) -> int:
    if task.name == "arithmetic":
        return task.n_heldout
    try:
        from study.tasks import build  # snark: reads the bundled jsonl, no model

        return len(build(task).heldout)
    except Exception:
        return 80


def _suites(reg) -> dict[str, int]:
    """Items per regression suite: the protocol's limits, else the full test set."""
    return {s: (reg.limit.get(s) or SUITE_SIZES.get(s, 1000)) for s in reg.suites}


REFERENCE = Path(__file__).with_name("plan_reference.yaml")  # the protocol the CPU figures were measured at


def _default_protocol() -> Protocol | None:
    from study.config import load_protocol

    try:
        return load_protocol(REFERENCE)
    except Exception:
        return None


def _stage_work(proto: Protocol, task, every: bool = False) -> dict[str, float]:
    """Per stage, a work measure whose ratio to the default protocol's scales the measured CPU seconds; the
    stages `task` measures (`every`: all the protocol has, for the reference)."""
    n = min(proto.newtask.limit or 10**9, _heldout_prompts(task))
    kl = proto.kl
    work = {
        "newtask": n * proto.newtask.max_new_tokens,
        "kl": kl.n_prompts * kl.samples_per_prompt * kl.max_new_tokens
        + kl.n_general * kl.max_length_general / 4,
        "regression": _regression_cpu_items(proto.regression),
    }
    if proto.persona is not None:
        p = proto.persona
        work["persona"] = (
            p.retest_prompts * len(p.retest_seeds) + p.direction_prompts / 4 + n / 4
        ) * p.max_new_tokens
    probe = proto.checkpoints.probe if proto.checkpoints else None
    if probe is not None:
        work["probe"] = _regression_cpu_items(probe)
    if every:
        return work
    keep = getattr(task, "stages", None)  # the stages this task's cells run (tasks[].stages)
    return {
        k: v
        for k, v in work.items()
        if (keep is None or k in keep) and (k != "persona" or task.name == "snark")
    }


def _regression_cpu_items(reg) -> float:
    out = 0.0
    for suite, items in _suites(reg).items():
        per = CPU_ITEM_SECONDS.get(suite, 0.5)
        if suite == "humaneval":
            per *= reg.humaneval_max_new_tokens / HUMANEVAL_REF_TOKENS
        out += items * per
    return out


def _cpu_measure(proto: Protocol, cell: Cell, arch: dict, n_checkpoints: int) -> tuple[float, set[str]]:
    ref = _default_protocol()
    scale = arch["params_b"] / REF["params_b"]
    notes = set()
    if abs(scale - 1) > 0.05:
        notes.add(f"CPU measurement time scaled from SmolLM2-135M by parameters (x{scale:.2g}): not measured")
    work = _stage_work(proto, cell.task)
    ref_task = next((t for t in ref.tasks if t.name == cell.task.name), ref.tasks[0]) if ref else cell.task
    ref_work = _stage_work(ref, ref_task, every=True) if ref else work

    def seconds(table: dict, stages) -> float:
        own = table.get(cell.task.name, {})
        other = {k: v for t in table.values() for k, v in t.items()}  # a stage the task's figures lack
        return sum(
            own.get(s, other.get(s, 30.0)) * work[s] / max(ref_work.get(s, work[s]), 1e-9)
            for s in stages
            if s in work
        )

    from study.metrics import checkpoint_stages

    final = seconds(CPU_STAGE_SECONDS, work)
    per_ck = seconds(CPU_CHECKPOINT_STAGE_SECONDS, checkpoint_stages(proto, cell.task))
    return (final + n_checkpoints * per_ck) * scale, notes


def _n_checkpoints(proto: Protocol, cell: Cell) -> int:
    ck = proto.checkpoints
    if ck is None:
        return 0
    every = cell.train.checkpoint_every
    saved = [s for s in range(every, cell.train.steps, every)]
    return len([s for s in saved if ck.steps is None or s in ck.steps])


def _gpu_decode_step(arch: dict, gpu: GPU, generation: str) -> float:
    weights = 2 * arch["params_b"] * 1e9  # bf16 bytes
    return max(weights / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY), DECODE_OVERHEAD_S[generation])


def _gpu_measure(
    proto: Protocol, cell: Cell, arch: dict, gpu: GPU, generation: str, n_checkpoints: int
) -> float:
    n_params = arch["params_b"] * 1e9
    step = _gpu_decode_step(arch, gpu, generation)
    score = 2 * n_params / (gpu.bf16_tflops * 1e12 * SCORE_MFU)  # seconds per scored token

    def decode(prompts: int, batch: int, tokens: int) -> float:
        return math.ceil(prompts / batch) * tokens * step

    n = min(proto.newtask.limit or 10**9, _heldout_prompts(cell.task))
    nt = proto.newtask
    kl = proto.kl
    stages = {
        "newtask": decode(n, nt.batch_size, nt.max_new_tokens),
        # sampling, then scoring by the adapter and the base (and the general text by both)
        "kl": decode(kl.n_prompts * kl.samples_per_prompt, kl.batch_size, kl.max_new_tokens)
        + score * 2 * (kl.n_prompts * kl.max_new_tokens + kl.n_general * kl.max_length_general),
    }
    reg = proto.regression
    items = _suites(reg)
    stages["regression"] = sum(
        score * SCORED_TOKENS_PER_ITEM.get(s, 500) * k for s, k in items.items() if s != "humaneval"
    )
    if "humaneval" in items:
        stages["regression"] += decode(items["humaneval"], reg.batch_size, reg.humaneval_max_new_tokens)
    if proto.persona is not None:
        p = proto.persona
        stages["persona"] = decode(p.retest_prompts * len(p.retest_seeds), p.batch_size, p.max_new_tokens)
    final = sum(stages.values())
    ck = proto.checkpoints
    per_ck = 0.0
    if ck is not None:
        per_ck = sum(v for k, v in stages.items() if k in ck.stages)
        if ck.probe is not None:
            per_ck += sum(
                score * SCORED_TOKENS_PER_ITEM.get(s, 500) * k
                for s, k in _suites(ck.probe).items()
                if s != "humaneval"
            )
    return final + n_checkpoints * per_ck


def _gpu_train(cell: Cell, arch: dict, gpu: GPU, generation: str) -> float:
    t = cell.train
    n_params = arch["params_b"] * 1e9
    seqs = cell.rows_per_step * (2 if cell.method.data == "pairs" else 1)
    tokens = seqs * t.max_length
    flops_per_token = 6 * n_params * (GRAD_CKPT_FACTOR if t.gradient_checkpointing else 1)
    if cell.method.needs_reference_model:
        flops_per_token += 2 * n_params
    per_step = tokens * flops_per_token / (gpu.bf16_tflops * 1e12 * TRAIN_MFU)
    if cell.method.generates_online:
        # one generate call per optimizer step over every completion of the step, max_completion_length
        # sequential decode steps (batched: the weights are read once per step for the whole batch)
        per_step += t.max_completion_length * _gpu_decode_step(arch, gpu, generation)
    return per_step * t.steps


def peak_memory_gb(cell: Cell, arch: dict, gpu: bool) -> float:
    """Weights (bf16 on a GPU, fp32 on the CPU) + LoRA optimizer state + activations + logits (+ the KV cache
    of online generation); x1.2 for the allocator. Not measured: a rule of thumb."""
    t = cell.train
    n = arch["params_b"] * 1e9
    weights = (2 if gpu else 4) * n
    lora_params = 7 * arch["layers"] * t.lora.r * 2 * arch["hidden"]  # ~7 projections per layer
    optimizer = 16 * lora_params  # fp32 param + grad + two Adam moments
    seqs = cell.rows_per_step // t.grad_accum * (2 if cell.method.data == "pairs" else 1)
    per_layer = 34 if not t.gradient_checkpointing else 2  # bytes per hidden unit per token (fp16)
    layers = arch["layers"] if not t.gradient_checkpointing else arch["layers"] + 17
    activations = seqs * t.max_length * arch["hidden"] * layers * per_layer
    logits = seqs * t.max_length * arch["vocab"] * 4 * 2
    kv = 0.0
    if cell.method.generates_online:
        gen_seqs = cell.rows_per_step // t.grad_accum
        kv = 2 * arch["layers"] * arch["kv"] * (t.max_length + t.max_completion_length) * gen_seqs * 2
    return (weights + optimizer + activations + logits + kv) / 1e9 * 1.2


def estimate(cell: Cell, proto: Protocol, gpu: GPU | None, generation: str = "hf") -> Estimate:
    arch, notes = _arch(proto)
    n_ck = _n_checkpoints(proto, cell)
    if gpu is None:
        s, extra = cpu_seconds_per_step(cell.method)
        notes |= extra
        t = cell.train
        scale = arch["params_b"] / REF["params_b"]
        per_step = s * scale * (cell.rows_per_step * t.max_length / REF["tokens"])
        if abs(scale - 1) > 0.05:
            notes.add("CPU training time scaled from SmolLM2-135M by parameters x tokens: not measured")
        if cell.method.generates_online:
            per_step *= t.max_completion_length / REF["completion"]
        measure, extra = _cpu_measure(proto, cell, arch, n_ck)
        return Estimate(per_step * t.steps, measure, peak_memory_gb(cell, arch, False), notes | extra)
    notes.add(
        f"GPU times: a roofline model with assumed utilisation and {generation} decode overhead, not measured "
        "here (no GPU on this machine)"
    )
    return Estimate(
        _gpu_train(cell, arch, gpu, generation),
        _gpu_measure(proto, cell, arch, gpu, generation, n_ck),
        peak_memory_gb(cell, arch, True),
        notes,
    )


def base_seconds(proto: Protocol, gpu: GPU | None, generation: str = "hf") -> float:
    """The base model's measurements, once per protocol (per task for the per-task stages)."""
    cells = proto.cells()
    if not cells:
        return 0.0
    per_task = {}
    for c in cells:
        per_task.setdefault(c.task.name, c)
    arch, _ = _arch(proto)
    if gpu is None:
        final = sum(_cpu_measure(proto, c, arch, 0)[0] for c in per_task.values())
        ref = _default_protocol()
        ref_cells = {c.task.name: c for c in ref.cells()} if ref else {}
        ref_final = sum(_cpu_measure(ref, c, arch, 0)[0] for c in ref_cells.values()) or final
        # the base's stages cost what an adapter's do (no KL), plus the model load and the pre-run check
        return final / ref_final * CPU_BASE_SECONDS
    return sum(_gpu_measure(proto, c, arch, gpu, generation, 0) for c in per_task.values())


def is_gpu_protocol(proto: Protocol) -> bool:
    return proto.model.device.startswith("cuda") or (
        proto.model.device == "auto" and proto.model.dtype in ("bfloat16", "float16")
    )


def plan_rows(proto: Protocol, gpu: str | None = None, generation: str = "hf") -> list[dict]:
    """One row per cell. `gpu`: a key of GPUS (default: A100-80GB for a GPU protocol, the CPU otherwise)."""
    if gpu is None and is_gpu_protocol(proto):
        gpu = DEFAULT_GPU
    spec = GPUS[gpu] if gpu else None
    rows = []
    for cell in proto.cells():
        e = estimate(cell, proto, spec, generation)
        rows.append(
            {
                "cell": cell.name,
                "task": cell.task.name,
                "method": cell.method.value,
                "seed": cell.seed,
                "sweep": cell.sweep,
                "steps": cell.train.steps,
                "train_seconds": e.train_seconds,
                "measure_seconds": e.measure_seconds,
                "seconds": e.seconds,
                "peak_memory_gb": e.peak_memory_gb,
                "gpu_memory_gb": e.peak_memory_gb if spec else None,
                "fits": spec is None or e.peak_memory_gb <= spec.memory_gb,
                "device": gpu or "cpu",
                "assumptions": sorted(e.assumptions),
            }
        )
    return rows


def array_wall_seconds(durations: list[float], parallelism: int) -> float:
    """Wall time of a job array with at most `parallelism` tasks at once, tasks started in submission order
    as slots free up (SLURM's array throttle), ignoring queue wait."""
    slots = [0.0] * max(1, min(parallelism, len(durations) or 1))
    heapq.heapify(slots)
    end = 0.0
    for d in durations:
        start = heapq.heappop(slots)
        end = max(end, start + d)
        heapq.heappush(slots, start + d)
    return end


def summary(
    proto: Protocol,
    rows: list[dict],
    gpu: str | None,
    generation: str = "hf",
    array_parallelism: int = 16,
    gpus_per_cell: int = 1,
    usd_per_gpu_hour: float | None = None,
) -> dict:
    spec = GPUS[gpu] if gpu else None
    base = base_seconds(proto, spec, generation)
    cells = [r["seconds"] for r in rows]
    device_s = sum(cells) + base
    wall = base + array_wall_seconds(cells, array_parallelism) + REPORT_SECONDS
    out = {
        "device": gpu or "cpu",
        "cells": len(rows),
        "train_seconds": sum(r["train_seconds"] for r in rows),
        "measure_seconds": sum(r["measure_seconds"] for r in rows),
        "base_seconds": base,
        "device_seconds": device_s,
        "sequential_seconds": device_s,
        "slurm_wall_seconds": wall,
        "array_parallelism": array_parallelism,
        "workers": proto.executor.workers,
        # local CPU wall time: more workers than measured are counted at the largest measured speed-up
        "local_wall_seconds": device_s
        / CPU_WORKER_SPEEDUP[min(proto.executor.workers, max(CPU_WORKER_SPEEDUP))],
        "peak_memory_gb": max((r["peak_memory_gb"] for r in rows), default=0.0),
    }
    if spec:
        out["gpu_hours"] = device_s / 3600 * gpus_per_cell
        if usd_per_gpu_hour is not None:
            out["usd"] = out["gpu_hours"] * usd_per_gpu_hour
    return out
