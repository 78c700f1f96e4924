"""The study's statistics, torch-free and shared by the measurement stages and the report.

Every statistic is a thin call into scipy / statsmodels / pingouin, written once (`core`), plus the study's own
decision rules, each checked by a null and a planted-effect simulation (tests/test_calibration.py, and the
larger `python -m study.stats.calibrate`):

    core        bootstrap / Holm / Wilson / Pearson / paired t / Kendall's W / Cronbach's alpha, `MetricRow`
    onsets      emergence onsets with family-wise error control across looks and indicators
    items       item-level method effects with the cell as the replicated unit
    forgetting  paired (per-item) forgetting intervals with seed variation; floor / ceiling flags
    law         the forgetting law within methods (method fixed effects), leave-one-method-out R²
    power       minimum detectable effects of the protocol's primary outcomes

This package imports numpy, scipy, statsmodels, pingouin and pandas only (never torch or another `study`
module), so that any stage or the report can use it.
"""

from study.stats.core import (  # noqa: F401
    ALPHA,
    MetricRow,
    bootstrap_ci,
    bootstrap_mean_ci,
    cronbach_alpha,
    holm,
    kendall_w,
    paired_t,
    pearson_ci,
    t_interval,
    wilson,
)
