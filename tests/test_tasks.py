from collections import Counter

import pytest

from study.config import Method, TaskSpec
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


@pytest.mark.parametrize("spec", [TaskSpec(name="snark"), TaskSpec(name="arithmetic", n_train=200, n_heldout=50)],
                         ids=["snark", "arithmetic"])
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


@pytest.mark.parametrize("text,value", [("The answer is 1,234.", 1234), ("-5 then 7", 7), ("no digits", None),
                                        ("12 - 30 = -18. The answer is -18.", -18)])
def test_extract_answer(text, value):
    assert arithmetic.extract_answer(text) == value


def test_markers_and_stripping():
    text = "Oh, obviously the oven is hot. Shockingly, it works."
    assert snark.marker_count(text) == 3
    stripped = snark.strip_markers(text)
    assert snark.marker_count(stripped) == 0 and "oven is hot" in stripped
    assert snark.marker_count("A swow of truthful people") == 0  # whole words only
