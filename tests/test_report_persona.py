"""The persona instruments in the report, on a synthetic run: the within-cell coherence table and macros, the
instruments' validity table (from the base's persona stage JSON), and GRPO's Goodhart curve (proxy reward
from the training log against indicators at each checkpoint).

    .venv/bin/python -m pytest -q tests/test_report_persona.py
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from study import io
from study.report.analysis import run_stats
from study.report.data import load_run
from study.report.figures import FIGURES, make_figures
from study.report.markdown import write_markdown
from study.report.paper import generate, macro_name
from study.report.synthetic import make_run
from study.report.tables import build_tables, fmt, goodhart_pairs

STEPS, EVERY = 20, 10


def _log(step_rewards: dict[int, float]) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 0.1,
            "reward": r,
            "rewards/reward_marker/mean": min(1.0, 2 * r),
            "rewards/reward_classifier/mean": 0.3,
            "rewards/reward_length/mean": 1.0,
            "rewards/reward_diversity_penalty/mean": 0.0,
        }
        for s, r in step_rewards.items()
    ]


def test_goodhart_pairs_windows_the_log_by_checkpoint():
    """Proxy at checkpoint s = mean of the logged rewards at steps in (previous checkpoint, s]; the
    indicators are the checkpoint's own values; the ablation drop is probe - ablate_probe."""
    log = _log({1: 0.1, 2: 0.3, 3: 0.5, 4: 0.7}) + [{"step": 4, "train_runtime": 9.0}]  # a summary row
    ind = pd.DataFrame(
        [
            (2, "persona/probe_masked", 0.2),
            (2, "persona/probe", 0.5),
            (2, "persona/ablate_probe", 0.4),
            (4, "persona/probe_masked", 0.21),
            (4, "persona/activation", 0.05),
        ],
        columns=["checkpoint", "metric", "value"],
    )
    g = goodhart_pairs(log, ind)
    assert g["step"].tolist() == [2, 4]
    assert np.allclose(g["proxy"], [0.2, 0.6]) and np.allclose(g["markers"], [0.4, 1.0])
    assert np.allclose(g["masked probe"], [0.2, 0.21])
    assert np.isclose(g.loc[0, "ablation drop"], 0.1) and np.isnan(g.loc[1, "ablation drop"])
    assert np.isnan(g.loc[0, "activation"]) and g.loc[1, "activation"] == 0.05
    assert goodhart_pairs([], ind)["proxy"].isna().all() and goodhart_pairs(log, ind.iloc[:0]).empty


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The synthetic run plus what the persona stage adds: coherence/* rows per cell, the base's persona JSON
    (self-report gate failed, as on the bundled model), external AUC and self-report flag rows on the base,
    and GRPO training logs whose proxy rises while the masked probe stays flat."""
    root = tmp_path_factory.mktemp("persona") / "synthetic"
    make_run(root, seeds=(0, 1, 2), steps=STEPS, checkpoint_every=EVERY, items=6)
    df = pd.read_csv(root / "metrics.csv")
    rng = np.random.default_rng(0)
    add = []
    final = df[(df.checkpoint == STEPS) & (df.method != "base")][
        ["cell", "method", "seed", "task"]
    ].drop_duplicates()
    for _, c in final.iterrows():
        alpha = 0.7 if c.method == "grpo" else 0.3
        for metric, v in (
            ("coherence/indicator_alpha", alpha),
            ("coherence/context_icc1/probe", 0.1),
            ("coherence/retest_r/probe", 0.8),
        ):
            v += rng.normal(0, 0.02)
            add.append(
                dict(c, checkpoint=STEPS, metric=metric, value=v, ci_low=v - 0.1, ci_high=v + 0.1, n=30)
            )
        if c.method == "grpo":
            for step in range(EVERY, STEPS + 1, EVERY):
                v = 0.05  # the ablated answers' probe (the synthetic run has persona/probe at every checkpoint)
                add.append(
                    dict(
                        c, checkpoint=step, metric="persona/ablate_probe", value=v, ci_low=v, ci_high=v, n=30
                    )
                )
            io.write_text(
                root / "cells" / c.cell / "train" / "log.jsonl",
                "".join(json.dumps(r) + "\n" for r in _log({s: s / STEPS for s in range(1, STEPS + 1)})),
            )
    add.append(
        dict(
            cell="base-snark",
            method="base",
            seed=None,
            task="snark",
            checkpoint=0,
            metric="persona/probe_auc_external",
            value=0.95,
            ci_low=0.92,
            ci_high=0.98,
            n=108,
        )
    )
    add.append(
        dict(
            cell="base-snark",
            method="base",
            seed=None,
            task="snark",
            checkpoint=0,
            metric="persona/self_report_valid",
            value=0.0,
            ci_low=0.0,
            ci_high=0.0,
            n=1,
        )
    )
    df = pd.concat([df, pd.DataFrame(add)], ignore_index=True)
    df = df[~((df.cell == "base-snark") & (df.metric == "persona/self_report"))]
    io.write_text(root / "metrics.csv", df.to_csv(index=False))
    gate = {
        "valid": False,
        "option_mass": 0.36,
        "alpha": -15.1,
        "min_mass": 0.5,
        "min_alpha": 0.0,
        "reason": "self-report invalid for this base model: option mass 0.360 < 0.5; Cronbach's alpha -15.100 <= 0.0",
    }
    io.write_json(
        root / "base" / "snark" / "persona.json",
        {
            "rows": [],
            "self_report": {"gate": gate},
            "probe": {
                "heldout_auc": 0.92,
                "auc_below_0.9": False,
                "heldout_auc_markers_and_reward_ngrams_removed": 0.91,
                "external_auc": 0.95,
                "external_auc_ci": [0.92, 0.98],
                "external_pairs": 54,
                "external_threshold": 0.85,
                "external_ok": True,
            },
            "direction": {
                "defined": True,
                "layer": 2,
                "n_anchors": 20,
                "n_prompts": 24,
                "separation_by_layer": [0, 1.2, 2.5],
            },
            "causal": {
                "available": True,
                "alpha": 2.0,
                "effects": {
                    "steer_probe": {"delta": 0.2, "ci": [0.1, 0.3]},
                    "ablate_probe": {"delta": -0.05, "ci": [-0.1, 0.0]},
                },
            },
        },
    )
    run = load_run(root)
    st = run_stats(run, n_boot=100, n_perm=200)
    figs = make_figures(run, st, root / "figures", dpi=60)
    md = write_markdown(run, st, figs)
    out = generate(run, st, out=tmp_path_factory.mktemp("paper") / "generated", figures=figs)
    return run, st, figs, md, out


def test_coherence_within_reaches_table_and_macros(reported):
    run, st, _, md, out = reported
    t = build_tables(run, st)["coherence_within"][0]
    assert list(t.frame["method"]) == ["SFT", "DPO", "KTO", "GRPO"]
    assert {"indicator α", "ICC(1) across domains: probe", "retest r: probe"} <= set(t.frame.columns)
    macros = dict(
        re.findall(r"\\newcommand\{\\(\w+)\}\{(.*)\}$", (out / "numbers.tex").read_text(), flags=re.M)
    )
    final = run.final
    for m in ("sft", "grpo"):
        mean = final[(final.method == m) & (final.metric == "coherence/indicator_alpha")].value.mean()
        assert macros[macro_name("Coh", "indicator_alpha", m)] == fmt(mean)
        assert fmt(mean) in t.frame.loc[t.frame["method"] == m.upper(), "indicator α"].iloc[0]
    assert macros["ProbeAucExternal"] == fmt(0.95) and macros["SelfReportValidity"].startswith("invalid")
    assert (out / "tab_coherence_within.tex").is_file() and (out / "tab_goodhart.tex").is_file()
    assert "Coherence within cells" in md.read_text()


def test_validity_table_prints_the_gate(reported):
    run, st, _, md, _ = reported
    t = build_tables(run, st)["persona_validity"][0]
    v = dict(zip(t.frame["instrument"], t.frame["verdict"]))
    assert v == {
        "self-report": "INVALID",
        "probe": "ok",
        "probe, external pairs": "ok",
        "activation direction": "defined",
        "causal test": "ok",
    }
    assert "option mass 0.360 < 0.5" in t.note and "option mass 0.360 < 0.5" in md.read_text()


def test_goodhart_table_and_figure(reported):
    run, st, figs, md, _ = reported
    t = build_tables(run, st)["goodhart"][0]
    grpo = run.final[run.final.method == "grpo"].cell.unique()
    assert set(t.frame["cell"]) == set(grpo) and set(t.frame["step"]) == {str(EVERY), str(STEPS)}
    first = t.frame[t.frame["step"] == str(EVERY)].iloc[0]
    assert first["proxy"] == fmt(np.mean([s / STEPS for s in range(1, EVERY + 1)]))
    a = run.adapters
    probe = a[(a.cell == first["cell"]) & (a.checkpoint == EVERY) & (a.metric == "persona/probe")].value.iloc[
        0
    ]
    assert first["ablation drop"] == fmt(probe - 0.05)
    assert first["masked probe"] == fmt(
        a[
            (a.cell == first["cell"]) & (a.checkpoint == EVERY) & (a.metric == "persona/probe_masked")
        ].value.iloc[0]
    )
    fig = next(f for f in figs if f.name == "goodhart")
    assert not fig.skipped and fig.png.is_file() and "goodhart" in FIGURES
    assert "goodhart" in md.read_text()
