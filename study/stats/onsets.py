"""Emergence onsets with family-wise error control: at which training step does an indicator first rise
above its reference, with a known chance of a false onset?

    from study.stats.onsets import onsets
    onsets({"persona/probe": {10: a10, 20: a20, 40: a40}}, {"persona/probe": base}, min_effect={"persona/probe": 0.05})

The rule, per cell:
- At each look (checkpoint step) and for each indicator, a paired per-prompt test of adapter − reference
  (`scipy.stats.ttest_rel`, one-sided, H0: mean difference <= the indicator's minimum effect). The reference is
  the base's per-prompt values (the same prompts), or the control cell's at the same step when a control
  exists. KL has no base value (the base's KL to itself is 0 by definition, so "KL > 0" is true at the first
  step of any training): a KL onset needs a control cell and is read against the control's KL.
- The minimum effect keeps a tiny but real shift from counting as emergence (and makes onsets comparable
  across prompt counts).
- Error control: Bonferroni over looks × indicators, alpha / (K·I) per test; the onset is the first look at
  which the test rejects. Why Bonferroni and not "two consecutive significant looks" or Pocock-type
  alpha-spending: (1) it bounds the probability of any false onset in a cell by alpha under every correlation
  between looks and indicators (checkpoints of one run and indicators of one answer are strongly and unknowably
  correlated; alpha-spending boundaries assume the Brownian covariance of accumulating data, which
  checkpoints of a training run do not have); (2) "two consecutive looks" has no stated error rate (it
  depends on that correlation) and cannot confirm an onset at the final look; (3) with K·I around 10-20
  tests and ~80 paired prompts per look, the loss of power is small: a 0.5-SD paired shift is still found at
  its step in most simulations (tests/test_calibration.py measures both).
"""

from __future__ import annotations

import math

import numpy as np

from study.stats.core import ALPHA, paired_t


def first_significant(
    diffs: np.ndarray, min_effect=0.0, alpha_each: float = ALPHA, alternative: str = "greater"
) -> np.ndarray:
    """Index of the first look whose one-sided paired test rejects, NaN if none.

    `diffs`: (..., K looks, n prompts) per-prompt adapter − reference differences; `min_effect` broadcasts
    against (..., K) (e.g. shape (I, 1) for one value per indicator). Vectorised: simulations pass thousands
    of cells at once."""
    D = np.asarray(diffs, float)
    delta = np.asarray(min_effect, float)
    if alternative == "less":  # a falling indicator: test the sign-flipped difference
        D, alternative = -D, "greater"
    delta = delta[..., None] if delta.ndim else float(delta)  # one minimum effect per look row
    _, p = paired_t(D, np.zeros_like(D), axis=-1, alternative=alternative, delta=delta)
    sig = np.nan_to_num(p, nan=1.0) < alpha_each
    first = np.atleast_1d(np.argmax(sig, axis=-1).astype(float))
    first[~np.atleast_1d(sig.any(-1))] = np.nan
    return first if sig.ndim > 1 else first[0]


def onsets(
    adapter: dict[str, dict[int, np.ndarray]],
    reference: dict[str, np.ndarray | dict[int, np.ndarray]],
    min_effect: dict[str, float] | float = 0.0,
    alpha: float = ALPHA,
    direction: dict[str, str] | None = None,
) -> dict[str, float]:
    """Onset step per indicator for one cell; NaN when none within the budget or when it cannot be tested.

    `adapter[indicator][step]`: per-prompt values at that checkpoint (the final adapter included);
    `reference[indicator]`: the base's per-prompt values (one array, the same prompts) or the control cell's
    per step (a dict step -> array). An indicator without a reference (KL without a control cell) gets NaN and
    does not count in the family. `direction[indicator]` is "greater" (default) or "less"."""
    direction = direction or {}
    testable = [k for k in adapter if reference.get(k) is not None and len(adapter[k]) > 0]
    out = {k: math.nan for k in adapter}
    if not testable:
        return out
    n_tests = sum(len(adapter[k]) for k in testable)
    for k in testable:
        steps = sorted(adapter[k])
        ref = reference[k]
        rows = []
        for s in steps:
            if isinstance(ref, dict) and s not in ref:
                raise ValueError(f"{k}: the control has no measurement at step {s}")
            r = np.asarray(ref[s] if isinstance(ref, dict) else ref, float)
            a = np.asarray(adapter[k][s], float)
            if a.shape != r.shape:
                raise ValueError(
                    f"{k} at step {s}: adapter and reference must hold the same prompts, in order"
                )
            rows.append(a - r)
        delta = min_effect.get(k, 0.0) if isinstance(min_effect, dict) else min_effect
        i = first_significant(np.stack(rows), delta, alpha / n_tests, direction.get(k, "greater"))
        out[k] = math.nan if np.isnan(i) else float(steps[int(i)])
    return out


def align_prompts(adapter: dict[int, dict], reference: dict | None) -> tuple[dict[int, np.ndarray], object]:
    """Per-prompt records keyed by prompt id -> the arrays `onsets` takes, on the ids every step and the
    reference share (sorted). `adapter[step] = {prompt_id: value}`; `reference` = {prompt_id: value} (the base)
    or {step: {prompt_id: value}} (a control cell), or None (no reference: returned as None)."""
    if reference is None:
        return {s: np.array([v[k] for k in sorted(v)], float) for s, v in adapter.items()}, None
    per_step = all(isinstance(v, dict) for v in reference.values())
    ids = set.intersection(
        *(set(v) for v in adapter.values()),
        *((set(v) for v in reference.values()) if per_step else (set(reference),)),
    )
    ids = sorted(ids)
    a = {s: np.array([v[k] for k in ids], float) for s, v in adapter.items()}
    if per_step:
        return a, {s: np.array([v[k] for k in ids], float) for s, v in reference.items()}
    return a, np.array([reference[k] for k in ids], float)
