"""A synthetic run folder with planted effects: for the report's tests and for previewing the paper.

    python -m study.report.synthetic /tmp/synth && study report /tmp/synth --paper --no-collect

The layout is a real run's (metrics.csv, cells/<cell>/cell.json, status.json, a stage JSON with per-item
scores, protocol.yaml, manifest.json); the numbers are made up: forgetting grows linearly with forward KL,
GRPO drifts least, SFT most. Nothing here may be read as a result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from study import io
from study.paths import RunPaths

BENCHMARKS = {"mmlu": ("acc", 0.55), "hellaswag": ("acc_norm", 0.60), "truthfulqa_mc2": ("acc", 0.45)}
INDICATORS = ["marker_rate", "probe", "probe_masked", "self_report", "activation"]
DOMAINS = ["history", "animals", "music"]
KL_SCALE = {"sft": 1.6, "dpo": 1.0, "kto": 0.9, "grpo": 0.35}  # planted: RL drifts least


def make_run(
    root: str | Path,
    methods=("sft", "dpo", "kto", "grpo"),
    seeds=(0, 1, 2),
    sweep=None,
    tasks=("snark",),
    steps: int = 40,
    checkpoint_every: int = 10,
    families=("all",),
    kl_scale: dict | None = None,
    seed: int = 0,
    items: int = 12,
    regression_items: int = 0,
) -> RunPaths:
    """Write a synthetic run; `families` limits the metric families ("newtask", "kl", "lm_eval", "persona",
    "emergence", "lora", or "all"); `sweep` e.g. {"learning_rate": [1e-5, 3e-5]} for every method.
    `regression_items` > 0: the regression stage's per-item records (that many items per benchmark) for the
    base and every final adapter, as regression.json keeps them (forgetting read item by item)."""
    rng = np.random.default_rng(seed)
    rp = RunPaths(Path(root))
    rp.root.mkdir(parents=True, exist_ok=True)
    kl_scale = kl_scale or KL_SCALE
    fam = set(families)

    def want(f: str) -> bool:
        return "all" in fam or f in fam

    sweep = sweep or {}
    keys = sorted(sweep)
    points = [dict(zip(keys, v, strict=True)) for v in itertools.product(*(sweep[k] for k in keys))] or [{}]
    train = {
        "prompts_per_step": 4,
        "grad_accum": 1,
        "learning_rate": 1e-4,
        "max_length": 128,
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "warmup_ratio": 0.0,
        "max_completion_length": 48,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    }
    rows = []

    def add(cell, method, s, ckpt, metric, value, task, half=0.03, n=100):
        rows.append(
            dict(
                cell=cell,
                method=method,
                seed=s,
                checkpoint=ckpt,
                metric=metric,
                value=value,
                ci_low=value - half,
                ci_high=value + half,
                task=task,
                n=n,
            )
        )

    for task in tasks:
        base = f"base-{task}"
        if want("newtask"):
            add(base, "base", None, 0, "newtask/success", 0.2, task)
        for b, (m, score) in BENCHMARKS.items():
            if want("lm_eval"):
                add(base, "base", None, 0, f"lm_eval/{b}/{m}", score, task)
        if want("persona"):
            for ind in INDICATORS:
                add(base, "base", None, 0, f"persona/{ind}", 0.1, task)
        item_base = rng.random(items) < 0.3
        reg_cfg = {"suites": ["hellaswag"]}  # the protocol's regression settings below
        reg_base = {b: rng.random(regression_items) < score for b, (_, score) in BENCHMARKS.items()}

        def regression(correct: dict) -> dict:
            return {
                "config": reg_cfg,
                "rows": [],
                "items": {
                    b: [
                        {"doc_id": i, "correct": int(c), "p_gold": 0.25 + 0.5 * c, "chance": 0.25}
                        for i, c in enumerate(v)
                    ]
                    for b, v in correct.items()
                },
            }

        if regression_items:
            io.write_json(rp.root / "base" / "model" / "regression.json", regression(reg_base))
        io.write_json(
            rp.base(task) / "newtask.json",
            {
                "rows": [],
                "responses": [
                    {"id": f"q{i}", "metric": "newtask/success", "score": float(v)}
                    for i, v in enumerate(item_base)
                ],
            },
        )
        for method in methods:
            for point in points:
                lr_factor = 1.0 if not point else point.get("learning_rate", 1e-4) / 1e-4
                for s in seeds:
                    cfg = {
                        "method": method,
                        "seed": s,
                        "sweep": point,
                        "task": {"name": task},
                        "train": {**train, **point},
                        "options": {},
                        "schema_version": 1,
                    }
                    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
                    tag = "".join(f"-{k}{v}" for k, v in sorted(point.items()))
                    cell = f"{task}-{method}{tag}-s{s}-{h}"
                    cp = rp.cell(cell)
                    io.write_json(cp.config, cfg)
                    io.write_json(cp.status, {"state": "done"})
                    seed_shift = 0.05 * (s - 1)
                    kl_final = kl_scale[method] * math.sqrt(lr_factor) * math.exp(rng.normal(0, 0.15))
                    for ckpt in range(checkpoint_every, steps + 1, checkpoint_every):
                        frac = ckpt / steps
                        final = ckpt == steps
                        kl = kl_final * frac
                        forget = 0.02 * kl + seed_shift * 0.01 + rng.normal(0, 0.003)
                        success = 1 / (1 + math.exp(-(2.5 * kl - 1.0))) + rng.normal(0, 0.02)
                        if want("kl") and (final or want("emergence")):
                            add(cell, method, s, ckpt, "kl/forward_newtask", kl, task, 0.02 * kl)
                            add(
                                cell,
                                method,
                                s,
                                ckpt,
                                "kl/reverse_newtask",
                                kl * 0.8 + abs(rng.normal(0, 0.1)),
                                task,
                            )
                            add(
                                cell,
                                method,
                                s,
                                ckpt,
                                "kl/forward_general",
                                kl * 0.3 + abs(rng.normal(0, 0.05)),
                                task,
                            )
                        if want("lora") and final:
                            add(
                                cell,
                                method,
                                s,
                                ckpt,
                                "lora/delta_norm",
                                0.5 * lr_factor + rng.normal(0, 0.05),
                                task,
                            )
                        if want("lm_eval") and (final or want("emergence")):
                            fs = []
                            for b, (m, score) in BENCHMARKS.items():
                                fb = forget * (1.5 if b == "truthfulqa_mc2" else 1.0) + rng.normal(0, 0.002)
                                fs.append(fb)
                                add(cell, method, s, ckpt, f"lm_eval/{b}/{m}", score - fb, task)
                                add(cell, method, s, ckpt, f"forgetting/{b}", fb, task)
                            add(cell, method, s, ckpt, "forgetting/mean", float(np.mean(fs)), task)
                        if want("newtask") and (final or want("emergence")):
                            add(cell, method, s, ckpt, "newtask/success", success, task)
                            if final:
                                add(
                                    cell,
                                    method,
                                    s,
                                    ckpt,
                                    "newtask/success_indomain",
                                    min(1, success + 0.1),
                                    task,
                                )
                        if want("persona") and (final or want("emergence")):
                            surface = 0.6 if method == "sft" else 0.3
                            for ind in INDICATORS:
                                v = (
                                    0.1
                                    + frac * (surface if ind == "marker_rate" else 0.4)
                                    + rng.normal(0, 0.03)
                                )
                                if ind == "probe_masked":
                                    v = 0.1 + frac * (0.15 if method == "sft" else 0.35) + rng.normal(0, 0.03)
                                add(cell, method, s, ckpt, f"persona/{ind}", v, task)
                                if final:
                                    for d in DOMAINS:
                                        add(
                                            cell,
                                            method,
                                            s,
                                            ckpt,
                                            f"persona/{ind}/{d}",
                                            v + rng.normal(0, 0.03),
                                            task,
                                        )
                    if want("emergence"):
                        for i, ind in enumerate(INDICATORS):
                            add(
                                cell,
                                method,
                                s,
                                steps,
                                f"emergence/onset/{ind}",
                                float(
                                    checkpoint_every
                                    * (1 + (i + (method == "grpo")) % (steps // checkpoint_every))
                                ),
                                task,
                            )
                    if method == "grpo" and want("persona"):  # the training log: proxy reward and components
                        log = [
                            {
                                "step": k,
                                "reward": 0.3 + 0.5 * k / steps,
                                "rewards/snark_reward/mean": 0.3 + 0.5 * k / steps,
                                "rewards/reward_marker/mean": min(1.0, 0.2 + k / steps),
                                "rewards/reward_classifier/mean": 0.4 + 0.1 * k / steps,
                                "rewards/reward_length/mean": 0.9,
                                "rewards/reward_diversity_penalty/mean": 0.02,
                            }
                            for k in range(1, steps + 1)
                        ]
                        io.write_text(cp.train_log, "".join(json.dumps(r) + "\n" for r in log))
                    if regression_items:  # the adapter loses a right answer with prob 0.1 + its forgetting
                        lost = {
                            b: v & (rng.random(regression_items) >= 0.1 + 0.02 * kl_final)
                            for b, v in reg_base.items()
                        }
                        io.write_json(cp.stage("regression"), regression(lost))
                    p_item = 1 / (1 + math.exp(-(2.5 * kl_final - 1.0)))
                    io.write_json(
                        cp.stage("newtask"),
                        {
                            "rows": [],
                            "responses": [
                                {
                                    "id": f"q{i}",
                                    "metric": "newtask/success",
                                    "score": float(rng.random() < p_item),
                                }
                                for i in range(items)
                            ],
                        },
                    )
    df = pd.DataFrame(
        rows,
        columns=["cell", "method", "seed", "checkpoint", "metric", "value", "ci_low", "ci_high", "task", "n"],
    )
    df["seed"] = df["seed"].astype("Int64")
    io.write_text(rp.metrics, df.to_csv(index=False))
    import yaml

    proto = {
        "name": "synthetic",
        "description": "synthetic data with planted effects (not a result)",
        "tasks": [{"name": t} for t in tasks],
        "train": train,
        "seeds": list(seeds),
        "methods": {m: ({"sweep": {k: list(v) for k, v in sweep.items()}} if sweep else {}) for m in methods},
        "model": {"source": "tiny-random"},
        "regression": {"suites": ["hellaswag"]},
    }
    io.write_text(rp.protocol, yaml.safe_dump(proto, sort_keys=False))
    io.write_json(rp.manifest, {"git": {"commit": "0" * 40, "dirty": False}, "synthetic": True})
    return rp


if __name__ == "__main__":
    out = make_run(
        sys.argv[1] if len(sys.argv) > 1 else "results/synthetic", sweep={"learning_rate": [3e-5, 1e-4, 3e-4]}
    )
    print(out.root)
