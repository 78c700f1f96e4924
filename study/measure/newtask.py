"""New-task success on prompts no method trained on, and what it cost on the task's own reference texts.

snark
    `newtask/success`         the primary measure: the mean probability that a text classifier (TF-IDF word +
                              char n-grams, logistic regression, fitted on all training answers; not GRPO's
                              reward classifier, which is another model fitted on half the rows) gives to
                              "persona" for the model's own greedy response to each held-out-domain prompt
                              (bootstrap CI). It reads what the model does, for every method alike (GRPO never
                              saw the reference texts below), and it cannot be bought by damage: flattening the
                              logits leaves greedy answers, hence this number, unchanged (tests/test_newtask.py).
                              Its level is not its meaning: the classifier was fitted on reference answers, not
                              model text, and gives the bundled base's plain answers 0.48 (40 prompts; the
                              held-out reference pairs get AUC 0.86), so read it as a change from the base, per
                              prompt, next to the control cell.
    `newtask/persona_rate`    the share of those responses the classifier calls persona (p > 0.5; Wilson CI).
                              The classifier's held-out AUC is stored with the result.
    `newtask/pref_sigmoid`    the former success measure, kept as a secondary view: the Bradley-Terry
                              probability sigmoid(m), m = mean per-token log-likelihood of the persona reference
                              answer minus that of the neutral one, averaged over prompts. It is confounded with
                              damage: flattening the base's logits (temperature 3, no training) shrinks |m| and
                              so moves sigmoid(m) toward 0.5 -- up from a base below 0.5, like training would.
                              Read it only next to `neutral_loglik`.
    `newtask/pref_win_rate`   the share of prompts with m > 0 (Wilson CI).
    `newtask/pref_margin`     the mean of m in nats per token (bootstrap CI).
    `newtask/neutral_loglik`  mean per-token log-likelihood of the neutral reference answers (bootstrap CI):
                              an adapter that moved toward the persona should keep it near the base's; one that
                              bought its margin by flattening (damage) loses it. The change from the base is
                              paired per prompt through the stage's per-item records (same ids).
    `newtask/persona_loglik`  the same for the persona reference answers.
    `..._indomain`            the same on unseen prompts of the training domains.
arithmetic
    `newtask/success`         exact match of the last integer of the greedy response on held-out problems
                              (generation-based, so flattening does not move it either).

Every response is kept in the stage's JSON next to its score, so each number traces back to text.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from study.models import completion_logprobs, generate
from study.stats.core import bootstrap_mean_ci, wilson
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


def reference_logliks(
    model, tokenizer, data: TaskData, items: list[Item], batch_size: int
) -> tuple[list[float], list[float]]:
    """Per item: (mean per-token log p(good answer), mean per-token log p(bad answer)) given the prompt."""
    convs = [data.messages(it.prompt) for it in items]
    good = completion_logprobs(model, tokenizer, convs, [it.good for it in items], batch_size)
    bad = completion_logprobs(model, tokenizer, convs, [it.bad for it in items], batch_size)
    return [g / gn for g, gn in good], [b / bn for b, bn in bad]


def preference(model, tokenizer, data: TaskData, items: list[Item], batch_size: int) -> list[float]:
    """Per item: mean per-token log p(good) - mean per-token log p(bad)."""
    good, bad = reference_logliks(model, tokenizer, data, items, batch_size)
    return [g - b for g, b in zip(good, bad)]


def _mean_row(metric: str, values: list[float]) -> dict:
    lo, hi = bootstrap_mean_ci(values)
    return {"metric": metric, "value": float(np.mean(values)), "ci_low": lo, "ci_high": hi, "n": len(values)}


def balanced_head(items: list[Item], limit: int | None) -> list[Item]:
    """At most `limit` items, dealt round-robin over their domains in order (each domain's own order kept):
    the first `limit` of a domain-sorted list would leave whole held-out domains out (snark's 78 held-out
    prompts are 26 animals, 26 history, 26 music; the first 48 had no music). The persona stage's
    per-domain subsets are then prefixes of these, so it reuses these answers."""
    if limit is None or limit >= len(items):
        return list(items)
    by_domain: dict[str, list[Item]] = {}
    for it in items:
        by_domain.setdefault(it.domain, []).append(it)
    queues = list(by_domain.values())
    picked: set[int] = set()
    for k in range(max(map(len, queues))):
        for q in queues:
            if k < len(q) and len(picked) < limit:
                picked.add(id(q[k]))
    return [it for it in items if id(it) in picked]


def run(model, tokenizer, data: TaskData, cfg) -> dict:
    """Returns {"rows": [...], "responses": [...], ...} for the stage's JSON."""
    rows, records, extra = [], [], {}
    for suffix, items in (("", data.heldout), ("_indomain", data.split("test_in"))):
        items = balanced_head(items, cfg.limit)
        if not items:
            continue
        convs = [data.messages(it.prompt) for it in items]
        responses = generate(model, tokenizer, convs, cfg.max_new_tokens, cfg.batch_size)
        if data.name == "arithmetic":
            hits = [float(arithmetic.extract_answer(r) == it.answer) for it, r in zip(items, responses)]
            rows.append(_rate(f"newtask/success{suffix}", hits))
            scores = hits
        else:
            clf, auc = _classifier(data)
            scores = clf.predict_proba(responses)[:, 1].tolist()
            rows.append(_mean_row(f"newtask/success{suffix}", scores))
            rows.append(_rate(f"newtask/persona_rate{suffix}", [float(s > 0.5) for s in scores]))
            extra["persona_classifier_auc_heldout"] = auc
            ref_items = balanced_head(items, getattr(cfg, "reference_limit", None))
            persona_ll, neutral_ll = reference_logliks(model, tokenizer, data, ref_items, cfg.batch_size)
            margins = [g - b for g, b in zip(persona_ll, neutral_ll)]
            rows.append(_mean_row(f"newtask/pref_sigmoid{suffix}", [1 / (1 + math.exp(-m)) for m in margins]))
            rows.append(_rate(f"newtask/pref_win_rate{suffix}", [float(m > 0) for m in margins]))
            rows.append(_mean_row(f"newtask/pref_margin{suffix}", margins))
            rows.append(_mean_row(f"newtask/neutral_loglik{suffix}", neutral_ll))
            rows.append(_mean_row(f"newtask/persona_loglik{suffix}", persona_ll))
            for it, m, g, b in zip(ref_items, margins, persona_ll, neutral_ll):
                records.append(
                    {
                        "metric": f"newtask/pref_margin{suffix}",
                        "id": it.id,
                        "domain": it.domain,
                        "margin": m,
                        "persona_loglik": g,
                        "neutral_loglik": b,
                    }
                )
        records += [
            {
                "metric": f"newtask/generation{suffix}",
                "id": it.id,
                "domain": it.domain,
                "response": r,
                "score": s,
            }
            for it, r, s in zip(items, responses, scores)
        ]
    return {"rows": rows, "responses": records, **extra}
