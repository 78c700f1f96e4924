"""GRPO rewards. Arithmetic: exact match. Persona (`reward: combined`, the default): a capped mix of four signals

    0.3 * marker heuristic     lexicon markers (study.tasks.snark.MARKERS), saturating at 2
  + 0.5 * classifier           a bag-of-words logistic regression fitted on *its own half* of the training
                               answers (rows whose id hashes even), never the evaluation probes
  + 0.2 * length term          1 between 8 and 60 words, falling off outside
  - diversity penalty          within a group, up to 0.5 for a completion that copies a sibling
  capped to [0, 1].

`reward: markers_only` (a GRPO option in the protocol) optimises the marker heuristic alone: the positive
control for surface learning, whose masked probe and activation should stay flat while marker_rate rises.

TRL logs one `rewards/<function name>/mean` per reward function. So that the training log carries every
component at every logged step (the proxy side of the Goodhart curve), `reward_functions` returns the
optimised reward with weight 1 followed by one function per component with weight 0: the advantages are
exactly those of the optimised reward alone (zero-weighted columns add nothing under either of TRL's
aggregations), and `rewards/reward_<component>/mean` appear in train/log.jsonl.

The evaluation (study.measure) uses other models on other splits, so GRPO is not graded by what it optimised;
`reward_ngrams` lists the classifier's most persona-weighted n-grams, which the persona stage's masked probe
removes together with the markers.
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from functools import lru_cache

from study.tasks import TaskData, arithmetic, snark

WEIGHTS = {"marker": 0.3, "classifier": 0.5, "length": 0.2}
COMPONENTS = ("marker", "classifier", "length", "diversity_penalty")
PERSONA_REWARDS = ("combined", "markers_only")
DIVERSITY_THRESHOLD = 0.6  # Jaccard word overlap with the closest sibling above which the penalty starts
DIVERSITY_MAX_PENALTY = 0.5


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"] if completion else ""
    return completion


def reward_half(item_id: str) -> bool:
    """The half of the training rows the reward's classifier is fitted on (stable, not id parity)."""
    return zlib.crc32(item_id.encode()) % 2 == 0


def reward_rows(data: TaskData) -> list:
    """The training rows the reward's classifier is fitted on (its half; the other half is never seen)."""
    return [it for it in data.train if reward_half(it.id)]


def fit_reward_classifier(data: TaskData):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    rows = reward_rows(data)
    texts = [it.good for it in rows] + [it.bad for it in rows]
    labels = [1] * len(rows) + [0] * len(rows)
    clf = make_pipeline(CountVectorizer(ngram_range=(1, 2), binary=True, min_df=1), LogisticRegression(C=1.0))
    clf.fit(texts, labels)
    return clf


@lru_cache(maxsize=4)
def reward_ngrams(data: TaskData, k: int = 20) -> tuple[str, ...]:
    """The reward classifier's `k` n-grams with the largest positive (persona) weights, largest first."""
    import numpy as np

    clf = fit_reward_classifier(data)
    names = clf[0].get_feature_names_out()
    w = clf[-1].coef_[0]
    order = np.argsort(-w, kind="stable")
    return tuple(str(names[i]) for i in order[:k] if w[i] > 0)


def strip_ngrams(text: str, ngrams) -> str:
    """`text` without the given n-grams (whole words, case-insensitive, longest first), spaces tidied."""
    if not ngrams:
        return text
    words = sorted(ngrams, key=len, reverse=True)
    pat = r"(?<![\w'])(" + "|".join(r"\s+".join(map(re.escape, g.split())) for g in words) + r")(?![\w'])"
    out = re.sub(pat, "", text, flags=re.IGNORECASE)
    out = re.sub(r"\s+([,.!?:;])", r"\1", out)
    return re.sub(r"\s{2,}", " ", out).strip()


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


def marker_term(text: str) -> float:
    return min(snark.marker_count(text), 2) / 2


def persona_components(texts: list[str], groups: list, classifier) -> dict[str, list[float]]:
    markers = [marker_term(t) for t in texts]
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


def combine(c: dict[str, list[float]]) -> list[float]:
    """The combined reward from its components: weighted sum minus the diversity penalty, capped to [0, 1]."""
    n = len(c["marker"])
    return [
        min(1.0, max(0.0, sum(WEIGHTS[k] * c[k][i] for k in WEIGHTS) - c["diversity_penalty"][i]))
        for i in range(n)
    ]


def persona_reward(data: TaskData):
    classifier = fit_reward_classifier(data)

    def snark_reward(prompts, completions, item_id=None, **_) -> list[float]:
        texts = [_text(c) for c in completions]
        groups = item_id if item_id is not None else [str(p) for p in prompts]
        return combine(persona_components(texts, groups, classifier))

    return snark_reward


def markers_only_reward(data: TaskData):
    """The marker heuristic alone, in [0, 1]: the surface-learning positive control."""

    def snark_markers_only(prompts, completions, **_) -> list[float]:
        return [marker_term(_text(c)) for c in completions]

    return snark_markers_only


def component_rewards(data: TaskData) -> list:
    """One reward function per component, named `reward_<component>` (what TRL logs under rewards/...)."""
    classifier = fit_reward_classifier(data)

    def make(name: str):
        def f(prompts, completions, item_id=None, **_) -> list[float]:
            texts = [_text(c) for c in completions]
            groups = item_id if item_id is not None else [str(p) for p in prompts]
            return persona_components(texts, groups, classifier)[name]

        f.__name__ = f"reward_{name}"
        return f

    return [make(k) for k in COMPONENTS]


def reward_functions(data: TaskData, kind: str | None = None) -> tuple[list, list[float]]:
    """(reward functions, weights) for GRPOTrainer(reward_funcs=...) and GRPOConfig(reward_weights=...).
    Persona: the optimised reward (`kind`: combined or markers_only) at weight 1, then every component at
    weight 0, so that TRL logs each one. Arithmetic: exact match alone (`kind` must be None)."""
    if data.name == "snark":
        kind = kind or "combined"
        if kind not in PERSONA_REWARDS:
            raise ValueError(f"unknown persona reward {kind!r}: choose one of {PERSONA_REWARDS}")
        main = persona_reward(data) if kind == "combined" else markers_only_reward(data)
        return [main, *component_rewards(data)], [1.0] + [0.0] * len(COMPONENTS)
    if kind not in (None, "exact_match"):
        raise ValueError(f"the {data.name} task has one reward (exact_match), not {kind!r}")
    return [REWARDS[data.name](data)], [1.0]


def reward_weights(task: str) -> list[float]:
    """GRPOConfig's reward_weights matching `reward_functions` (known from the task's name alone)."""
    return [1.0] + [0.0] * len(COMPONENTS) if task == "snark" else [1.0]


def arithmetic_reward(data: TaskData):
    def exact_match(prompts, completions, answer=None, **_) -> list[float]:
        return [float(arithmetic.extract_answer(_text(c)) == a) for c, a in zip(completions, answer)]

    return exact_match


REWARDS = {"snark": persona_reward, "arithmetic": arithmetic_reward}
