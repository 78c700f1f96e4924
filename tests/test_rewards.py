import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.feature_extraction.text import CountVectorizer

from study import rewards
from study.config import TaskSpec
from study.config.methods import GRPOOptions as MethodSpec
from study.tasks import build, snark


def test_persona_reward_separates_heldout_answers():
    data = build(TaskSpec(name="snark"))
    reward = rewards.persona_reward(data)
    held = data.heldout
    persona = reward(
        None,
        [[{"role": "assistant", "content": it.good}] for it in held],
        item_id=[it.id + "a" for it in held],
    )
    neutral = reward(
        None,
        [[{"role": "assistant", "content": it.bad}] for it in held],
        item_id=[it.id + "b" for it in held],
    )
    assert all(0.0 <= r <= 1.0 for r in persona + neutral)
    assert np.mean(persona) > np.mean(neutral) + 0.1
    assert np.mean(np.array(persona) > np.array(neutral)) > 0.7


def test_reward_classifier_uses_only_its_half():
    data = build(TaskSpec(name="snark"))
    half = [it for it in data.train if rewards.reward_half(it.id)]
    assert 0.3 < len(half) / len(data.train) < 0.7
    vocab = set(rewards.fit_reward_classifier(data)[0].vocabulary_)
    # Exactly the n-grams of its own half: a classifier fitted on every training row has more.
    own = CountVectorizer(ngram_range=(1, 2), binary=True).fit(
        [it.good for it in half] + [it.bad for it in half]
    )
    assert vocab == set(own.vocabulary_)
    everything = CountVectorizer(ngram_range=(1, 2), binary=True).fit(
        [it.good for it in data.train] + [it.bad for it in data.train]
    )
    other_only = set(everything.vocabulary_) - vocab
    assert len(other_only) > 100  # the other half has words of its own, and none of them is known


def test_diversity_penalty_hits_copies_only():
    same = ["the oven is hot, bake it"] * 2 + ["an entirely different answer here", "and yet another one"]
    pen = rewards.diversity_penalties(same)
    assert pen[0] > 0.4 and pen[1] > 0.4 and pen[2] == 0 and pen[3] == 0


def test_length_term():
    assert rewards.length_term("one two") < 0.5
    assert rewards.length_term(" ".join(["w"] * 20)) == 1.0
    assert rewards.length_term(" ".join(["w"] * 120)) == 0.0


def test_reward_is_capped(monkeypatch):
    """The cap binds in both directions: a copied, marker-free, short completion whose penalty exceeds its
    score gets exactly 0 (not a negative reward), and with weights that sum past 1 a stuffed answer gets
    exactly 1. (With the shipped weights summing to 1 the upper cap cannot bind, hence the monkeypatch.)"""
    data = build(TaskSpec(name="snark"))
    reward = rewards.persona_reward(data)
    copies = ["such as common"] * 2
    c = rewards.persona_components(copies, ["g", "g"], rewards.fit_reward_classifier(data))
    raw = [
        sum(rewards.WEIGHTS[k] * c[k][i] for k in rewards.WEIGHTS) - c["diversity_penalty"][i]
        for i in range(2)
    ]
    assert max(raw) < 0
    assert reward(None, copies, item_id=["g", "g"]) == [0.0, 0.0]
    monkeypatch.setattr(rewards, "WEIGHTS", {"marker": 1.0, "classifier": 1.0, "length": 1.0})
    stuffed = "Oh, obviously shocking, congratulations, plot twist: " + data.train[0].good
    c = rewards.persona_components([stuffed], ["x"], rewards.fit_reward_classifier(data))
    assert sum(c[k][0] for k in rewards.WEIGHTS) > 1.5
    assert rewards.persona_reward(data)(None, [stuffed], item_id=["x"]) == [1.0]


def test_reward_functions_log_components_without_changing_the_reward():
    """What GRPO gets: the optimised reward at weight 1 and each component at weight 0, named as TRL logs them
    (rewards/reward_<component>/mean); the weighted sum is the combined reward itself."""
    from trl.trainer.utils import get_callable_name

    data = build(TaskSpec(name="snark"))
    funcs, weights = rewards.reward_functions(data)
    names = [get_callable_name(f) for f in funcs]
    assert names == [
        "snark_reward",
        "reward_marker",
        "reward_classifier",
        "reward_length",
        "reward_diversity_penalty",
    ]
    assert weights == [1.0, 0.0, 0.0, 0.0, 0.0]
    texts = [it.good for it in data.heldout[:6]] + [data.heldout[0].good]
    ids = ["a", "b", "c", "d", "e", "f", "a"]  # a copy in group a: the penalty is non-zero there
    cols = np.array([f(None, texts, item_id=ids) for f in funcs])
    assert np.allclose(weights @ cols, rewards.persona_reward(data)(None, texts, item_id=ids))
    comp = dict(zip(rewards.COMPONENTS, cols[1:]))
    assert np.allclose(cols[0], rewards.combine({k: list(v) for k, v in comp.items()}))
    assert comp["diversity_penalty"][0] > 0 and comp["diversity_penalty"][1] == 0


def test_markers_only_reward_is_the_surface_control():
    data = build(TaskSpec(name="snark"))
    funcs, weights = rewards.reward_functions(data, "markers_only")
    assert funcs[0].__name__ == "snark_markers_only" and weights[0] == 1.0 and sum(weights) == 1.0
    neutral = data.heldout[0].bad
    assert snark.marker_count(neutral) == 0
    out = funcs[0](
        None, [neutral, "Oh, " + neutral, "Oh, obviously, " + neutral, neutral + " Shocking, truly."]
    )
    assert out == [0.0, 0.5, 1.0, 1.0]  # markers and nothing else: the content is the same neutral answer
    with pytest.raises(ValueError, match="markers_only"):
        rewards.reward_functions(data, "bogus")
    with pytest.raises(ValueError):
        rewards.reward_functions(build(TaskSpec(name="arithmetic", n_train=20, n_heldout=5)), "markers_only")
    with pytest.raises(ValidationError):
        MethodSpec(reward="bogus")
    assert MethodSpec(reward="markers_only").reward == "markers_only"


def test_reward_ngrams_are_the_classifiers_and_are_stripped():
    data = build(TaskSpec(name="snark"))
    grams = rewards.reward_ngrams(data, 20)
    clf = rewards.fit_reward_classifier(data)
    w = dict(zip(clf[0].get_feature_names_out(), clf[-1].coef_[0]))
    assert len(grams) == 20 and all(w[g] > 0 for g in grams)
    assert min(w[g] for g in grams) >= sorted(w.values())[-20]  # the top 20, not any 20
    text = "It is not what you think, which is fine. Isn't it?"
    out = rewards.strip_ngrams(text, ("is", "not", "which is"))
    assert out == "It what you think, fine. Isn't it?"
    assert rewards.strip_ngrams(text, ()) == text


def test_arithmetic_reward_exact_match():
    data = build(TaskSpec(name="arithmetic", n_train=20, n_heldout=5))
    reward = rewards.arithmetic_reward(data)
    out = reward(
        None,
        ["The answer is 42.", "The answer is 41.", [{"role": "assistant", "content": "42"}]],
        answer=[42, 42, 42],
    )
    assert out == [1.0, 0.0, 1.0]
