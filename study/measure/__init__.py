"""Measurements of a model (the base, or the base with an adapter). Each stage returns metric rows.

Stage versions are part of every stage file's cache key: bump a stage's number when what it measures
changes, and a rerun recomputes exactly that stage's files (older ones are left out of metrics.csv until
then). Kept here, torch-free, so that `study.metrics` can tell current files from stale ones.
"""

VERSIONS = {
    # 3: held-out prompts dealt round-robin over domains (was: the first `limit`)
    # 2: success from the model's own generations; neutral/persona log-likelihoods
    "newtask": 3,
    "kl": 1,
    "regression": 2,  # 2: per-item records (p_gold, chance), headroom suites, HumanEval pass@k
    "persona": 2,  # 2: self-report gate, activation variants, causal test, external probe AUC
    "probe": 2,  # the regression stage's code on a few items, for the emergence trajectories
}
