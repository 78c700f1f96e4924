"""`study plan PROTOCOL`: every cell, with an estimate of its time and (on a GPU) its memory, before anything
runs and without loading a model.

CPU times scale the per-method seconds/step measured on this 2-core machine with SmolLM2-135M at batch 4
and max length 128 (`make bench` rewrites them into results/bench/train.json, which is preferred when
present) by parameters x tokens. GPU numbers are rough: FLOPs at an assumed sustained bf16 throughput, and
memory as weights + LoRA optimizer state + activations + logits. They are for planning, not for the paper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from study.config import Cell, Method, Protocol
from study.paths import RESULTS

# Measured here (FIELD_NOTES / make bench): s/step at batch 4, max_length 128, 135M params, fp32 CPU.
CPU_SECONDS_PER_STEP = {Method.sft: 2.1, Method.dpo: 3.0, Method.kto: 1.9, Method.grpo: 7.4}
REF = {"params_b": 0.135, "tokens": 4 * 128, "completion": 48}

ARCH = {  # what `plan` needs of a model, for sources it cannot read offline
    "bundled:smollm2-135m-instruct": {"params_b": 0.135, "hidden": 576, "layers": 30, "vocab": 49152},
    "Qwen/Qwen2.5-3B-Instruct": {"params_b": 3.09, "hidden": 2048, "layers": 36, "vocab": 151936},
    "tiny-random": {"params_b": 0.0001, "hidden": 64, "layers": 2, "vocab": 600},
}
GPU_TFLOPS = 100.0  # assumed sustained bf16 throughput (an A100 at ~30% utilisation)
GPU_BANDWIDTH_GBS = 1500.0  # decode is memory-bound: one pass over the weights per generated token


@dataclass
class Estimate:
    seconds: float
    gpu_memory_gb: float | None


def _arch(proto: Protocol) -> dict:
    src = proto.model.source
    arch = dict(ARCH.get(src, {}))
    if proto.model.params_b:
        arch["params_b"] = proto.model.params_b
    arch.setdefault("params_b", 1.0)
    arch.setdefault("hidden", int(2048 * (arch["params_b"] / 3) ** 0.5))
    arch.setdefault("layers", 32)
    arch.setdefault("vocab", 128000)
    return arch


def _measured_cpu() -> dict[Method, float]:
    path = RESULTS / "bench" / "train.json"
    if path.is_file():
        try:
            return {Method(m): v["s_per_step"] for m, v in json.loads(path.read_text())["methods"].items()}
        except (KeyError, ValueError):
            pass
    return CPU_SECONDS_PER_STEP


def estimate(cell: Cell, proto: Protocol, gpu: bool) -> Estimate:
    arch = _arch(proto)
    t = cell.train
    tokens = cell.rows_per_step * t.max_length
    n = arch["params_b"] * 1e9
    if not gpu:
        measured = _measured_cpu()
        per_step = measured.get(cell.method, measured.get(Method(cell.method.trainer), 3.0)) * (arch["params_b"] / REF["params_b"]) * (tokens / REF["tokens"])
        if cell.method.generates_online:
            per_step *= t.max_completion_length / REF["completion"]
        return Estimate(per_step * t.steps, None)
    passes = 6 + (2 if cell.method.needs_reference_model else 0)  # fwd+bwd, plus a reference forward
    per_step = passes * n * tokens / (GPU_TFLOPS * 1e12)
    if cell.method.generates_online:
        per_step += t.max_completion_length * (2 * n) / (GPU_BANDWIDTH_GBS * 1e9)
    weights = 2 * n  # bf16
    lora_params = 7 * arch["layers"] * t.lora.r * 2 * arch["hidden"] * 2  # ~7 projections per layer
    optimizer = 16 * lora_params  # fp32 param + grad + two Adam moments
    seqs = cell.rows_per_step * (2 if cell.method.data == "pairs" else 1)
    activations = seqs * t.max_length * arch["hidden"] * arch["layers"] * 34
    logits = seqs * t.max_length * arch["vocab"] * 4 * 2
    return Estimate(per_step * t.steps, (weights + optimizer + activations + logits) / 1e9 * 1.2)


def plan_rows(proto: Protocol) -> list[dict]:
    gpu = proto.model.device.startswith("cuda") or (
        proto.model.device == "auto" and proto.model.dtype in ("bfloat16", "float16")
    )
    rows = []
    for cell in proto.cells():
        e = estimate(cell, proto, gpu)
        rows.append({"cell": cell.name, "task": cell.task.name, "method": cell.method.value, "seed": cell.seed,
                     "sweep": cell.sweep, "steps": cell.train.steps, "seconds": e.seconds,
                     "gpu_memory_gb": e.gpu_memory_gb, "device": "gpu" if gpu else "cpu"})
    return rows
