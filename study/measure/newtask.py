"""New-task success on prompts no method trained on.

snark
    `newtask/success`         the model's preference for the persona answer over the neutral one on
                              held-out-domain prompts (both written for that prompt, same content): the
                              Bradley-Terry probability sigmoid(m), m = mean per-token log-likelihood of
                              the persona answer minus that of the neutral answer, averaged over prompts
                              (bootstrap CI). 0.5 = indifferent. No generation and no classifier in the
                              loop, so it is the same yardstick for all four methods and the base.
                              (Why not the hard win rate m > 0: witty text is less predictable per token
                              than plain text with the same content, so a model can move far toward the
                              persona before m changes sign; the win rate is reported too.)
    `newtask/pref_win_rate`   the share of prompts with m > 0 (Wilson CI).
    `newtask/pref_margin`     the mean of m in nats per token (bootstrap CI).
    `newtask/persona_rate`    the share of greedy responses that a text classifier (TF-IDF word + char
                              n-grams, logistic regression, fitted on all training answers) calls persona.
                              A cruder, generation-based view; its held-out AUC is stored with the result.
    `..._indomain`            the same on unseen prompts of the training domains.
arithmetic
    `newtask/success`         exact match of the last integer of the greedy response on held-out problems.

Every response is kept in the stage's JSON next to its score, so each number traces back to text.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from study.models import completion_logprobs, generate
from study.stats_basic import bootstrap_mean_ci, wilson
from study.tasks import Item, TaskData, arithmetic


def fit_persona_classifier(data: TaskData):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    texts = [it.good for it in data.train] + [it.bad for it in data.train]
    labels = [1] * len(data.train) + [0] * len(data.train)
    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True),
    )
    return make_pipeline(features, LogisticRegression(C=4.0, max_iter=2000)).fit(texts, labels)


@lru_cache(maxsize=4)
def _classifier(data: TaskData):
    from sklearn.metrics import roc_auc_score

    clf = fit_persona_classifier(data)
    held = data.heldout
    p = clf.predict_proba([it.good for it in held] + [it.bad for it in held])[:, 1]
    auc = float(roc_auc_score([1] * len(held) + [0] * len(held), p))
    return clf, auc


def _rate(metric: str, hits: list[float]) -> dict:
    k, n = int(sum(hits)), len(hits)
    lo, hi = wilson(k, n)
    return {"metric": metric, "value": k / n, "ci_low": lo, "ci_high": hi, "n": n}


def preference(model, tokenizer, data: TaskData, items: list[Item], batch_size: int) -> list[float]:
    """Per item: mean per-token log p(good) - mean per-token log p(bad)."""
    convs = [data.messages(it.prompt) for it in items]
    good = completion_logprobs(model, tokenizer, convs, [it.good for it in items], batch_size)
    bad = completion_logprobs(model, tokenizer, convs, [it.bad for it in items], batch_size)
    return [g / gn - b / bn for (g, gn), (b, bn) in zip(good, bad)]


def run(model, tokenizer, data: TaskData, cfg) -> dict:
    """Returns {"rows": [...], "responses": [...], ...} for the stage's JSON."""
    rows, records, extra = [], [], {}
    for suffix, items in (("", data.heldout), ("_indomain", data.split("test_in"))):
        items = items[: cfg.limit] if cfg.limit else items
        if not items:
            continue
        convs = [data.messages(it.prompt) for it in items]
        responses = generate(model, tokenizer, convs, cfg.max_new_tokens, cfg.batch_size)
        if data.name == "arithmetic":
            hits = [float(arithmetic.extract_answer(r) == it.answer) for it, r in zip(items, responses)]
            rows.append(_rate(f"newtask/success{suffix}", hits))
            scores = hits
        else:
            margins = preference(model, tokenizer, data, items, cfg.batch_size)
            probs = [1 / (1 + math.exp(-m)) for m in margins]
            lo, hi = bootstrap_mean_ci(probs)
            rows.append({"metric": f"newtask/success{suffix}", "value": float(np.mean(probs)),
                         "ci_low": lo, "ci_high": hi, "n": len(probs)})
            rows.append(_rate(f"newtask/pref_win_rate{suffix}", [float(m > 0) for m in margins]))
            lo, hi = bootstrap_mean_ci(margins)
            rows.append({"metric": f"newtask/pref_margin{suffix}", "value": float(np.mean(margins)),
                         "ci_low": lo, "ci_high": hi, "n": len(margins)})
            clf, auc = _classifier(data)
            scores = clf.predict_proba(responses)[:, 1].tolist()
            rows.append(_rate(f"newtask/persona_rate{suffix}", [float(s > 0.5) for s in scores]))
            extra["persona_classifier_auc_heldout"] = auc
            for it, m in zip(items, margins):
                records.append({"metric": f"newtask/pref_margin{suffix}", "id": it.id, "domain": it.domain,
                                "margin": m})
        records += [{"metric": f"newtask/generation{suffix}", "id": it.id, "domain": it.domain, "response": r,
                     "score": s} for it, r, s in zip(items, responses, scores)]
    return {"rows": rows, "responses": records, **extra}
