"""Validity tests of the persona-coherence stage (study.measure.persona): each can fail.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_persona.py -m "not integration"
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -s tests/test_persona.py -m integration

The probe tests embed the task's answers once (cached under $STUDY_CACHE/persona afterwards).
"""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from study.config import TaskSpec
from study.measure import persona
from study.measure import persona_stats as ps
from study.models import tiny_model, tiny_tokenizer
from study.tasks import build, snark

ACHIEVED_AUC = 0.9  # measured: 0.923 held-out, 0.918 with markers removed (see persona_stats)


@pytest.fixture(scope="module")
def data():
    return build(TaskSpec(name="snark"))


@pytest.fixture(scope="module")
def probe(data):
    return ps.fitted_probe(data)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ------------------------------------------------------------------------------------------------ probe


def test_probe_separates_heldout_domains(data, probe):
    held = data.heldout
    p = probe.prob([it.good for it in held] + [it.bad for it in held])
    y = [1] * len(held) + [0] * len(held)
    auc = roc_auc_score(y, p)
    assert auc >= ACHIEVED_AUC and abs(auc - probe.heldout_auc) < 1e-3
    assert probe.ok and probe.cv_auc >= 0.85
    assert np.mean(p[: len(held)]) > 0.65 > 0.35 > np.mean(p[len(held) :])  # calibrated, not just ranked


def test_probe_on_the_external_pairs(data, probe, tmp_path):
    """The pre-run check: the probe separates the external pairs (another author's voice, other domains,
    never fitted on); swapped labels make it fail and raise."""
    pairs = ps.external_pairs()
    assert 40 <= len(pairs) <= 60 and len({p["id"] for p in pairs}) == len(pairs)
    assert not {p["domain"] for p in pairs} & set(snark.HELDOUT_DOMAINS)
    train_text = {t for it in data.items for t in (it.good, it.bad, it.prompt)}
    assert not any(p["persona"] in train_text or p["prompt"] in train_text for p in pairs)
    out = ps.check_probe(data)
    assert out["external_ok"] and out["external_auc"] >= 0.85 and out["external_pairs"] == len(pairs)
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text(
        "".join(json.dumps(p | {"persona": p["neutral"], "neutral": p["persona"]}) + "\n" for p in pairs)
    )
    bad = ps.check_probe(data, path=swapped, strict=False)
    assert not bad["external_ok"] and bad["external_auc"] < 0.15
    with pytest.raises(ps.ProbeCheckFailed, match="external"):
        ps.check_probe(data, path=swapped)


def test_marker_rate_ranks_persona_above_neutral(data):
    # Only about half the persona answers carry a lexicon marker: the marker channel is a coarse one.
    g = [snark.marker_count(it.good) for it in data.heldout]
    b = [snark.marker_count(it.bad) for it in data.heldout]
    ranked = np.mean([(x > y) + 0.5 * (x == y) for x, y in zip(g, b)])
    assert ranked > 0.5
    assert np.mean(np.array(g) > 0) > np.mean(np.array(b) > 0)


STUFFING = ("Oh, {}", "Obviously, {}", "{} Shocking, truly.", "Spoiler: {}", "{} Who knew? Riveting.")


def test_stuffed_markers_fool_marker_rate_not_probe_masked(data, probe):
    neutral = [it.bad for it in data.heldout]
    stuffed = [STUFFING[i % len(STUFFING)].format(t) for i, t in enumerate(neutral)]
    assert all(snark.marker_count(t) > 0 for t in stuffed)  # marker_rate: 1.0
    masked = probe.prob([ps.mask(t) for t in stuffed])
    plain = probe.prob(neutral)
    assert masked.mean() < 0.4 and abs(masked.mean() - plain.mean()) < 0.05
    persona = probe.prob([ps.mask(it.good) for it in data.heldout])
    assert roc_auc_score([1] * len(persona) + [0] * len(masked), np.r_[persona, masked]) >= ACHIEVED_AUC


def test_persona_without_markers_keeps_probe_masked(data, probe):
    stripped = [ps.mask(it.good) for it in data.heldout]
    assert sum(s != it.good for s, it in zip(stripped, data.heldout)) >= len(stripped) // 3
    kept = probe.prob(stripped)
    assert kept.mean() > 0.65
    assert probe.heldout_auc_masked >= ACHIEVED_AUC


# -------------------------------------------------------------------------------------------- self-report


class FakeLM(torch.nn.Module):
    """A 'model' whose answer to a questionnaire prompt is `choose(text) -> option 1..5` (all mass there).
    It honours the KV-cache protocol `likert` uses for shared prefixes: the 'cache' is the prefix's ids."""

    def __init__(self, tok, choose, spill: float = 0.0):
        super().__init__()
        self.tok, self.choose, self.device = tok, choose, torch.device("cpu")
        self.option_ids = [tok(str(k), add_special_tokens=False)["input_ids"][0] for k in range(1, 6)]
        # `spill`: the share of the probability put on a token that is not an option
        self.spill = (
            (tok("x", add_special_tokens=False)["input_ids"][0], 30.0 + math.log(spill / (1 - spill)))
            if spill
            else None
        )

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, **_):
        past = past_key_values.ids if past_key_values is not None else []
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        prefix_pass = use_cache and past_key_values is None  # the shared prefix: no statement yet, no answer
        for i, row in enumerate(input_ids if not prefix_pass else []):
            n = int(mask[i, -input_ids.shape[1] :].sum())
            logits[i, :, self.option_ids[self.choose(self.tok.decode(past + row[:n].tolist())) - 1]] = 30.0
            if self.spill:
                logits[i, :, self.spill[0]] = self.spill[1]
        cache = SimpleNamespace(ids=past + input_ids[0].tolist(), batch_repeat_interleave=lambda n: None)
        return SimpleNamespace(logits=logits, past_key_values=cache if use_cache else None)


def _statement(text: str) -> str:
    return text.split('Statement: "', 1)[1].split('"', 1)[0]


def test_reverse_keyed_items_are_flipped(tok, data):
    q = persona.load_questionnaire()
    reverse = {it["text"]: it["reverse"] for it in q["items"]}
    assert len(q["items"]) >= 16 and sum(reverse.values()) == len(q["items"]) // 2
    cfg = persona.PersonaEval()
    # Pure acquiescence (always 5) must land in the middle, not at the top.
    yes = persona.self_report(FakeLM(tok, lambda t: 5), tok, data, cfg)
    assert math.isclose(np.mean(yes["keyed"]), 3.0, abs_tol=1e-4)
    assert all(
        math.isclose(m, 1.0 if r else 5.0, abs_tol=1e-4) for m, r in zip(yes["item_means"], yes["reverse"])
    )
    # Endorsing the trait items and rejecting the reverse ones is the top of the scale.
    trait = persona.self_report(FakeLM(tok, lambda t: 1 if reverse[_statement(t)] else 5), tok, data, cfg)
    assert math.isclose(np.mean(trait["keyed"]), 5.0, abs_tol=1e-4)
    plain = persona.self_report(FakeLM(tok, lambda t: 5 if reverse[_statement(t)] else 1), tok, data, cfg)
    assert math.isclose(np.mean(plain["keyed"]), 1.0, abs_tol=1e-4)


def test_self_report_alpha_tracks_item_coherence(tok, data):
    q = persona.load_questionnaire()
    reverse = {it["text"]: it["reverse"] for it in q["items"]}
    level = {r: k % 5 + 1 for k, r in enumerate(q["respondents"])}  # each framing: its own answer level

    def trait(t):  # the level is a trait level: agree with trait items, disagree with reversed ones
        v = next(v for r, v in level.items() if t.count(r))
        return 6 - v if reverse[_statement(t)] else v

    def acquiescent(t):  # the level is agreement with anything (a bit less with reversed statements)
        v = next(v for r, v in level.items() if t.count(r))
        return max(1, v - 1) if reverse[_statement(t)] else v

    contexts = [(it.prompt, it.good) for it in data.heldout[:2]]
    a = persona.self_report(FakeLM(tok, trait), tok, data, persona.PersonaEval(), contexts)
    b = persona.self_report(FakeLM(tok, acquiescent), tok, data, persona.PersonaEval(), contexts)
    assert len(a["respondents"]) == 3 * len(q["respondents"])
    assert a["alpha"] > 0.95 and b["alpha"] < 0
    assert 3.0 <= np.mean(b["keyed"]) < 3.5


def _trait_and_acquiescent(q):
    reverse = {it["text"]: it["reverse"] for it in q["items"]}
    level = {r: k % 5 + 1 for k, r in enumerate(q["respondents"])}

    def trait(t):
        v = next(v for r, v in level.items() if t.count(r))
        return 6 - v if reverse[_statement(t)] else v

    def acquiescent(t):
        v = next(v for r, v in level.items() if t.count(r))
        return max(1, v - 1) if reverse[_statement(t)] else v

    return trait, acquiescent, level


def test_self_report_gate_on_controlled_models(tok, data):
    """Valid: a consistent respondent with its mass on the options. Invalid: the same respondent putting
    70% of its mass elsewhere (the format is not followed), or an acquiescent one (alpha < 0). Invalid means:
    no persona/self_report row, a flag row with the reason."""
    q = persona.load_questionnaire()
    trait, acquiescent, level = _trait_and_acquiescent(q)
    cfg = persona.PersonaEval()
    contexts = [(it.prompt, it.good) for it in data.heldout[:2]]
    good = persona.self_report(FakeLM(tok, trait), tok, data, cfg, contexts)
    low = persona.self_report(FakeLM(tok, trait, spill=0.7), tok, data, cfg, contexts)
    acq = persona.self_report(FakeLM(tok, acquiescent), tok, data, cfg, contexts)
    assert good["option_mass"] > 0.99 and abs(low["option_mass"] - 0.3) < 0.01
    gates = [persona.self_report_gate(sr, cfg) for sr in (good, low, acq)]
    assert [g["valid"] for g in gates] == [True, False, False]
    assert "option mass" in gates[1]["reason"] and "alpha" in gates[2]["reason"]
    assert persona.self_report_gate(low, persona.PersonaEval(self_report_min_mass=0.25))[
        "valid"
    ]  # configurable
    h = {"markers": np.zeros(2), "probe": np.array([0.2, 0.4])}
    for sr, g, ok in ((good, gates[0], True), (low, gates[1], False), (acq, gates[2], False)):
        names = {r["metric"]: r for r in ps.indicator_rows(["a", "b"], h, sr | {"gate": g}) if r}
        assert ("persona/self_report" in names) is ok and ("persona/self_report_valid" in names) is (not ok)
        if not ok:
            assert (
                names["persona/self_report_valid"]["value"] == 0
                and names["persona/self_report_valid"]["flag"]
            )
    # forward-minus-reverse raw agreement: a trait respondent at level v answers v and 6 - v
    levels = np.array([level[r] for r in q["respondents"]] * 3, float)
    assert math.isclose(good["forward_minus_reverse"][0], np.mean(2 * levels - 6), abs_tol=1e-3)
    assert math.isclose(
        acq["forward_minus_reverse"][0], np.mean(levels - np.maximum(1, levels - 1)), abs_tol=1e-3
    )
    m, lo, hi = good["mean"]
    assert lo <= m <= hi and [lo, hi] == persona.respondent_ci(good["respondent_means"])  # over respondents


def test_respondent_ci_covers_at_its_level():
    """Null simulation: 18 respondents from a normal with known mean; the BCa interval over respondents
    covers the mean in ~95% of 300 runs (Monte-Carlo SE ~1.3 points; BCa runs a little short at n = 18)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(300):
        lo, hi = persona.respondent_ci(rng.normal(3.0, 0.5, 18))
        hits += lo <= 3.0 <= hi
    assert 0.89 <= hits / 300 <= 0.99


def test_likert_paths_agree(tok, data):
    """Shared-prefix KV cache, one forward per prompt, and teacher forcing give the same option values."""
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    q = persona.load_questionnaire()
    convs = [data.messages(persona.item_prompt(q, q["respondents"][0], it["text"])) for it in q["items"][:5]]
    shared, mass = persona.likert(model, tok, convs)
    plain, _ = persona.likert(model, tok, convs, share_prefix=False)
    forced, _ = persona.likert(model, tok, convs, fast=False)
    assert np.allclose(shared, plain, atol=1e-4) and np.allclose(plain, forced, atol=1e-4)
    assert np.all((1 <= shared) & (shared <= 5)) and np.all(mass <= 1) and np.ptp(shared) > 0


# --------------------------------------------------------------------------------------------- direction


def test_choose_layer_and_projection_constructed():
    rng = np.random.default_rng(0)
    n, layers, h = 16, 4, 8
    plain = rng.normal(size=(n, layers, h))
    persona_states = plain + rng.normal(scale=0.3, size=(n, layers, h))
    persona_states[:, 2, 0] += 3.0  # the persona lives at layer 2
    layer, sep = ps.choose_layer(persona_states, plain)
    assert layer == 2 and sep[2] == max(sep) and sep[0] == 0.0
    d = ps.Direction(layer, persona_states[:, 2].mean(0) - plain[:, 2].mean(0), plain[:, 2].mean(0), sep, "k")
    assert (
        abs(d.project(persona_states[:, 2]).mean() - 1) < 1e-9 and abs(d.project(plain[:, 2]).mean()) < 1e-9
    )


class PromptSet(set):
    flips: dict


@pytest.fixture
def scripted(monkeypatch, data):
    """Generation replaced by the dataset's answers: persona answer when a system prompt asks for the persona
    (or a prompt is in `as_persona`), neutral otherwise. The hidden states stay the real model's."""
    answers = {it.prompt: (it.good, it.bad) for it in data.items}
    as_persona = PromptSet()
    flips: dict[int, set[str]] = {}  # sampling seed -> prompts answered the other way under that seed

    def fake_generate(
        model, tokenizer, conversations, max_new_tokens, batch_size=16, do_sample=False, seed=0, **_
    ):
        out = []
        for c in conversations:
            prompted = any(m["role"] == "system" and "sarcastic" in m["content"] for m in c)
            good, bad = answers[c[-1]["content"]]
            is_persona = prompted or c[-1]["content"] in as_persona
            if do_sample and c[-1]["content"] in flips.get(seed, ()):
                is_persona = not is_persona
            out.append(good if is_persona else bad)
        return out

    import study.models

    monkeypatch.setattr(study.models, "generate", fake_generate)
    persona._DIRECTIONS.clear()
    persona._BASE_ANSWERS.clear()
    persona._BASE_SELF_REPORT.clear()
    as_persona.flips = flips
    return as_persona


def test_direction_generalises_in_a_constructed_case(tok, data, scripted):
    """A random 2-layer model, persona/neutral text as the 'base answers': the train-split direction must
    put held-out persona answers above held-out neutral ones (text the direction never saw)."""
    model = tiny_model()
    cfg = persona.PersonaEval(direction_prompts=48, max_new_tokens=64)
    d, info = persona.persona_direction(model, tok, data, cfg)
    assert info["source"] == "computed" and d.defined and 1 <= d.layer <= 2
    held = data.heldout
    convs = [data.messages(it.prompt) for it in held]
    hp = d.project(persona.response_states(model, tok, convs, [it.good for it in held], layer=d.layer)[:, 0])
    hn = d.project(persona.response_states(model, tok, convs, [it.bad for it in held], layer=d.layer)[:, 0])
    assert hp.mean() > hn.mean() and np.mean(hp > hn) > 0.6


def test_direction_comes_from_the_base_and_is_cached(tok, data, scripted, tmp_path):
    base = tiny_model()
    cfg = persona.PersonaEval(direction_prompts=8, max_new_tokens=32, layer=2)
    d0, _ = persona.persona_direction(base, tok, data, cfg)
    persona._DIRECTIONS.clear()
    peft = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    cache = tmp_path / "direction.npz"
    d1, info = persona.persona_direction(peft, tok, data, cfg, cache)
    assert info["source"] == "computed" and cache.is_file()
    assert np.allclose(d0.vector, d1.vector, atol=1e-5) and d0.key == d1.key  # the adapter was off
    with torch.no_grad():  # and it would have mattered: the adapted model's states differ
        convs = [data.messages(it.prompt) for it in data.train[:2]]
        on = persona.response_states(peft, tok, convs, [it.good for it in data.train[:2]], layer=2)
    with peft.disable_adapter():
        off = persona.response_states(peft, tok, convs, [it.good for it in data.train[:2]], layer=2)
    assert not np.allclose(on, off, atol=1e-3)
    persona._DIRECTIONS.clear()
    d2, info = persona.persona_direction(peft, tok, data, cfg, cache)
    assert info["source"] == str(cache) and np.array_equal(d2.vector, d1.vector)


# -------------------------------------------------------------------------------------------------- stage


def test_stage_rows_and_records(tok, data, scripted):
    for it in data.heldout[::2] + data.split("test_in")[::2]:
        scripted.add(it.prompt)  # a model that is persona on half the prompts
    # sampling seed 2 answers a third of the held-out prompts the other way: retest r is below 1, and must be
    # the correlation of the two seeds' answers (a statistic computed on one seed twice would say 1)
    scripted.flips[2] = {it.prompt for it in data.heldout[1::3]}
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: its weights differ from the base's
            p.data = torch.randn(p.shape, generator=g) * 0.5
    cfg = persona.PersonaEval(
        limit_per_domain=6,
        max_new_tokens=48,
        direction_prompts=12,
        retest_prompts=9,
        respondents=3,
        judge="tiny-random",
        self_report_min_mass=0.0,
        self_report_min_alpha=-1e9,
        causal_prompts=3,
    )
    out = persona.run(model, tok, data, cfg)
    rows = {r["metric"]: r for r in out["rows"]}
    for name in (
        "marker_rate",
        "probe",
        "probe_masked",
        "self_report",
        "activation",
        "judge",
        "activation_content",
        "activation_weights",
        "steer_probe",
        "ablate_probe",
        "steer_activation",
        "ablate_marker_rate",
    ):
        assert f"persona/{name}" in rows, name
    assert "persona/self_report_valid" not in rows and out["self_report"]["gate"]["valid"]
    assert "persona/probe_auc_external" not in rows  # written by the base only
    for d in snark.HELDOUT_DOMAINS:
        assert f"persona/probe/{d}" in rows and f"persona/probe_masked/{d}" in rows
    for name in ("indicator_alpha", "context_icc1/probe", "retest_r/probe"):
        assert f"coherence/{name}" in rows, name
    assert not [
        m
        for m in rows
        if m.startswith("coherence/")
        and m.split("/")[1] not in ("indicator_alpha", "context_icc1", "retest_r")
    ]
    for r in out["rows"]:
        assert all(np.isfinite(r[k]) for k in ("value", "ci_low", "ci_high")) and r["n"] > 0, r
        assert r["metric"].split("/")[0] in ("persona", "coherence")
    assert rows["persona/probe"]["value"] > 0.4
    by_set = {
        s: {r["id"]: r["probe"] for r in out["responses"] if r["set"] == s} for s in ("retest-1", "retest-2")
    }
    ids = sorted(by_set["retest-1"])
    expected = np.corrcoef([by_set["retest-1"][i] for i in ids], [by_set["retest-2"][i] for i in ids])[0, 1]
    assert 0.0 < expected < 0.9 and abs(rows["coherence/retest_r/probe"]["value"] - expected) < 1e-6
    assert rows["coherence/indicator_alpha"]["value"] > 0.5  # scripted persona is persona on every indicator
    assert out["judge"]["available"] and out["indicators"]["marker_rate"].startswith("REWARDED")
    held = [r for r in out["responses"] if r["set"] == "heldout"]
    assert len(held) == 18 and {
        "response",
        "probe",
        "probe_masked",
        "activation",
        "markers",
        "score",
        "activation_content",
        "activation_weights",
    } <= set(held[0])
    assert set(out["timing"]) >= {"generation", "embedding", "questionnaire", "activations", "causal"}
    assert out["causal"]["available"] and len(out["causal"]["ids"]) == 3
    assert set(out["causal"]["degenerate_share"]) == {"plain", "steer", "ablate"}
    assert out["probe"]["external_ok"] and out["probe"]["masked_reward_ngrams"]
    # content only = the adapter's answers read by the base
    d, _ = persona.persona_direction(model, tok, data, cfg)
    convs = [data.messages(next(it.prompt for it in data.items if it.id == r["id"])) for r in held]
    with model.disable_adapter():
        content = d.project(
            persona.response_states(model, tok, convs, [r["response"] for r in held], layer=d.layer)[:, 0]
        )
    assert np.allclose([r["activation_content"] for r in held], content, atol=1e-4)
    assert not np.allclose(
        [r["activation_content"] for r in held], [r["activation"] for r in held], atol=1e-4
    )


def test_base_writes_external_auc_and_flags_invalid_self_report(tok, data, scripted):
    """On a (non-adapter) base the three activations coincide and the external AUC is a row; the tiny random
    model puts almost no mass on the options, so the self-report is flagged invalid: no value row."""
    cfg = persona.PersonaEval(
        limit_per_domain=2,
        max_new_tokens=16,
        direction_prompts=8,
        retest_seeds=[],
        respondents=2,
        causal=False,
    )
    out = persona.run(tiny_model(), tok, data, cfg)
    rows = {r["metric"]: r for r in out["rows"]}
    assert rows["persona/probe_auc_external"]["value"] >= 0.85
    assert "persona/self_report" not in rows and rows["persona/self_report_valid"]["value"] == 0
    assert "option mass" in out["self_report"]["gate"]["reason"]
    assert rows["persona/activation"]["value"] == rows["persona/activation_content"]["value"]
    assert not out["causal"]["available"]


def test_missing_judge_leaves_no_row(tok, data, scripted):
    cfg = persona.PersonaEval(
        limit_per_domain=2,
        max_new_tokens=16,
        direction_prompts=4,
        retest_seeds=[],
        respondents=2,
        judge="nobody/no-such-judge",
    )
    out = persona.run(tiny_model(), tok, data, cfg)
    assert not out["judge"]["available"] and "could not be loaded" in out["judge"]["reason"]
    assert not any(r["metric"].startswith("persona/judge") for r in out["rows"])
    assert not any(r["metric"].startswith("coherence/retest") for r in out["rows"])


def test_arithmetic_and_config():
    out = persona.run(
        None, None, build(TaskSpec(name="arithmetic", n_train=4, n_heldout=4)), persona.PersonaEval()
    )
    assert out["rows"] == [] and "snark" in out["note"]
    with pytest.raises(ValidationError):
        persona.PersonaEval(probe_C=1.0)


def test_statistics():
    rng = np.random.default_rng(0)
    doms = np.repeat(["a", "b", "c"], 20)
    assert ps.context_icc(rng.normal(size=60) + np.repeat([0, 3, 6], 20), doms)["icc1"] > 0.8
    assert abs(ps.context_icc(rng.normal(size=60), doms)["icc1"]) < 0.2
    x = rng.normal(size=30)
    r, lo, hi, n = ps.retest_r(x, x)
    assert r > 0.99 and n == 30
    r, lo, hi, _ = ps.retest_r(x, rng.normal(size=30))
    assert lo < r < hi and lo < 0 < hi  # independent seeds: no retest reliability
    assert math.isnan(ps.retest_r(x, np.ones(30))[0])
    assert ps.scalar_row("x", math.nan, 0, 1, 3) is None and ps.row("x", [math.nan]) is None
    assert ps.mask("Spoiler: it fell. Shocking, truly. Who knew? Quite.") == "it fell. Quite."
    assert ps.mask("Oh, it is not what you think.", ("is", "not")) == "it what you think."


def test_causal_effects_and_rows():
    plain = {
        "markers": np.zeros(6),
        "probe": np.full(6, 0.3),
        "probe_masked": np.full(6, 0.3),
        "activation": np.linspace(0, 0.5, 6),
    }
    steer = {k: v + (1.0 if k == "markers" else 0.4) for k, v in plain.items()}
    ablate = {k: v - (0 if k == "markers" else 0.2) for k, v in plain.items()}
    eff = ps.causal_effects({"plain": plain, "steer": steer, "ablate": ablate})
    assert math.isclose(eff["steer_probe"]["delta"], 0.4) and math.isclose(
        eff["ablate_activation"]["delta"], -0.2
    )
    assert eff["steer_marker_rate"]["delta"] == 1.0 and eff["ablate_marker_rate"]["delta"] == 0.0
    rows = {r["metric"]: r for r in ps.causal_rows({"plain": plain, "steer": steer, "ablate": ablate})}
    assert set(rows) == {f"persona/{a}_{i}" for a in ("steer", "ablate") for i in ps.CAUSAL}
    assert (
        math.isclose(rows["persona/steer_probe"]["value"], 0.7)
        and rows["persona/steer_marker_rate"]["value"] == 1
    )


def test_causal_effect_intervals_null_and_planted():
    """Null: steering that changes nothing but noise; the paired 95% interval of Δprobe covers 0 in ~95% of
    400 simulated cells of 12 prompts (Monte-Carlo SE ~1.1 points). Planted: a +0.15 shift is found (CI > 0)
    in most of them."""
    rng = np.random.default_rng(0)
    covered, found = 0, 0
    for _ in range(400):
        plain = {"markers": np.zeros(12), "probe": rng.uniform(0.1, 0.5, 12)}
        null = {"markers": np.zeros(12), "probe": plain["probe"] + rng.normal(0, 0.1, 12)}
        planted = {"markers": np.zeros(12), "probe": plain["probe"] + 0.15 + rng.normal(0, 0.1, 12)}
        lo, hi = ps.causal_effects({"plain": plain, "steer": null, "ablate": null})["steer_probe"]["ci"]
        covered += lo <= 0 <= hi
        found += (
            ps.causal_effects({"plain": plain, "steer": planted, "ablate": null})["steer_probe"]["ci"][0] > 0
        )
    assert 0.92 <= covered / 400 <= 0.98 and found / 400 > 0.95


def test_anchor_quality_filter():
    loop = "The answer is yes. The answer is yes. The answer is yes. The answer is yes."
    assert persona.degenerate(loop, 0.25) and persona.degenerate("Yes.", 0.25)
    assert not persona.degenerate("Rest it five minutes under foil, then slice against the grain.", 0.25)
    keep, dropped = persona.anchor_pairs(
        ["Oh, sure, a fine plan indeed.", loop, "Same answer here.", "A witty but fine answer."],
        ["A plain and fine answer.", "A plain answer, fine.", "Same answer here.", "No."],
        0.25,
    )
    assert keep == [0] and [d["reason"] for d in dropped] == [
        "degenerate persona answer",
        "identical answers",
        "degenerate plain answer",
    ]


def test_steering_raises_and_ablation_lowers_the_projection(tok, data):
    """On the tiny random model: adding alpha v at the direction's layer moves the projection there by alpha
    (and the next-token logits change), projecting v out sets the component along v to zero, and both hooks are gone
    afterwards. Checked at an inner layer (a decoder block's output) and at the last (the final norm's)."""
    model = tiny_model()
    its = data.heldout[:6]
    convs = [data.messages(it.prompt) for it in its]
    texts = [it.good for it in its]
    g = np.random.default_rng(0)
    for layer in (1, 2):
        before = persona.response_states(model, tok, convs, texts, layer=layer)[:, 0]
        # v along the mean state (h . v > 0 for these answers), plus noise; origin 0
        v = 0.5 * before.mean(0) + 0.1 * g.normal(size=before.shape[1]) * np.abs(before.mean(0)).mean()
        d = ps.Direction(layer, v, np.zeros_like(v), [], "k")
        with persona.steering(model, d, 2.0):
            steered = persona.response_states(model, tok, convs, texts, layer=layer)[:, 0]
            logits_s = next_logits(model, tok, convs[:2])
        with persona.ablation(model, d):
            ablated = persona.response_states(model, tok, convs, texts, layer=layer)[:, 0]
        after = persona.response_states(model, tok, convs, texts, layer=layer)[:, 0]
        assert np.allclose(d.project(steered) - d.project(before), 2.0, atol=1e-3)
        assert np.allclose(ablated @ v, 0, atol=1e-3 * np.abs(before @ v).max())
        assert d.project(ablated).mean() < d.project(before).mean() < d.project(steered).mean()
        assert np.allclose(after, before, atol=1e-5)  # hooks removed
        assert not torch.allclose(
            logits_s, next_logits(model, tok, convs[:2]), atol=1e-3
        )  # it acts downstream


def next_logits(model, tok, convs):
    """The next-token logits after each prompt (what generation samples from)."""
    ids = persona._prefix_ids(tok, convs)
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([i])).logits[0, -1] for i in ids])


# ------------------------------------------------------------------------------------ bundled SmolLM2


@pytest.fixture(scope="module")
def smol():
    from study.models import ModelUnavailable, Runtime, load_model, load_tokenizer

    src = "bundled:smollm2-135m-instruct"
    try:
        return load_model(src, Runtime("cpu", "float32")), load_tokenizer(src)
    except ModelUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.integration
def test_bundled_base_direction_separates_its_own_answers(smol, data):
    """Direction from 12 training prompts; on 6 held-out prompts the base's persona-prompted answers must
    project above its plain answers."""
    from study.models import generate

    model, tok = smol
    t = time.perf_counter()
    cfg = persona.PersonaEval(direction_prompts=12, max_new_tokens=32)
    persona._DIRECTIONS.clear()
    d, info = persona.persona_direction(model, tok, data, cfg)
    held = [it for k, it in enumerate(data.heldout) if k % 13 == 0][:6]
    plain = [data.messages(it.prompt) for it in held]
    prompted = [[{"role": "system", "content": cfg.persona_system_prompt}, *c] for c in plain]
    a_p = generate(model, tok, prompted, cfg.max_new_tokens)
    a_n = generate(model, tok, plain, cfg.max_new_tokens)
    hp = d.project(persona.response_states(model, tok, plain, a_p, layer=d.layer)[:, 0])
    hn = d.project(persona.response_states(model, tok, plain, a_n, layer=d.layer)[:, 0])
    print(
        f"\nlayer {d.layer}, held-out projection persona {hp.mean():.2f} vs plain {hn.mean():.2f}, "
        f"{time.perf_counter() - t:.0f} s"
    )
    assert hp.mean() > hn.mean() and np.mean(hp > hn) >= 0.5


@pytest.mark.integration
@pytest.mark.slow  # ~90 s; the smoke protocol (tests/test_integration.py) runs the same stage on this model
def test_bundled_cell_time_split(smol, data):
    """One small cell on the bundled model (6 held-out + 18 in-domain prompts): rows present, timing printed."""
    model, tok = smol
    cfg = persona.PersonaEval(limit_per_domain=2, max_new_tokens=48, direction_prompts=16, retest_prompts=6)
    out = persona.run(model, tok, data, cfg)
    rows = {r["metric"] for r in out["rows"]}
    assert {
        "persona/probe",
        "persona/probe_masked",
        "persona/activation",
        "persona/steer_probe",
        "persona/ablate_probe",
        "persona/probe_auc_external",
    } <= rows
    # the self-report: a value row or the invalidity flag, never both (SmolLM2-135M: flagged, mass ~0.32)
    assert ("persona/self_report" in rows) != ("persona/self_report_valid" in rows)
    gate = out["self_report"]["gate"]
    print(
        "\ntiming (s):",
        {k: round(v, 1) for k, v in out["timing"].items()},
        "\nself-report option mass:",
        round(gate["option_mass"], 3),
        "alpha:",
        gate["alpha"],
        gate["reason"],
        "\nrows:",
        {r["metric"]: round(r["value"], 3) for r in out["rows"] if r["metric"].count("/") == 1},
    )


def test_newtask_answers_are_reused_only_when_they_match(tok, data, monkeypatch):
    """The newtask stage's greedy answers replace the persona stage's own generation when the length cap
    matches and every prompt is covered; otherwise the stage generates (and says which it did)."""
    import study.models

    calls = []

    def counting_generate(model, tokenizer, conversations, max_new_tokens, batch_size=16, **_):
        calls.append(len(conversations))
        return ["Oh, how novel." for _ in conversations]

    monkeypatch.setattr(study.models, "generate", counting_generate)
    persona._DIRECTIONS.clear()
    cfg = persona.PersonaEval(
        limit_per_domain=2, max_new_tokens=16, direction_prompts=4, retest_seeds=[], respondents=2
    )
    held = persona._balanced(data.heldout, 2)
    indom = persona._balanced(data.split("test_in"), 2)
    nt = {
        "config": {"max_new_tokens": 16},
        "responses": (
            [{"metric": "newtask/generation", "id": it.id, "response": f"held {it.id}"} for it in held]
            + [
                {"metric": "newtask/generation_indomain", "id": it.id, "response": f"in {it.id}"}
                for it in indom
            ]
        ),
    }
    out = persona.run(tiny_model(), tok, data, cfg, previous={"newtask": nt})
    assert out["greedy_answers_from_newtask"] == ["heldout", "test_in"]
    texts = {r["id"]: r["response"] for r in out["responses"] if r["set"] == "heldout"}
    assert texts == {it.id: f"held {it.id}" for it in held}
    n_direction_calls = len(calls)  # the base's persona/plain answers for the direction are still generated
    persona._DIRECTIONS.clear()
    calls.clear()
    other = dict(nt, config={"max_new_tokens": 64})  # a different length cap: not the same answers
    out = persona.run(tiny_model(), tok, data, cfg, previous={"newtask": other})
    assert out["greedy_answers_from_newtask"] == [] and len(calls) == n_direction_calls + 2
