"""Kept only for the measurement stages' imports (`from study.stats_basic import wilson, bootstrap_mean_ci`):
both now live in `study.stats.core` (statsmodels' Wilson interval, scipy's bootstrap). Import from there; this
module goes when the stages do."""

from study.stats.core import bootstrap_mean_ci, wilson  # noqa: F401
