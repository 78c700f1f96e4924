import numpy as np

from study import rewards
from study.config import TaskSpec
from study.tasks import build


def test_persona_reward_separates_heldout_answers():
    data = build(TaskSpec(name="snark"))
    reward = rewards.persona_reward(data)
    held = data.heldout
    persona = reward(None, [[{"role": "assistant", "content": it.good}] for it in held],
                     item_id=[it.id + "a" for it in held])
    neutral = reward(None, [[{"role": "assistant", "content": it.bad}] for it in held],
                     item_id=[it.id + "b" for it in held])
    assert all(0.0 <= r <= 1.0 for r in persona + neutral)
    assert np.mean(persona) > np.mean(neutral) + 0.1
    assert np.mean(np.array(persona) > np.array(neutral)) > 0.7


def test_reward_classifier_uses_only_its_half():
    data = build(TaskSpec(name="snark"))
    half = [it for it in data.train if rewards.reward_half(it.id)]
    assert 0.3 < len(half) / len(data.train) < 0.7
    vocab = rewards.fit_reward_classifier(data)[0].vocabulary_
    other_only = {w for it in data.train if not rewards.reward_half(it.id) for w in it.good.lower().split()}
    assert vocab and len(vocab) < 10 * len(other_only)  # fitted on a subset, not everything


def test_diversity_penalty_hits_copies_only():
    same = ["the oven is hot, bake it"] * 2 + ["an entirely different answer here", "and yet another one"]
    pen = rewards.diversity_penalties(same)
    assert pen[0] > 0.4 and pen[1] > 0.4 and pen[2] == 0 and pen[3] == 0


def test_length_term():
    assert rewards.length_term("one two") < 0.5
    assert rewards.length_term(" ".join(["w"] * 20)) == 1.0
    assert rewards.length_term(" ".join(["w"] * 120)) == 0.0


def test_reward_is_capped():
    data = build(TaskSpec(name="snark"))
    reward = rewards.persona_reward(data)
    stuffed = "Oh, obviously shocking, congratulations, plot twist: " + data.train[0].good
    assert reward(None, [stuffed], item_id=["x"])[0] <= 1.0


def test_arithmetic_reward_exact_match():
    data = build(TaskSpec(name="arithmetic", n_train=20, n_heldout=5))
    reward = rewards.arithmetic_reward(data)
    out = reward(None, ["The answer is 42.", "The answer is 41.", [{"role": "assistant", "content": "42"}]],
                 answer=[42, 42, 42])
    assert out == [1.0, 0.0, 1.0]
