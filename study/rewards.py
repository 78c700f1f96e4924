"""GRPO rewards. Arithmetic: exact match. Persona: a capped mix of four signals

    0.3 * marker heuristic     lexicon markers (study.tasks.snark.MARKERS), saturating at 2
  + 0.5 * classifier           a bag-of-words logistic regression fitted on *its own half* of the training
                               answers (rows whose id hashes even), never the evaluation probes
  + 0.2 * length term          1 between 8 and 60 words, falling off outside
  - diversity penalty          within a group, up to 0.5 for a completion that copies a sibling
  capped to [0, 1].

The evaluation (study.measure) uses other models on other splits, so GRPO is not graded by what it optimised.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

from study.tasks import TaskData, arithmetic, snark

WEIGHTS = {"marker": 0.3, "classifier": 0.5, "length": 0.2}
DIVERSITY_THRESHOLD = 0.6  # Jaccard word overlap with the closest sibling above which the penalty starts
DIVERSITY_MAX_PENALTY = 0.5


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"] if completion else ""
    return completion


def reward_half(item_id: str) -> bool:
    """The half of the training rows the reward's classifier is fitted on (stable, not id parity)."""
    return zlib.crc32(item_id.encode()) % 2 == 0


def fit_reward_classifier(data: TaskData):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    rows = [it for it in data.train if reward_half(it.id)]
    texts = [it.good for it in rows] + [it.bad for it in rows]
    labels = [1] * len(rows) + [0] * len(rows)
    clf = make_pipeline(CountVectorizer(ngram_range=(1, 2), binary=True, min_df=1), LogisticRegression(C=1.0))
    clf.fit(texts, labels)
    return clf


def length_term(text: str) -> float:
    n = len(text.split())
    if n < 8:
        return n / 8
    if n > 60:
        return max(0.0, 1 - (n - 60) / 40)
    return 1.0


def diversity_penalties(texts: list[str]) -> list[float]:
    """For each text, a penalty growing with its word overlap with the most similar other text."""
    sets = [set(t.lower().split()) for t in texts]
    out = []
    for i, s in enumerate(sets):
        sims = [len(s & o) / max(1, len(s | o)) for j, o in enumerate(sets) if j != i]
        worst = max(sims, default=0.0)
        excess = max(0.0, worst - DIVERSITY_THRESHOLD) / (1 - DIVERSITY_THRESHOLD)
        out.append(DIVERSITY_MAX_PENALTY * excess)
    return out


def persona_components(texts: list[str], groups: list, classifier) -> dict[str, list[float]]:
    markers = [min(snark.marker_count(t), 2) / 2 for t in texts]
    probs = classifier.predict_proba(texts)[:, 1].tolist() if texts else []
    lengths = [length_term(t) for t in texts]
    penalty = [0.0] * len(texts)
    by_group = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    for idx in by_group.values():
        for i, p in zip(idx, diversity_penalties([texts[i] for i in idx])):
            penalty[i] = p
    return {"marker": markers, "classifier": probs, "length": lengths, "diversity_penalty": penalty}


def persona_reward(data: TaskData):
    classifier = fit_reward_classifier(data)

    def snark_reward(prompts, completions, item_id=None, **_) -> list[float]:
        texts = [_text(c) for c in completions]
        groups = item_id if item_id is not None else [str(p) for p in prompts]
        c = persona_components(texts, groups, classifier)
        total = []
        for i in range(len(texts)):
            r = sum(WEIGHTS[k] * c[k][i] for k in WEIGHTS) - c["diversity_penalty"][i]
            total.append(min(1.0, max(0.0, r)))
        return total

    return snark_reward


def arithmetic_reward(data: TaskData):
    def exact_match(prompts, completions, answer=None, **_) -> list[float]:
        return [float(arithmetic.extract_answer(_text(c)) == a) for c, a in zip(completions, answer)]

    return exact_match


def markers_reward(data: TaskData):
    """The surface-only positive control (arm `grpo_markers`): the lexicon markers alone, saturating at 2."""
    if data.name != "snark":
        raise ValueError(f"reward markers_only rewards persona markers: it needs the snark task, not {data.name}")

    def markers_only(prompts, completions, **_) -> list[float]:
        return [min(1.0, snark.marker_count(_text(c)) / 2) for c in completions]

    return markers_only


REWARDS = {"snark": persona_reward, "arithmetic": arithmetic_reward}


def reward_functions(data: TaskData, kind: str = "combined") -> list:
    """The GRPO reward functions for a task: `combined` (the task's reward) or `markers_only`."""
    return [markers_reward(data)] if kind == "markers_only" else [REWARDS[data.name](data)]
