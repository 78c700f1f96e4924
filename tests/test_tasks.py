from collections import Counter

import pytest

from study.config import Method, TaskSpec, load_protocol
from study.paths import REPO
from study.tasks import ROWS, arithmetic, build, dpo_rows, grpo_rows, kto_rows, sft_rows, snark


def _user(messages):
    return next(m["content"] for m in messages if m["role"] == "user")


def test_snark_dataset_shape():
    rows = snark.load_rows()
    domains = Counter(r.domain for r in rows)
    assert len(rows) >= 300 and len(domains) >= 10
    assert len(set(snark.HELDOUT_DOMAINS) & set(domains)) >= 3
    assert len({r.id for r in rows}) == len(rows)
    assert len({r.prompt for r in rows}) == len(rows)
    for r in rows:
        assert r.persona and r.neutral and r.persona != r.neutral
        assert len(r.persona.split()) <= 50 and len(r.neutral.split()) <= 45  # short enough for CPU training
        assert snark.marker_count(r.neutral) == 0, r.id


def test_snark_splits_are_fixed():
    data = build(TaskSpec(name="snark"))
    assert {it.domain for it in data.heldout} == set(snark.HELDOUT_DOMAINS)
    assert not {it.domain for it in data.train} & set(snark.HELDOUT_DOMAINS)
    assert len(data.train) == 9 * 22 and len(data.split("test_in")) == 9 * 4 and len(data.heldout) == 3 * 26


@pytest.mark.parametrize(
    "spec",
    [TaskSpec(name="snark"), TaskSpec(name="arithmetic", n_train=200, n_heldout=50)],
    ids=["snark", "arithmetic"],
)
def test_no_heldout_prompt_reaches_training(spec):
    data = build(spec)
    evaluated = {it.prompt for it in data.items if it.split != "train"}
    for method, make in ROWS.items():
        rows = make(data)
        assert rows, method
        assert not {_user(r["prompt"]) for r in rows} & evaluated, method


def test_derivations_from_one_task():
    data = build(TaskSpec(name="snark"))
    by_prompt = {it.prompt: it for it in data.train}
    sft = sft_rows(data)
    assert all(r["completion"][0]["content"] == by_prompt[_user(r["prompt"])].good for r in sft)
    for r in dpo_rows(data):
        it = by_prompt[_user(r["prompt"])]
        assert r["chosen"][0]["content"] == it.good and r["rejected"][0]["content"] == it.bad
    kto = kto_rows(data)
    assert Counter(r["label"] for r in kto) == {True: len(data.train), False: len(data.train)}
    for r in kto:
        it = by_prompt[_user(r["prompt"])]
        assert r["completion"][0]["content"] == (it.good if r["label"] else it.bad)
    grpo = grpo_rows(data)
    assert len(grpo) == len(data.train) and all(set(r) == {"prompt", "item_id", "answer"} for r in grpo)
    assert ROWS[Method.grpo] is grpo_rows


def test_system_prompt_goes_first():
    data = build(TaskSpec(name="snark", system_prompt="Be brief."))
    msgs = sft_rows(data)[0]["prompt"]
    assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[1]["role"] == "user"


def test_arithmetic_exact_and_disjoint():
    train, held = arithmetic.problems(300, 100)
    assert len(train) == 300 and len(held) == 100
    assert not {(p.a, p.domain, p.b) for p in train} & {(p.a, p.domain, p.b) for p in held}
    assert arithmetic.problems(500, 100)[1] == held  # the held-out set does not move with n_train
    data = build(TaskSpec(name="arithmetic", n_train=300, n_heldout=100))
    for it in data.items:
        assert arithmetic.extract_answer(it.good) == it.answer
        assert arithmetic.extract_answer(it.bad) != it.answer
    p = arithmetic.Problem("x", "mul", 12, 11)
    assert p.answer == 132 and "12 * 11" in p.prompt


def _twin(p):
    return (p.domain, p.b, p.a) if p.domain in arithmetic.COMMUTATIVE else (p.domain, p.a, p.b)


@pytest.mark.parametrize(
    "n_train,n_heldout,ranges",
    [
        (4000, 500, {"add": (100, 999), "sub": (100, 999), "mul": (10, 99)}),  # the paper protocol's
        (20000, 2000, {"add": (1, 300), "sub": (1, 150), "mul": (2, 300)}),
    ],
)
def test_arithmetic_at_size_without_leakage(n_train, n_heldout, ranges):
    import time

    t0 = time.perf_counter()
    train, held = arithmetic.problems(n_train, n_heldout, ranges=ranges)
    assert time.perf_counter() - t0 < 3.0
    assert len(train) == n_train and len(held) == n_heldout
    assert len({p.id for p in train + held}) == n_train + n_heldout
    # No duplicate anywhere, and no held-out problem's commuted twin (b op a) in training.
    assert len({p.key for p in train + held}) == n_train + n_heldout
    held_ordered = {(p.domain, p.a, p.b) for p in held}
    assert not {(p.domain, p.a, p.b) for p in train} & held_ordered
    assert not {_twin(p) for p in train} & held_ordered
    lo_hi = {**arithmetic.DEFAULT_RANGES, **(ranges or {})}
    for p in train + held:
        lo, hi = lo_hi[p.domain]
        assert lo <= p.a <= hi and lo <= p.b <= hi
    assert Counter(p.domain for p in held) == {
        op: n_heldout // 3 + (i < n_heldout % 3) for i, op in enumerate(arithmetic.OPS)
    }
    # Both orders of a commuted problem occur (the display order is drawn, not always a <= b).
    assert any(p.a > p.b for p in held if p.domain == "add") and any(
        p.a < p.b for p in held if p.domain == "add"
    )


def test_arithmetic_task_spec_fields_and_capacity():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="widen (add|sub|mul)_range"):  # caught by `study validate`
        TaskSpec(name="arithmetic", n_train=4000, n_heldout=500)
    with pytest.raises(
        ValidationError, match="not a field of the snark task"
    ):  # one task's fields on another
        TaskSpec(name="snark", n_train=4000, n_heldout=500)
    default = build(TaskSpec(name="arithmetic"))  # the default sizes fit the default (calibrated) ranges
    assert len(default.train) == 1000 and len(default.heldout) == 100
    paper = load_protocol(REPO / "protocols/qwen2.5-3b.yaml")
    arith = next(t for t in paper.tasks if t.name == "arithmetic")
    train, held = build(arith).train, build(arith).heldout
    assert len(train) == 4000 and len(held) == 500
    data = build(TaskSpec(name="arithmetic", n_train=20, n_heldout=10, ops=["mul"], mul_range=(2, 9)))
    assert {it.domain for it in data.items} == {"mul"}
    assert all(2 <= arithmetic.extract_answer(it.good) <= 81 for it in data.items)
    assert arithmetic.capacity("mul", 2, 9) == 36 and arithmetic.capacity("sub", 2, 9) == 64
    with pytest.raises(ValueError, match="give 36"):
        arithmetic.problems(30, 10, ops=["mul"], ranges={"mul": (2, 9)})
    # A space asked for in full is enumerated exactly (the rejection stream still ends quickly).
    train, held = arithmetic.problems(26, 10, ops=["mul"], ranges={"mul": (2, 9)})
    assert {p.key for p in train + held} == {("mul", a, b) for a in range(2, 10) for b in range(a, 10)}


@pytest.mark.parametrize(
    "text,value",
    [
        ("The answer is 1,234.", 1234),
        ("-5 then 7", 7),
        ("no digits", None),
        ("12 - 30 = -18. The answer is -18.", -18),
    ],
)
def test_extract_answer(text, value):
    assert arithmetic.extract_answer(text) == value


def test_markers_and_stripping():
    text = "Oh, obviously the oven is hot. Shockingly, it works."
    assert snark.marker_count(text) == 3
    stripped = snark.strip_markers(text)
    assert snark.marker_count(stripped) == 0 and "oven is hot" in stripped
    assert snark.marker_count("A swow of truthful people") == 0  # whole words only
