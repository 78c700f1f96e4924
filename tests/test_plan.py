"""study plan: the CPU estimate reproduces the measured figures it is built from, the GPU model counts GRPO's
generation, a method without a measurement falls back with a warning, and the totals (cost, SLURM wall time)
add up. Loads no model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from study import plan as P
from study.cli import app
from study.config import Method, load_protocol

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_bench(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "RESULTS", tmp_path)  # no results/bench/train.json: the FIELD_NOTES figures


def test_cpu_estimate_reproduces_the_measured_default_protocol(no_bench):
    # the protocol the CPU figures were measured with (`make study`, 2026-11-29: 39 min 51 s on 2 idle cores)
    proto = load_protocol(P.REFERENCE)
    rows = {(r["task"], r["method"]): r for r in P.plan_rows(proto)}
    sft = rows[("arithmetic", "sft")]
    assert sft["device"] == "cpu"
    assert sft["train_seconds"] == pytest.approx(17, rel=0.1)  # measured: 16.5-18.5 s for 16 SFT steps
    assert rows[("arithmetic", "grpo")]["train_seconds"] == pytest.approx(136, rel=0.1)  # measured 125-146 s
    # measured: the final adapter (newtask 9, KL 16, regression 39 s) and the step-8 checkpoint (8.5, 3, 39 s)
    assert sft["measure_seconds"] == pytest.approx(64 + 50.5, rel=0.01)
    # snark: newtask 36, KL 19, persona 31 s, and at step 8 KL 2.8 and persona 34 s
    assert rows[("snark", "control")]["measure_seconds"] == pytest.approx(86 + 36.8, rel=0.01)
    s = P.summary(proto, list(P.plan_rows(proto)), None)
    assert s["base_seconds"] == pytest.approx(143, rel=0.01)
    assert s["measure_seconds"] > s["train_seconds"]  # measurement dominates on this CPU, as measured


def test_cpu_measurement_scales_with_the_work(no_bench, write_protocol):
    small = load_protocol(REPO / "protocols" / "default.yaml")
    big = small.model_copy(update={"newtask": small.newtask.model_copy(update={"max_new_tokens": 96})})
    cell = small.cells()[0]
    a = P.estimate(cell, small, None).measure_seconds
    b = P.estimate(cell, big, None).measure_seconds
    assert b > a  # twice the new tokens: the newtask share doubles


def test_gpu_grpo_counts_generation():
    proto = load_protocol(REPO / "protocols" / "qwen2.5-3b.yaml")
    grpo = next(c for c in proto.cells() if c.method is Method.grpo)
    gpu = P.GPUS["A100-80GB"]
    hf = P.estimate(grpo, proto, gpu, "hf")
    vllm = P.estimate(grpo, proto, gpu, "vllm")
    t = grpo.train
    floor = t.steps * t.max_completion_length * P.DECODE_OVERHEAD_S["hf"]  # sequential decode steps alone
    assert hf.train_seconds > floor
    assert vllm.train_seconds < hf.train_seconds
    longer = grpo.model_copy(
        update={"train": t.model_copy(update={"max_completion_length": 4 * t.max_completion_length})}
    )
    assert P.estimate(longer, proto, gpu).train_seconds > hf.train_seconds + 2 * floor
    assert any("not measured" in a for a in hf.assumptions)
    sft = next(c for c in proto.cells() if c.method is Method.sft)
    assert P.estimate(sft, proto, gpu).train_seconds < hf.train_seconds
    # faster GPU, less time; memory does not depend on the GPU
    h100 = P.estimate(grpo, proto, P.GPUS["H100-80GB"])
    assert h100.seconds < hf.seconds and h100.peak_memory_gb == hf.peak_memory_gb


def test_a_method_without_a_measurement_falls_back_with_a_warning(no_bench, monkeypatch):
    monkeypatch.setattr(P, "CPU_SECONDS_PER_STEP", {Method.sft: 2.0, Method.grpo: 7.0})
    with pytest.warns(UserWarning, match="kto: no CPU measurement"):
        s, notes = P.cpu_seconds_per_step(Method.kto)
    assert s == 2.0 and notes  # the offline, non-generating stand-in, and the output says so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = load_protocol(REPO / "protocols" / "smoke.yaml")
        rows = P.plan_rows(proto)
    assert any("no CPU measurement" in a for r in rows if r["method"] == "kto" for a in r["assumptions"])


def test_array_wall_time():
    assert P.array_wall_seconds([10, 10, 10, 10], 2) == 20
    assert P.array_wall_seconds([10, 10, 10, 10], 16) == 10
    assert P.array_wall_seconds([5, 1, 1, 1], 1) == 8
    assert P.array_wall_seconds([], 4) == 0


def test_summary_cost_and_gpu_hours():
    proto = load_protocol(REPO / "protocols" / "qwen2.5-3b.yaml")
    rows = P.plan_rows(proto)
    assert rows[0]["device"] == P.DEFAULT_GPU and all(r["fits"] for r in rows)
    one = P.summary(proto, rows, P.DEFAULT_GPU, usd_per_gpu_hour=2.0)
    two = P.summary(proto, rows, P.DEFAULT_GPU, gpus_per_cell=2, usd_per_gpu_hour=2.0)
    assert one["usd"] == pytest.approx(one["gpu_hours"] * 2.0)
    assert two["gpu_hours"] == pytest.approx(2 * one["gpu_hours"])
    assert one["gpu_hours"] == pytest.approx(one["device_seconds"] / 3600)
    serial = P.summary(proto, rows, P.DEFAULT_GPU, array_parallelism=1)
    assert serial["slurm_wall_seconds"] > one["slurm_wall_seconds"] > max(r["seconds"] for r in rows)


def test_plan_cli_states_its_assumptions():
    out = CliRunner().invoke(
        app,
        [
            "plan",
            str(REPO / "protocols" / "qwen2.5-3b.yaml"),
            "--gpu",
            "H100-80GB",
            "--usd-per-gpu-hour",
            "2.5",
            "--array-parallelism",
            "8",
        ],
    )
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "GPU-hours" in text and "$" in text and "--array-parallelism 8" in text
    assert "assumption" in text and "not measured" in text and "GRPO generation counted" in text
    bad = CliRunner().invoke(app, ["plan", str(REPO / "protocols" / "qwen2.5-3b.yaml"), "--gpu", "TPU"])
    assert bad.exit_code == 2


def test_local_wall_time_with_workers_reproduces_the_measured_default(no_bench):
    """protocols/default.yaml with executor.workers 2: `make study` took 2320 s here (2026-11-30); the plan's
    one-process figure over the measured speed-up gives it back."""
    proto = load_protocol(REPO / "protocols" / "default.yaml")
    s = P.summary(proto, list(P.plan_rows(proto)), None)
    assert s["workers"] == 2
    assert s["local_wall_seconds"] == pytest.approx(2320, rel=0.05)
    one = proto.model_copy(update={"executor": proto.executor.model_copy(update={"workers": 1})})
    assert P.summary(one, list(P.plan_rows(one)), None)["local_wall_seconds"] == s["sequential_seconds"]
