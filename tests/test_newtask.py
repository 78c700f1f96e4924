"""New-task success must not reward damage: flattening the logits (temperature 3, no training) leaves the
primary success unchanged while the neutral answers' log-likelihood drops.

    .venv/bin/python -m pytest tests/test_newtask.py -q            # tiny model (seconds)
    .venv/bin/python -m pytest tests/test_newtask.py -q -m integration   # the bundled SmolLM2 (a minute)
"""

from contextlib import contextmanager

import pytest
import torch

from study.config import NewTaskEval, TaskSpec
from study.measure import newtask
from study.models import tiny_model, tiny_tokenizer
from study.tasks import build


@contextmanager
def flattened(model, temperature: float):
    """The same model with its logits divided by `temperature` (a hook on the output layer, so generate()
    and teacher-forced scoring both see it): a damaged model that learned nothing."""
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out / temperature)
    try:
        yield model
    finally:
        handle.remove()


def _value(out: dict, metric: str) -> float:
    return next(r["value"] for r in out["rows"] if r["metric"] == metric)


def _fitted_tiny(data, items, steps: int = 60):
    """The tiny random model fitted for a few steps on these items' reference answers, so that (like a real
    LM on fluent text) it predicts them better than chance -- the regime where flattening costs likelihood."""
    torch.manual_seed(0)
    model, tok = tiny_model(0), tiny_tokenizer()
    texts = [
        tok.apply_chat_template(
            data.messages(it.prompt) + [{"role": "assistant", "content": ans}], tokenize=False
        )
        for it in items
        for ans in (it.good, it.bad)
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok


def test_flattening_does_not_raise_success_but_lowers_neutral_loglik():
    data = build(TaskSpec(name="snark"))
    cfg = NewTaskEval(max_new_tokens=12, limit=6, batch_size=12)
    model, tok = _fitted_tiny(data, data.heldout[: cfg.limit])
    base = newtask.run(model, tok, data, cfg)
    with flattened(model, 3.0):
        flat = newtask.run(model, tok, data, cfg)
    # Greedy answers are the argmax, which a temperature does not move: the primary success is unchanged.
    gen = [r["response"] for r in base["responses"] if r["metric"] == "newtask/generation"]
    assert gen == [r["response"] for r in flat["responses"] if r["metric"] == "newtask/generation"]
    assert _value(flat, "newtask/success") <= _value(base, "newtask/success") + 1e-9
    # ... while the damage shows where it should.
    assert _value(flat, "newtask/neutral_loglik") < _value(base, "newtask/neutral_loglik") - 0.1
    assert _value(flat, "newtask/persona_loglik") < _value(base, "newtask/persona_loglik") - 0.1
    # The former measure, sigmoid of the margin, moves toward 0.5 under flattening: the confound the new
    # primary measure avoids.
    m_base, m_flat = _value(base, "newtask/pref_margin"), _value(flat, "newtask/pref_margin")
    assert abs(m_flat) < abs(m_base)
    assert abs(_value(flat, "newtask/pref_sigmoid") - 0.5) < abs(_value(base, "newtask/pref_sigmoid") - 0.5)


def test_rows_and_paired_records():
    data = build(TaskSpec(name="snark"))
    cfg = NewTaskEval(max_new_tokens=4, limit=3, batch_size=8)
    out = newtask.run(tiny_model(0), tiny_tokenizer(), data, cfg)
    metrics = {r["metric"] for r in out["rows"]}
    for m in (
        "success",
        "persona_rate",
        "pref_sigmoid",
        "pref_win_rate",
        "pref_margin",
        "neutral_loglik",
        "persona_loglik",
    ):
        assert f"newtask/{m}" in metrics and f"newtask/{m}_indomain" in metrics
    success = _value(out, "newtask/success")
    scores = [r["score"] for r in out["responses"] if r["metric"] == "newtask/generation"]
    assert 0 <= success <= 1 and success == pytest.approx(sum(scores) / len(scores))
    recs = [r for r in out["responses"] if r["metric"] == "newtask/pref_margin"]
    picked = newtask.balanced_head(data.heldout, 3)
    assert len({it.domain for it in picked}) == 3  # one per held-out domain, not the first domain's three
    assert [r["id"] for r in recs] == [it.id for it in picked]
    for r in recs:
        assert r["margin"] == pytest.approx(r["persona_loglik"] - r["neutral_loglik"])
        assert r["neutral_loglik"] < 0


@pytest.mark.slow
@pytest.mark.integration
def test_flattening_on_bundled_model():
    from study.models import load_model, load_tokenizer, resolve_runtime

    src = "bundled:smollm2-135m-instruct"
    model, tok = load_model(src, resolve_runtime("cpu", "float32")), load_tokenizer(src)
    data = build(TaskSpec(name="snark"))
    cfg = NewTaskEval(max_new_tokens=48, limit=12, batch_size=12)
    base = newtask.run(model, tok, data, cfg)
    with flattened(model, 3.0):
        flat = newtask.run(model, tok, data, cfg)
    assert _value(flat, "newtask/success") == pytest.approx(_value(base, "newtask/success"), abs=0.02)
    assert _value(flat, "newtask/neutral_loglik") < _value(base, "newtask/neutral_loglik") - 0.5


def test_balanced_head_deals_round_robin_and_keeps_order():
    data = build(TaskSpec(name="snark"))
    held = data.heldout
    head = newtask.balanced_head(held, 48)
    per = {}
    for it in head:
        per[it.domain] = per.get(it.domain, 0) + 1
    assert len(head) == 48 and set(per.values()) == {16}  # 3 held-out domains x 16, not 26 + 22 + 0
    assert [it.id for it in head] == [it.id for it in held if it in head]  # the split's order kept
    assert newtask.balanced_head(held, None) == list(held) == newtask.balanced_head(held, 10_000)


def test_reference_limit_scores_fewer_references():
    data = build(TaskSpec(name="snark"))
    cfg = NewTaskEval(max_new_tokens=4, limit=6, reference_limit=3, batch_size=8)
    out = newtask.run(tiny_model(0), tiny_tokenizer(), data, cfg)
    gens = [r for r in out["responses"] if r["metric"] == "newtask/generation"]
    refs = [r for r in out["responses"] if r["metric"] == "newtask/pref_margin"]
    assert len(gens) == 6 and len(refs) == 3 and len({r["domain"] for r in refs}) == 3
    assert {r["id"] for r in refs} <= {r["id"] for r in gens}
