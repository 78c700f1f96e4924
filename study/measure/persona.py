"""The persona-coherence stage: does the snark persona emerge as a trait, or only as surface markers?

Indicators, per response (the model's greedy answers to held-out-domain prompts), then per cell (95% CI):

    persona/marker_rate    share of responses with >= 1 lexicon marker (Wilson CI). The REWARDED channel:
                           GRPO's reward scores these markers, so GRPO optimised it directly.
    persona/probe          mean calibrated probability of an embedding probe (all-MiniLM-L6-v2 features,
                           logistic regression fitted on the training split's persona vs neutral answers;
                           persona_stats). No method optimised it: GRPO's classifier is a bag of words on
                           its own half of the data. Its held-out-domain AUC is stored; < 0.9 warns.
    persona/probe_masked   the same probe on the response with every lexicon marker AND the GRPO reward
                           classifier's `mask_reward_ngrams` most persona-weighted n-grams stripped
                           (persona_stats.mask, study.rewards.reward_ngrams): what the reward could see is
                           gone, so a surface-only persona collapses here.
    persona/self_report    a questionnaire (questionnaire.yaml: 20 Likert items, half reverse-keyed),
                           each item's score the expected value of the softmax over the log-likelihoods
                           of the options "1".."5", reverse-keyed items as 6 - x; the mean over items and
                           respondents (CI: BCa bootstrap over respondents, never over items, whose keying
                           differs systematically). "Respondents" are the model under each paraphrased
                           instruction, asked cold and after each of `self_report_contexts` held-out
                           exchanges: 6 x 3 = 18 by default. The JSON also keeps the forward-minus-reverse
                           raw agreement (a trait raises it; acquiescence does not).
                           VALIDITY GATE, judged on the base: option mass >= self_report_min_mass and
                           Cronbach's alpha > self_report_min_alpha. Below it (SmolLM2-135M: mass 0.36,
                           alpha < 0) no self-report value row is written, only `persona/self_report_valid`
                           = 0 with the reason in `flag` and in the JSON (`self_report.gate`).
    persona/activation     a persona direction in the BASE model: at one layer, the mean hidden state of
                           the base's answers to training prompts generated WITH a persona system prompt
                           minus that of its answers WITHOUT it (both teacher-forced in the plain
                           evaluation context, mean-pooled over answer tokens); the layer is the one whose
                           direction best separates the two on the other half of those prompts. Anchors
                           pass a quality filter first (`anchor_pairs`: a pair is dropped when either
                           answer has < 3 words or more than `anchor_max_repetition` repeated word
                           3-grams, or the two answers are identical; < 4 pairs left: no direction).
                           Each model's own held-out responses are projected on it, in base units:
                           0 = the base's plain answers, 1 = its persona-prompted answers.
    persona/activation_content   the adapter's answers read by the BASE (what the text carries)
    persona/activation_weights   the base's answers read by the ADAPTER (what the weights add); on the
                           base all three coincide.
    persona/steer_<ind>, persona/ablate_<ind>   the causal test, ind in marker_rate, probe, probe_masked,
                           activation: the model's answers to `causal_prompts` held-out prompts generated
                           again with steer_alpha x the direction added at its layer (forward hook), and
                           with the direction projected out there. If the direction carries the trait,
                           steering raises the indicators and ablation lowers them; paired deltas with CIs
                           in the JSON (`causal.effects`).
    persona/probe_auc_external   (base only) the probe's AUC on persona_external.jsonl: 54 persona/neutral
                           pairs in other domains and another voice, never fitted on; `check_probe`
                           (persona_stats) fails below `external_auc_min` before a study runs.
    persona/judge          optional: an LLM judge named in the config rates each response 1-5 under both
                           scale orders (scaled to 0-1). Absent (no row) when no judge is configured or it
                           cannot be loaded; the JSON says why.
    persona/<ind>/<domain> each per-response indicator per held-out domain.

Per response the JSON keeps the text and `markers` (the marker count), `probe`, `probe_masked`,
`activation` (and `activation_content`, `activation_weights`, `judge`), for the held-out, in-domain test
and retest answers.

Within-cell coherence, `coherence/*` (the statistics that need per-response data; the report's coherence
table computes the rest from metrics.csv, and prints these in its `coherence_within` table and macros):

    coherence/indicator_alpha      Cronbach's alpha across the standardised independent indicators
                                   (marker count, probe_masked, activation, judge), responses as subjects
    coherence/context_icc1/<ind>   ICC(1), domains as targets: share of variance due to the held-out domain
    coherence/retest_r/<ind>       test-retest: the same held-out prompts sampled under two seeds,
                                   Pearson r across prompts (scipy's Fisher CI)

A statistic that is undefined for a cell (e.g. no marker anywhere) has no row; the JSON says why. The
direction is computed once per base model (`with model.disable_adapter()` on a PeftModel), memoised in the
process and, given `cache` (the runner passes results/<protocol>/base/<task>/persona_direction.npz), stored
on disk and reused when its key (base weights fingerprint + config) matches. The base's held-out answers
and questionnaire (for the weights-only projection and the gate) are memoised per process.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_persona.py
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np

from study.config import PERSONA_PROMPT, PersonaEval  # noqa: F401  (PERSONA_PROMPT: re-exported)
from study.measure.persona_lm import (  # noqa: F401  (re-exported: the stage's public API)
    QUESTIONNAIRE,
    _prefix_ids,  # noqa: F401  (tests read prompts through it)
    ablation,
    base_policy,
    edit_hidden,
    item_prompt,
    keyed,
    likert,
    load_questionnaire,
    respondent_ci,
    response_states,
    self_report,
    self_report_gate,
    steering,
)
from study.measure.persona_stats import Direction
from study.tasks import TaskData, snark

log = logging.getLogger("study")
INDICATORS = {
    "marker_rate": "REWARDED channel: GRPO's reward scores the same lexicon markers",
    "probe": "not optimised by any method (GRPO's classifier is a bag of words on its own half of the data)",
    "probe_masked": "not optimised: the probe on the response with the lexicon markers removed",
    "self_report": "not optimised: option likelihoods on a questionnaire no method saw",
    "activation": "not optimised: projection on a direction of the base model's hidden states",
    "activation_content": "not optimised: the model's answers read by the base (content only)",
    "activation_weights": "not optimised: the base's answers read by the model (weights only)",
    "steer_probe": "causal: the probe on answers generated with the direction added",
    "ablate_probe": "causal: the probe on answers generated with the direction projected out",
    "judge": "not optimised: an external LLM judge (only where configured and loadable)",
}


# ---------------------------------------------------------------------------------------- direction


_DIRECTIONS: dict[str, Direction] = {}  # key -> direction, for the process


def fingerprint(model) -> str:
    """Identifies the base weights by the exact bytes of the input embeddings (LoRA never touches them). Not a
    float sum: its rounding depends on the thread count, and a key must not change with OMP_NUM_THREADS."""
    w = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(f"{tuple(w.shape)}|".encode() + w.numpy().tobytes()).hexdigest()[:16]


def direction_items(data: TaskData, n: int, seed: int) -> list:
    by_domain: dict[str, list] = {}
    for it in data.train:
        by_domain.setdefault(it.domain, []).append(it)
    rng = random.Random(seed)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_domain.items())]
    out = [p[i] for i in range(max(map(len, pools), default=0)) for p in pools if i < len(p)]  # round robin
    return out[:n]


def degenerate(text: str, max_repetition: float) -> bool:
    """An anchor answer not worth averaging: under 3 words, or more than `max_repetition` of its word
    3-grams repeat an earlier one (a small model's loops: "the the the", a sentence said four times)."""
    w = text.lower().split()
    if len(w) < 3:
        return True
    grams = list(zip(w, w[1:], w[2:]))
    return bool(grams) and 1 - len(set(grams)) / len(grams) > max_repetition


def anchor_pairs(persona: list[str], plain: list[str], max_repetition: float) -> tuple[list[int], list[dict]]:
    """Indices of the prompts whose persona-prompted and plain answers both pass the quality filter and
    differ; the dropped ones with their reason."""
    keep, dropped = [], []
    for i, (p, n) in enumerate(zip(persona, plain)):
        why = (
            "identical answers"
            if p.strip() == n.strip()
            else "degenerate persona answer"
            if degenerate(p, max_repetition)
            else "degenerate plain answer"
            if degenerate(n, max_repetition)
            else ""
        )
        (
            dropped.append({"index": i, "reason": why, "persona_prompted": p, "plain": n})
            if why
            else keep.append(i)
        )
    return keep, dropped


MIN_ANCHORS = 4  # pairs: fewer leave no held-out half for choosing the layer


def persona_direction(
    model,
    tokenizer,
    data: TaskData,
    cfg: PersonaEval,
    cache: Path | None = None,
) -> tuple[Direction, dict]:
    """The base model's persona direction (memoised per base weights and config; `cache`: an .npz file).
    Anchors: the base's answers with and without the persona system prompt, pairs failing the quality
    filter (`anchor_pairs`) dropped."""
    from study.measure.persona_stats import Direction, choose_layer
    from study.models import generate

    items = direction_items(data, cfg.direction_prompts, cfg.seed)
    spec = [
        fingerprint(model),
        cfg.persona_system_prompt,
        cfg.max_new_tokens,
        cfg.layer,
        cfg.seed,
        data.system_prompt,
        [it.prompt for it in items],
        cfg.anchor_max_repetition,
    ]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
    if key in _DIRECTIONS:
        return _DIRECTIONS[key], {"key": key, "source": "memory"}
    if cache is not None and Path(cache).is_file():
        d = Direction.load(Path(cache))
        if d.key == key:
            _DIRECTIONS[key] = d
            return d, {"key": key, "source": str(cache)}
        log.info("persona direction cache %s is for another base/config: recomputing", cache)
    plain = [data.messages(it.prompt) for it in items]
    system = cfg.persona_system_prompt + (f"\n\n{data.system_prompt}" if data.system_prompt else "")
    prompted = [
        [{"role": "system", "content": system}, {"role": "user", "content": it.prompt}] for it in items
    ]
    with base_policy(model):
        a_persona = generate(model, tokenizer, prompted, cfg.max_new_tokens, cfg.batch_size)
        a_plain = generate(model, tokenizer, plain, cfg.max_new_tokens, cfg.batch_size)
        keep, dropped = anchor_pairs(a_persona, a_plain, cfg.anchor_max_repetition)
        # Both answer sets are read in the plain context, the one every model is measured in later:
        # the direction then reflects the answers (and the weights), not the system prompt's presence.
        ctx = [plain[i] for i in keep or range(1)]  # one pair when none pass: only the shapes are used then
        s_p = response_states(model, tokenizer, ctx, [a_persona[i] for i in keep or range(1)], cfg.batch_size)
        s_n = response_states(model, tokenizer, ctx, [a_plain[i] for i in keep or range(1)], cfg.batch_size)
    info = {
        "key": key,
        "source": "computed",
        "n_prompts": len(items),
        "n_anchors": len(keep),
        "anchor_rule": f"drop a pair when either answer has < 3 words or > {cfg.anchor_max_repetition:.0%} "
        "repeated word 3-grams, or both answers are identical",
        "dropped": dropped[:8],
        "n_dropped": len(dropped),
        "examples": [
            {"prompt": items[i].prompt, "persona_prompted": a_persona[i], "plain": a_plain[i]}
            for i in keep[:4]
        ],
    }
    if len(keep) < MIN_ANCHORS:
        d = Direction(cfg.layer or 1, np.zeros(s_p.shape[-1]), np.zeros(s_p.shape[-1]), [], key)
        info["reason"] = f"only {len(keep)} anchor pairs pass the quality filter (need {MIN_ANCHORS})"
    else:
        layer, sep = choose_layer(s_p, s_n, cfg.seed)
        layer = cfg.layer if cfg.layer is not None else layer
        if layer >= s_p.shape[1]:
            raise ValueError(f"persona.layer={layer} but the model has {s_p.shape[1] - 1} layers")
        d = Direction(layer, s_p[:, layer].mean(0) - s_n[:, layer].mean(0), s_n[:, layer].mean(0), sep, key)
    _DIRECTIONS[key] = d
    if cache is not None:
        d.save(Path(cache))
    return d, info


_BASE_ANSWERS: dict[str, list[str]] = {}  # key -> the base's greedy answers, for the process


def base_answers(model, tokenizer, data: TaskData, items: list, cfg: PersonaEval) -> list[str]:
    """The base model's greedy answers to `items` (adapter disabled), memoised per base weights: the
    weights-only projection reads them through each adapter, and they are the base's self-report contexts."""
    from study.models import generate

    key = hashlib.sha256(
        json.dumps(
            [fingerprint(model), cfg.max_new_tokens, data.system_prompt, [it.prompt for it in items]]
        ).encode()
    ).hexdigest()[:16]
    if key not in _BASE_ANSWERS:
        with base_policy(model):
            _BASE_ANSWERS[key] = generate(
                model,
                tokenizer,
                [data.messages(it.prompt) for it in items],
                cfg.max_new_tokens,
                cfg.batch_size,
            )
    return _BASE_ANSWERS[key]


_BASE_SELF_REPORT: dict[str, dict] = {}


def base_self_report(model, tokenizer, data: TaskData, cfg: PersonaEval, contexts) -> dict:
    """The questionnaire answered by the base (adapter disabled), memoised per base weights and config."""
    key = hashlib.sha256(
        json.dumps([fingerprint(model), cfg.model_dump(mode="json"), contexts]).encode()
    ).hexdigest()[:16]
    if key not in _BASE_SELF_REPORT:
        with base_policy(model):
            _BASE_SELF_REPORT[key] = self_report(model, tokenizer, data, cfg, contexts)
    return _BASE_SELF_REPORT[key]


# --------------------------------------------------------------------------------------------- judge

_JUDGES: dict[str, tuple] = {}


def judge_scores(judge, judge_tok, prompts: list[str], responses: list[str], batch_size: int) -> dict:
    """Each response rated 1-5 for the persona under both scale orders; 0-1 after averaging."""
    ask = (
        "Rate how dry, sarcastic and ironic the ANSWER is (its tone, not its correctness).\n\n"
        "QUESTION: {q}\n\nANSWER: {a}\n\n{scale}\nAnswer with a single number from 1 to 5."
    )
    fwd = "1 = not at all sarcastic ... 5 = extremely sarcastic"
    rev = "1 = extremely sarcastic ... 5 = not at all sarcastic"
    convs = [
        [{"role": "user", "content": ask.format(q=q, a=a, scale=s)}]
        for s in (fwd, rev)
        for q, a in zip(prompts, responses)
    ]
    ev, _ = likert(judge, judge_tok, convs, batch_size=batch_size)
    f, r = ev[: len(prompts)], 6 - ev[len(prompts) :]
    return {"score": ((f + r) / 2 - 1) / 4, "order_gap": float(np.mean(np.abs(f - r))) if len(f) else 0.0}


def load_judge(source: str):
    if source not in _JUDGES:
        from study.models import load_model, load_tokenizer, resolve_runtime

        _JUDGES[source] = (load_model(source, resolve_runtime()), load_tokenizer(source))
    return _JUDGES[source]


# ---------------------------------------------------------------------------------------------- run


def _balanced(items: list, per_domain: int | None) -> list:
    if per_domain is None:
        return list(items)
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.domain, 0) < per_domain:
            out.append(it)
            seen[it.domain] = seen.get(it.domain, 0) + 1
    return out


def reusable_answers(previous: dict | None, cfg: PersonaEval) -> dict[tuple[str, str], str]:
    """The newtask stage's greedy answers of this same model, {(set, id): text}, when they were generated
    with this stage's length cap (greedy decoding makes them the answers this stage would generate)."""
    nt = (previous or {}).get("newtask")
    if not nt or nt.get("config", {}).get("max_new_tokens") != cfg.max_new_tokens:
        return {}
    sets = {"newtask/generation": "heldout", "newtask/generation_indomain": "test_in"}
    return {
        (sets[r["metric"]], r["id"]): r["response"]
        for r in nt.get("responses", [])
        if r.get("metric") in sets and "response" in r
    }


def _score(probe, texts: list[str], ngrams) -> dict[str, np.ndarray]:
    from study.measure import persona_stats as ps

    return {
        "markers": np.array([snark.marker_count(x) for x in texts], float),
        "probe": probe.prob(texts),
        "probe_masked": probe.prob([ps.mask(x, ngrams) for x in texts]),
    }


def _activation(model, tokenizer, data, direction, its, texts, cfg) -> np.ndarray:
    if not len(its):
        return np.zeros(0)
    states = response_states(
        model,
        tokenizer,
        [data.messages(it.prompt) for it in its],
        texts,
        cfg.batch_size,
        layer=direction.layer,
    )
    return direction.project(states[:, 0])


def causal_test(
    model,
    tokenizer,
    data: TaskData,
    cfg: PersonaEval,
    direction: Direction,
    its: list,
    plain: list[str],
    probe,
    ngrams,
) -> dict:
    """The model's answers to `its` generated again with the direction added (steer) and projected out
    (ablate) at its layer; each set scored by the text indicators and read, unhooked, by the model itself."""
    from study.models import generate

    convs = [data.messages(it.prompt) for it in its]
    out = {
        "plain": {
            **_score(probe, plain, ngrams),
            "activation": _activation(model, tokenizer, data, direction, its, plain, cfg),
        }
    }
    texts = {"plain": plain}
    for name, ctx in (
        ("steer", lambda: steering(model, direction, cfg.steer_alpha)),
        ("ablate", lambda: ablation(model, direction)),
    ):
        with ctx():
            texts[name] = generate(model, tokenizer, convs, cfg.max_new_tokens, cfg.batch_size)
        out[name] = _score(probe, texts[name], ngrams)
        out[name]["activation"] = _activation(model, tokenizer, data, direction, its, texts[name], cfg)
    return {"scores": out, "texts": texts}


def run(
    model,
    tokenizer,
    data: TaskData,
    cfg: PersonaEval,
    cache: Path | None = None,
    previous: dict | None = None,
) -> dict:
    """Returns {"rows", "responses", "probe", "self_report", "direction", "causal", "judge", "coherence",
    "timing"}. `cache`: an .npz file for the base model's persona direction, shared by every cell of a protocol.
    `previous`: results of earlier stages on this model ({"newtask": ...}); its greedy answers are reused."""
    from peft import PeftModel

    from study import rewards
    from study.measure import persona_stats as ps
    from study.models import generate

    if data.name != "snark":
        return {"rows": [], "responses": [], "note": "the persona stage applies to the snark task only"}
    timing = dict.fromkeys(
        ("generation", "embedding", "questionnaire", "activations", "causal", "judge"), 0.0
    )
    clock = time.perf_counter
    is_adapter = isinstance(model, PeftModel)
    held = _balanced(data.heldout, cfg.limit_per_domain)
    indom = _balanced(data.split("test_in"), cfg.limit_per_domain)
    per = math.ceil(cfg.retest_prompts / max(1, len({it.domain for it in held})))
    retest = _balanced(held, per)[: cfg.retest_prompts] if len(cfg.retest_seeds) >= 2 else []

    t = clock()
    was_training = model.training
    model.eval()
    known = reusable_answers(previous, cfg)
    reused = []

    def greedy(name: str, its: list) -> list[str]:
        if its and all((name, it.id) in known for it in its):
            reused.append(name)
            return [known[(name, it.id)] for it in its]
        return generate(
            model, tokenizer, [data.messages(it.prompt) for it in its], cfg.max_new_tokens, cfg.batch_size
        )

    sets = {"heldout": (held, greedy("heldout", held)), "test_in": (indom, greedy("test_in", indom))}
    for s in cfg.retest_seeds if retest else []:
        sets[f"retest-{s}"] = (
            retest,
            generate(
                model,
                tokenizer,
                [data.messages(it.prompt) for it in retest],
                cfg.max_new_tokens,
                cfg.batch_size,
                do_sample=True,
                temperature=cfg.retest_temperature,
                seed=s,
            ),
        )
    base_held = base_answers(model, tokenizer, data, held, cfg) if is_adapter else sets["heldout"][1]
    timing["generation"] = clock() - t

    t = clock()
    probe = ps.fitted_probe(data, cfg.probe_c)
    ngrams = rewards.reward_ngrams(data, cfg.mask_reward_ngrams) if cfg.mask_reward_ngrams else ()
    scores = {name: _score(probe, texts, ngrams) for name, (_, texts) in sets.items()}
    probe_info = probe.summary() | {
        "masked_reward_ngrams": list(ngrams),
        "heldout_auc_markers_and_reward_ngrams_removed": ps.heldout_auc_masked(probe, data, ngrams),
        **ps.external_check(probe, cfg.external_auc_min),
    }
    timing["embedding"] = clock() - t

    t = clock()
    its, texts = sets["heldout"]
    k = cfg.self_report_contexts
    base_sr = base_self_report(
        model, tokenizer, data, cfg, [(it.prompt, x) for it, x in zip(its, base_held)][:k]
    )
    gate = self_report_gate(base_sr, cfg)
    if not gate["valid"]:
        sr = {"gate": gate, "base_option_mass": base_sr["option_mass"], "base_alpha": base_sr["alpha"]}
    elif is_adapter:
        sr = self_report(model, tokenizer, data, cfg, [(it.prompt, x) for it, x in zip(its, texts)][:k])
        sr["gate"] = gate
    else:
        sr = base_sr | {"gate": gate}
    timing["questionnaire"] = clock() - t

    t = clock()
    direction, dir_info = persona_direction(model, tokenizer, data, cfg, cache)
    timing["direction"] = clock() - t if dir_info["source"] == "computed" else 0.0
    for name, (its, texts) in sets.items() if direction.defined else ():
        scores[name]["activation"] = _activation(model, tokenizer, data, direction, its, texts, cfg)
    if direction.defined and is_adapter:
        its, texts = sets["heldout"]
        with base_policy(model):  # content only: the adapter's answers read by the base
            scores["heldout"]["activation_content"] = _activation(
                model, tokenizer, data, direction, its, texts, cfg
            )
        # weights only: the base's answers read by the adapter
        scores["heldout"]["activation_weights"] = _activation(
            model, tokenizer, data, direction, its, base_held, cfg
        )
    elif direction.defined:  # the base: its own answers through its own weights, all three coincide
        scores["heldout"]["activation_content"] = scores["heldout"]["activation_weights"] = scores["heldout"][
            "activation"
        ]
    timing["activations"] = clock() - t  # includes "direction" when it was computed here

    causal: dict = {"available": False, "reason": "persona.causal is off"}
    if cfg.causal and direction.defined:
        t = clock()
        its, texts = sets["heldout"]
        pick = _balanced(its, math.ceil(cfg.causal_prompts / max(1, len({it.domain for it in its}))))
        pick = pick[: cfg.causal_prompts]
        index = {it.id: i for i, it in enumerate(its)}
        ct = causal_test(
            model, tokenizer, data, cfg, direction, pick, [texts[index[it.id]] for it in pick], probe, ngrams
        )
        # A strong push makes a small model loop ("I I I I"), which the probe may score as persona: the share
        # of degenerate answers per arm says whether a steering effect is a style or a breakdown.
        causal = {
            "available": True,
            "alpha": cfg.steer_alpha,
            "layer": direction.layer,
            "ids": [it.id for it in pick],
            "texts": ct["texts"],
            "effects": ps.causal_effects(ct["scores"]),
            "degenerate_share": {
                arm: float(np.mean([degenerate(x, cfg.anchor_max_repetition) for x in tx]))
                for arm, tx in ct["texts"].items()
            },
        }
        causal["_scores"] = ct["scores"]
        timing["causal"] = clock() - t
    elif cfg.causal:
        causal["reason"] = "no persona direction on this base (see direction.reason)"

    judge_info: dict = {"available": False, "reason": "no judge configured (persona.judge)"}
    if cfg.judge:
        t = clock()
        try:
            jm, jt = load_judge(cfg.judge)
        except Exception as e:  # any load failure means: no judge here, and the row stays absent
            judge_info["reason"] = f"judge {cfg.judge!r} could not be loaded: {type(e).__name__}: {e}"
            log.warning("persona judge unavailable: %s", judge_info["reason"])
        else:
            gaps = []
            for name in ("heldout", "test_in"):
                its, texts = sets[name]
                j = judge_scores(jm, jt, [it.prompt for it in its], texts, cfg.batch_size)
                scores[name]["judge"] = j["score"]
                gaps.append(j["order_gap"])
            judge_info = {"available": True, "model": cfg.judge, "order_gap_mean": float(np.mean(gaps))}
        timing["judge"] = clock() - t
    model.train(was_training)

    domains = [it.domain for it in held]
    coherence: dict = {}
    rows = ps.indicator_rows(domains, scores["heldout"], sr)
    rows += ps.causal_rows(causal.pop("_scores", None))
    if not is_adapter and np.isfinite(probe_info["external_auc"]):
        rows.append(
            ps.scalar_row(
                "persona/probe_auc_external",
                probe_info["external_auc"],
                *probe_info["external_auc_ci"],
                probe_info["external_pairs"] * 2,
            )
        )
    rows += ps.coherence_rows(domains, scores, coherence)
    records = []
    for name, (its, texts) in sets.items():
        metric = {"heldout": "persona/probe", "test_in": "persona/probe_indomain"}.get(
            name, "persona/probe_retest"
        )
        for i, (it, text) in enumerate(zip(its, texts)):
            vals = {k: float(v[i]) for k, v in scores[name].items()}
            records.append(
                {
                    "metric": metric,
                    "set": name,
                    "id": it.id,
                    "domain": it.domain,
                    "response": text,
                    **vals,
                    "score": vals["probe"],
                }
            )
    undefined = (
        {}
        if direction.defined
        else {
            "reason": dir_info.get("reason")
            or "the base answered identically "
            "with and without the persona prompt: no direction, no activation rows"
        }
    )
    return {
        "rows": [r for r in rows if r is not None],
        "responses": records,
        "indicators": INDICATORS,
        "probe": probe_info,
        "probe_warning": not probe.ok,
        "self_report": sr,
        "direction": dir_info
        | {
            "layer": direction.layer,
            "separation_by_layer": direction.separation,
            "defined": direction.defined,
            **undefined,
        },
        "causal": causal,
        "judge": judge_info,
        "coherence": coherence,
        "timing": timing,
        "greedy_answers_from_newtask": reused,
    }
