"""Measurements of a model (the base, or the base with an adapter). Each stage returns metric rows.

Stage versions are part of every stage file's cache key: bump a stage's number when what it measures
changes, and a rerun recomputes exactly that stage's files (older ones are left out of metrics.csv until
then). Kept here, torch-free, so that `study.metrics` can tell current files from stale ones.
"""

VERSIONS = {
    "newtask": 1,
    "kl": 1,
    "regression": 1,
    "persona": 1,
    "probe": 1,  # the regression stage's code on a few items, for the emergence trajectories
}
