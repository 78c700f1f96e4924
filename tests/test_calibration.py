"""Null and planted-effect simulations, one per statistic family of study.stats, plus the wrappers against
their libraries.

    .venv/bin/python -m pytest -q tests/test_calibration.py          # < 90 s on one core
    .venv/bin/python -m study.stats.calibrate                       # the larger runs (make calibrate)

Bound used throughout: a type-I rate passes when it is at most alpha + 3 binomial standard errors,
alpha + 3 sqrt(alpha (1 - alpha) / n_sims) (one-sided normal approximation to Binomial(n_sims, alpha): a rule
with rate exactly alpha fails by chance with probability ~0.1 %). Every simulation has a fixed seed, so the
file is deterministic; where the old rule is replicated, the test also asserts that the old rule FAILS the
same bound, so the simulation is shown to have teeth.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from study.stats import calibrate as C
from study.stats import core
from study.stats.forgetting import align_items, floor_flag, paired_forgetting, paired_forgetting_mean
from study.stats.items import crossed_mean_t, effects_vs_reference
from study.stats.law import within_law
from study.stats.onsets import align_prompts, onsets
from study.stats.power import DEFAULT_PRIMARY, mde, power_paired_t, power_table

ALPHA = core.ALPHA


def bound(n: int, rate: float = ALPHA) -> float:
    return rate + 3 * math.sqrt(rate * (1 - rate) / n)


def by_rule(rows, rule, quantity_start):
    return next(r for r in rows if r["rule"] == rule and r["quantity"].startswith(quantity_start))


# ------------------------------------------------------------------------------------ the wrappers


def test_wrappers_match_their_libraries():
    from scipy import stats as st
    from statsmodels.stats.multitest import multipletests
    from statsmodels.stats.proportion import proportion_confint

    p = np.array([0.01, 0.04, 0.03, 0.2, 0.005, 0.5])
    assert np.allclose(core.holm(p), multipletests(p, method="holm")[1])
    assert np.isnan(core.holm([0.01, np.nan])[1])
    assert core.wilson(3, 78) == pytest.approx(proportion_confint(3, 78, method="wilson"))
    assert all(math.isnan(v) for v in core.wilson(0, 0))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    r, lo, hi, pv = core.pearson_ci(x, x + y)
    ref = st.pearsonr(x, x + y)
    assert r == pytest.approx(ref.statistic) and lo < r < hi and pv == pytest.approx(ref.pvalue)
    t, pt = core.paired_t(x, y)
    assert pt == pytest.approx(st.ttest_rel(x, y).pvalue)
    lo, hi = core.bootstrap_mean_ci(x, n_boot=2000)
    assert lo < x.mean() < hi and core.bootstrap_mean_ci([2.0]) == (2.0, 2.0)
    assert core.kendall_w(np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3.0]])) == pytest.approx(1.0)
    assert core.kendall_w(np.array([[1, 3], [2, 2], [3, 1.0]])) == pytest.approx(0.0)
    a, alo, ahi = core.cronbach_alpha(rng.normal(size=(40, 1)) + rng.normal(size=(40, 5)))
    assert alo < a < ahi and a > 0.5
    row = core.MetricRow("c", "sft", 0, 10, "forgetting/mmlu", 0.1, 0.0, 0.2, "snark", 57, "floor")
    assert row.as_dict()["flag"] == "floor"


# ------------------------------------------------------------------------------------------ onsets


def test_onsets_null_and_planted():
    n = 600
    base, adapter, _ = C.simulate_onset_data(n, seed=101)
    after = np.isfinite(C.onset_after(base, adapter)).any(1).mean()
    before = np.isfinite(C.onset_before(base, adapter)).any(1).mean()
    assert after <= bound(n), f"false onsets in {after:.3f} of null cells"
    assert before > bound(n)  # the old rule (CI excludes the base's point value) fails the same bound
    base, adapter, _ = C.simulate_onset_data(400, seed=102, shift=0.5)
    on = C.onset_after(base, adapter)
    assert (on[:, 1] == 1).mean() >= 0.8, "a 0.5-SD onset planted at look 2 must be found there"


def test_onsets_dict_api_and_references():
    rng = np.random.default_rng(3)
    base = rng.normal(size=60)
    steps = {10: base + rng.normal(0, 0.3, 60), 20: base + 1.0 + rng.normal(0, 0.3, 60)}
    out = onsets(
        {"persona/probe": steps, "kl/forward_newtask": {10: np.ones(60), 20: np.ones(60)}},
        {"persona/probe": base, "kl/forward_newtask": None},
        min_effect={"persona/probe": 0.2},
    )
    assert out["persona/probe"] == 20
    assert math.isnan(out["kl/forward_newtask"])  # no control cell: a KL onset cannot be read against 0
    ctrl = {10: np.ones(60), 20: np.ones(60)}  # against the control's KL, an adapter with the same KL: none
    assert math.isnan(
        onsets({"kl/forward_newtask": ctrl}, {"kl/forward_newtask": ctrl})["kl/forward_newtask"]
    )
    big = onsets(
        {"persona/probe": steps}, {"persona/probe": base}, min_effect=2.0
    )  # below the minimum effect
    assert math.isnan(big["persona/probe"])
    with pytest.raises(ValueError):
        onsets({"persona/probe": {10: base[:5]}}, {"persona/probe": base})
    a, ref = align_prompts(
        {10: {"p1": 1.0, "p2": 2.0, "p3": 0.0}, 20: {"p2": 3.0, "p1": 4.0}}, {"p1": 0.5, "p2": 0.0}
    )
    assert ref.tolist() == [0.5, 0.0] and a[20].tolist() == [4.0, 3.0] and a[10].tolist() == [1.0, 2.0]
    a, ref = align_prompts({10: {"p1": 1.0}}, {10: {"p1": 0.2, "p9": 1.0}})
    assert ref[10].tolist() == [0.2]


# -------------------------------------------------------------------------------------- item model


@pytest.mark.parametrize("cell_sd", [0.0, 0.1, 0.2])
def test_item_model_family_wise_null(cell_sd):
    n = 400
    base, y = C.simulate_item_data(n, cell_sd, seed=200 + int(cell_sd * 10))
    fwer = (C.items_after(base, y).min(1) * 4 < ALPHA).mean()  # Holm rejects anything iff min p <= alpha/4
    assert fwer <= bound(n), f"family-wise {fwer:.3f} at cell SD {cell_sd}"
    # (the old item x seed MixedLM fails this bound at cell SD 0.1 and 0.2; refitting it takes seconds per
    # study, so that is measured by `python -m study.stats.calibrate`, not here)


def test_item_model_planted_and_frame_api():
    base, y = C.simulate_item_data(300, 0.1, seed=210, effect=1.0)
    assert (C.items_after(base, y)[:, 0] * 4 < ALPHA).mean() >= 0.8
    # the data-frame entry point gives the same numbers as the array one
    rows = [("base", "base", i, v) for i, v in enumerate(base[0])]
    rows += [(f"m{m}", f"m{m}-s{c}", i, y[0, m, c, i]) for m in range(4) for c in range(3) for i in range(40)]
    out = effects_vs_reference(pd.DataFrame(rows, columns=["method", "cell", "item", "y"])).set_index(
        "method"
    )
    est, lo, hi, p, df = crossed_mean_t(y[0] - base[0][None, None, :])
    assert out["est"].to_numpy() == pytest.approx(est) and out["ci_low"].to_numpy() == pytest.approx(lo)
    assert (out["df"] >= 2).all() and out["p_holm"].to_numpy() == pytest.approx(core.holm(p))
    # the fiducial interval: t on cells − 1 when the item part is nil, the normal when it is everything
    _, lo, _, _, df = crossed_mean_t(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    assert lo == pytest.approx(1 - 4.3027 * math.sqrt(1 / 3), abs=1e-3) and df == pytest.approx(2, abs=0.01)


# ----------------------------------------------------------------------------------------- MixedLM


def test_mixed_contrasts_t_intervals_null_and_planted():
    rows = C.sim_mixed(120, seed=300, shift=3.5)
    after = by_rule(rows, "after", "type-I")
    before = by_rule(rows, "before", "type-I")
    assert after["rate"] <= bound(120), after
    assert before["rate"] > after["rate"]  # Wald z excludes 0 more often than the t interval
    assert by_rule(rows, "after", "power")["rate"] >= 0.8


# ------------------------------------------------------------------------------- paired forgetting


DEFAULT = C.FORGETTING_REGIMES[0][1]  # 3 seeds, 3 suites x 60 binary items (the default study)


@pytest.mark.parametrize("k", range(len(C.FORGETTING_REGIMES)))
def test_paired_forgetting_null_in_every_regime(k):
    label, regime = C.FORGETTING_REGIMES[k]
    n = 600  # the default study's rate is 0.037 (10,000 studies): within 3 MC SE of alpha here
    rate = C.forgetting_type1("after", regime, n, seed=400 + k)
    assert rate <= bound(n), f"{label}: type-I {rate:.3f}"
    if k == 0:  # the default study: within MC error of alpha on both sides, not just below
        assert rate >= ALPHA - 3 * math.sqrt(ALPHA * (1 - ALPHA) / n), f"{label}: type-I {rate:.3f}"
        assert C.forgetting_type1("before (crossed, t on cells - 1)", regime, n, 400) < 0.02  # the old waste


def test_paired_forgetting_planted_and_old_rules():
    n = 800
    assert C.forgetting_power("after", DEFAULT, n, seed=410, plant=0.2) >= 0.8
    after = C.forgetting_power("after", DEFAULT, n, seed=412, plant=0.15)
    old = C.forgetting_power("before (crossed, t on cells - 1)", DEFAULT, n, seed=412, plant=0.15)
    assert after > old + 0.1, (after, old)  # the power the old t on cells − 1 wasted
    # the report's old method-level CI (t over the cells' values) ignores the shared item sample: liberal
    assert C.forgetting_type1("before (t over cells)", dict(DEFAULT, seed_sd=0.0), n, 411) > bound(n)


def test_floor_flag_at_chance_and_above():
    rows = C.sim_floor(1500, seed=420)
    at, above = rows
    assert at["rate"] >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / 1500), at  # a base at chance: flagged floor
    assert above["rate"] >= 0.8, above  # 0.2 above chance on 60 items: not flagged


def test_paired_forgetting_api_and_floor():
    base = [{"doc_id": i, "correct": int(i % 2 == 0), "p_gold": 0.5} for i in range(40)]
    ads = [[dict(r, correct=0) if r["doc_id"] < 10 else r for r in base[::-1]] for _ in range(3)]
    b, a = align_items(base, ads)
    assert b.shape == (40,) and a.shape == (3, 40)
    est, lo, hi = paired_forgetting(b, a)
    assert est == pytest.approx(5 / 40) and lo <= est <= hi  # doc_ids 0,2,...,8 lost: 5 of 40
    one = paired_forgetting(b, a[0])
    assert one[0] == pytest.approx(est) and one[1] < one[0] < one[2]
    m = paired_forgetting_mean({"x": (b, a), "y": (b, a)})
    assert m[0] == pytest.approx(est)
    assert floor_flag(np.r_[np.ones(6), np.zeros(14)], chance=0.25) == "floor"
    assert floor_flag(np.r_[np.ones(60), np.zeros(40)], chance=0.25) == ""
    assert floor_flag(np.ones(30), chance=0.25) == "ceiling"


# --------------------------------------------------------------------------------------------- law


def test_law_null_with_method_confound_and_planted():
    rows = C.sim_law(300, seed=500)
    after, before = by_rule(rows, "after", "type-I"), by_rule(rows, "before", "type-I")
    assert after["rate"] <= bound(300), after
    assert before["rate"] > bound(300)  # the pooled fit reports a law made of four clusters
    assert by_rule(rows, "after", "power")["rate"] >= 0.8


def test_within_law_recovers_a_slope():
    rng = np.random.default_rng(7)
    x, y, m, c = C.simulate_law(rng, slope=0.6)
    fit = within_law(x, y, m, c)
    assert fit["slope_low"] < 0.6 < fit["slope_high"] and fit["r2_low"] > 0 and fit["df"] == 36 - 4 - 1
    assert "too few" in within_law([1, 2], [1, 2], ["a", "a"], [0, 1])["note"]


# ------------------------------------------------------------------------------------------- power


def test_mde_gives_eighty_percent_power():
    rows = C.sim_power(4000, seed=600)
    pw, t1 = rows
    assert abs(pw["rate"] - 0.8) <= 3 * math.sqrt(0.8 * 0.2 / 4000), pw
    assert t1["rate"] <= bound(4000, ALPHA / 2)
    assert power_paired_t(mde(1.0, 5, 0.01), 1.0, 5, 0.01) == pytest.approx(0.8, abs=1e-6)
    assert math.isinf(mde(1.0, 1, 0.05))


def test_power_table_from_sizes():
    sizes = {"seeds": 3, "points": {"sft": 1, "grpo": 1}, "items": {"forgetting": 100}}
    t = power_table(
        [
            DEFAULT_PRIMARY[0] | {"task": "snark"},
            {"metric": "kl/forward_newtask", "task": "snark", "contrast": ["grpo", "control"]},
        ],
        sizes,
    )
    assert len(t) == 2 and (t["m_tests"] == 2).all() and (t["alpha_each"] == ALPHA / 2).all()
    assert "control not in the protocol" in t["note"].iloc[1]
    more = power_table([DEFAULT_PRIMARY[0] | {"task": "snark"}], sizes | {"seeds": 6})
    assert more["mde"].iloc[0] < t["mde"].iloc[0]  # more seeds, smaller MDE


# --------------------------------------------------------------------------------- calibrate script


def test_calibrate_writes_and_skips_when_unchanged(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "SIMULATIONS", {"power": C.sim_power})
    out = tmp_path / "calibration.json"
    assert C.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["hash"] == C.source_hash() and {r["statistic"] for r in data["rows"]} == {"power (MDE)"}
    C.main(["--out", str(out)])
    assert "up to date" in capsys.readouterr().out
    from study.report.checks import calibration_table

    table = calibration_table(out)
    assert len(table) == 2 and not table["stale"].any()


def test_stats_package_imports_no_torch_and_no_other_study_module():
    import subprocess
    import sys

    code = (
        "import sys, importlib, pkgutil, study.stats as s\n"
        "for m in pkgutil.iter_modules(s.__path__): importlib.import_module('study.stats.' + m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'trl')\n"
        "       or (m.startswith('study.') and not m.startswith('study.stats'))]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
