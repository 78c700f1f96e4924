"""KL drift of an adapter πθ from its base π0, exact over the vocabulary along sampled sequences.

    kl/forward_newtask   D(π0‖πθ) on held-out task prompts: y ~ π0 (adapter disabled), then along each y the
                         exact KL_t = Σ_v π0(v|x,y<t) (log π0(v|x,y<t) − log πθ(v|x,y<t)), summed over y's
                         generated tokens (through EOS). The predictor of forgetting in RL's Razor
                         (Shenfeld, Pari, Agrawal 2025).
    kl/reverse_newtask   D(πθ‖π0): the same with y ~ πθ and the roles swapped (what RL's KL penalty controls).
    kl/forward_general   D(π0‖πθ) teacher-forced on plain encyclopedic passages unrelated to the task
                         (`general_text.jsonl`, truncated to `max_length_general` tokens): drift outside it.
    ..._per_token        total KL / total scored tokens (CI: bootstrap of the ratio over sequences).

The sum of exact per-token KLs along y is an unbiased estimate of the KL between the two distributions of
continuations (capped at max_new_tokens), as is the Monte-Carlo log ratio log π0(y) − log πθ(y); it has far
less variance and is never negative. The log ratio is kept per sequence as a cross-check.
Sampling is our own short loop over the full softmax with a seeded torch.Generator rather than `generate`,
whose defaults and model generation configs can add filters (top-k 50 unless overridden, top-p, repetition
penalties) under which y would no longer be drawn from π0; it also leaves the global RNG alone.
At temperature T ≠ 1 both policies are tempered alike (logits / T), so the number stays the exact KL
between the distributions actually sampled.
With the same seed every cell sees the same y ~ π0 (on a deterministic device): the forward KL is paired.

π0 is the same model object inside `model.disable_adapter()`: no second copy of the weights. A stage:
`run(model, tokenizer, data, KLEval()) -> {"rows": [...], "sequences": [...], ...}`; `throughput` times it.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_kl.py      # the estimator's tests (tiny model)
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from study.config import KL_METRICS as METRICS
from study.config import KLEval
from study.models import padded
from study.stats.core import bootstrap_mean_ci
from study.tasks import TaskData

GENERAL_TEXT = Path(__file__).with_name("general_text.jsonl")
NEG_TOLERANCE = 1e-6  # per-token KL below 0 by less than this is float error; anything larger is a bug
SCORE_ELEMENTS = 2**25  # float32 elements per (rows × positions × vocab) tensor when scoring: bounds memory


# ----------------------------------------------------------------------------------------------- tensors


def _positions(mask):
    # With left padding, each row must count positions from its first real token, or the padded prompt
    # would be scored at shifted positions (a different distribution than the unpadded one).
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _policy(model, base: bool):
    return model.disable_adapter() if base else nullcontext()


def _sample(
    model, prompts: list[list[int]], cfg: KLEval, eos: set[int], pad: int, seed: int
) -> list[list[int]]:
    """Ancestral sampling from the full softmax of `model` as the caller has set it (adapter on or off).
    With model.engine vllm the samples come from vLLM (same policy and temperature, its own RNG stream);
    the scoring stays here: exact KL needs each position's full distribution, vLLM returns top-k logprobs."""
    import torch

    from study.models import adapter_active, current_engine

    if (session := current_engine()) is not None:
        return session.sample_ids(
            prompts, cfg.max_new_tokens, cfg.temperature, eos, seed, adapter_active(model)
        )

    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    eos_t = torch.tensor(sorted(eos), device=device)
    out: list[list[int]] = []
    for start in range(0, len(prompts), cfg.batch_size):
        ids, mask = padded(prompts[start : start + cfg.batch_size], pad, device)
        step, pos, past = ids, _positions(mask), None
        done = torch.zeros(len(ids), dtype=torch.bool, device=device)
        new = []
        for _ in range(cfg.max_new_tokens):
            o = model(
                input_ids=step,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float() / cfg.temperature, dim=-1)
            tok = torch.where(done, pad, torch.multinomial(probs, 1, generator=gen)[:, 0])
            new.append(tok)
            done |= torch.isin(tok, eos_t)
            if bool(done.all()):
                break
            step, pos = tok[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        for row in torch.stack(new, 1).tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # keep the EOS: it is scored
            out.append(row[:cut])
    return out


def _logprobs(model, ids, mask, keep: int, temperature: float):
    import torch

    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=keep)
    logits = out.logits
    # the last kept column predicts past the sequence: drop it; float32 before the softmax, whatever the dtype
    return torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)


def _score(
    model, seqs: list[list[int]], n_scored: list[int], sampler_is_base: bool, cfg: KLEval, pad: int
) -> list[dict]:
    """Per sequence: the exact KL(p‖q) at each of its last n_scored tokens, p the policy y was drawn from
    (π0 if sampler_is_base, else πθ) and q the other; plus the log ratio log p(y) − log q(y)."""
    import torch

    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, min(cfg.batch_size, SCORE_ELEMENTS // (max(n_scored) * vocab)))
    out: list[dict] = []
    for start in range(0, len(seqs), rows):
        chunk, ns = seqs[start : start + rows], n_scored[start : start + rows]
        ids, mask = padded(chunk, pad, model.device)
        k = max(ns)  # left padding right-aligns every sequence: its scored tokens are the last n columns
        with _policy(model, sampler_is_base):
            lp = _logprobs(model, ids, mask, k + 1, cfg.temperature)
        with _policy(model, not sampler_is_base):
            lq = _logprobs(model, ids, mask, k + 1, cfg.temperature)
        target = ids[:, -k:, None]
        ratio = (lp.gather(-1, target) - lq.gather(-1, target))[..., 0]
        kl = (lp.exp() * (lp - lq)).sum(-1)
        kl = torch.where((kl < 0) & (kl > -NEG_TOLERANCE), torch.zeros_like(kl), kl)
        for i, n in enumerate(ns):
            per_token = kl[i, k - n :].tolist()
            out.append(
                {
                    "tokens": n,
                    "kl": float(sum(per_token)),
                    "log_ratio": float(ratio[i, k - n :].sum()),
                    "token_kl": [round(v, 7) for v in per_token],
                }
            )
    return out


_BASE_SAMPLES: dict[str, list[list[int]]] = {}


def _base_samples(model, prompts, cfg: KLEval, eos: set[int], pad: int, seed: int) -> list[list[int]]:
    """y ~ π0 for the forward KL, memoised per base weights, prompts and sampling settings: with the same seed
    every cell draws the same sequences (the pairing), so a process measuring many adapters samples them once
    (~4 s of the stage's ~19 s per adapter on the default, measured)."""
    import hashlib

    from study.models import weights_fingerprint

    blob = [weights_fingerprint(model), prompts, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, seed]
    key = hashlib.sha256(json.dumps(blob + [sorted(eos), pad]).encode()).hexdigest()
    if key not in _BASE_SAMPLES:
        with _policy(model, True):
            _BASE_SAMPLES[key] = _sample(model, prompts, cfg, eos, pad, seed)
    return [list(y) for y in _BASE_SAMPLES[key]]


# ------------------------------------------------------------------------------------------------- rows


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num)/sum(den), resampling sequences (as bootstrap_mean_ci does)."""
    if len(num) < 2:
        v = float(num.sum() / den.sum())
        return (v, v)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    r = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    return (float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975)))


def _rows(metric: str, recs: list[dict]) -> list[dict]:
    kl = np.array([r["kl"] for r in recs])
    tokens = np.array([r["tokens"] for r in recs], dtype=float)
    lo, hi = bootstrap_mean_ci(kl)
    tlo, thi = _ratio_ci(kl, tokens)
    return [
        {"metric": metric, "value": float(kl.mean()), "ci_low": lo, "ci_high": hi, "n": len(kl)},
        {
            "metric": f"{metric}_per_token",
            "value": float(kl.sum() / tokens.sum()),
            "ci_low": tlo,
            "ci_high": thi,
            "n": len(kl),
        },
    ]


def general_passages(cfg: KLEval) -> list[dict]:
    """The first n_general {"id", "text"} passages of the general-text file."""
    path = Path(cfg.general_text) if cfg.general_text else GENERAL_TEXT
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {"id": r.get("id", f"general-{i}"), "text": r["text"]} for i, r in enumerate(rows[: cfg.n_general])
    ]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {int(i) for i in ids if i is not None}


# -------------------------------------------------------------------------------------------------- run


def run(model, tokenizer, data: TaskData, cfg: KLEval) -> dict:
    """Returns {"rows", "sequences", "cross_check", "timing"} for the stage's JSON.

    A sequence keeps its tokens, summed KL, per-token KLs, the log ratio log p(y) − log q(y) (p the sampling
    policy) and, for sampled ones, the decoded text. `cross_check` holds per metric the exact mean and the
    log-ratio mean: for the sampled metrics both estimate the same KL; for general text (not sampled from
    π0) the log ratio is instead the passages' log-likelihood drop under the adapter.
    """
    import torch
    from peft import PeftModel

    if not isinstance(model, PeftModel):  # the base against itself: 0 by definition, so not measured
        rows = [
            {"metric": f"{m}{s}", "value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 0}
            for m in cfg.metrics
            for s in ("", "_per_token")
        ]
        return {"rows": rows, "sequences": [], "note": "no adapter: the KL of the base to itself is 0"}

    items = random.Random(cfg.seed).sample(data.heldout, min(cfg.n_prompts, len(data.heldout)))
    chats = [
        tokenizer.apply_chat_template(data.messages(it.prompt), tokenize=False, add_generation_prompt=True)
        for it in items
    ]
    prompts = [
        (it, j, tokenizer(c, add_special_tokens=False)["input_ids"])
        for it, c in zip(items, chats, strict=True)
        for j in range(cfg.samples_per_prompt)
    ]
    # plain text, no chat template; the first token is scored only if the tokenizer prepends a BOS to it
    passages = [
        (p, tokenizer(p["text"], truncation=True, max_length=cfg.max_length_general)["input_ids"])
        for p in general_passages(cfg)
    ]
    passages = [(p, ids) for p, ids in passages if len(ids) > 1]  # a single token predicts nothing
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    timing = {"sample_seconds": 0.0, "score_seconds": 0.0, "tokens_sampled": 0, "tokens_scored": 0}
    records: list[dict] = []

    def score(metric, seqs, n_scored, from_base, keys):
        t = time.perf_counter()
        scored = _score(model, seqs, n_scored, from_base, cfg, pad)
        timing["score_seconds"] += time.perf_counter() - t
        timing["tokens_scored"] += sum(n_scored)
        records.extend({"metric": metric, **k, **s} for k, s in zip(keys, scored, strict=True))

    was_training = model.training
    model.eval()  # LoRA dropout off: πθ is the deterministic adapter
    try:
        with torch.no_grad():
            for metric, from_base, seed in ((METRICS[0], True, cfg.seed), (METRICS[1], False, cfg.seed + 1)):
                if not prompts or metric not in cfg.metrics:
                    continue
                t = time.perf_counter()
                if from_base:
                    ys = _base_samples(model, [p for _, _, p in prompts], cfg, eos, pad, seed)
                else:
                    ys = _sample(model, [p for _, _, p in prompts], cfg, eos, pad, seed)
                timing["sample_seconds"] += time.perf_counter() - t
                timing["tokens_sampled"] += sum(map(len, ys))
                keys = [
                    {"id": it.id, "sample": j, "text": tokenizer.decode(y, skip_special_tokens=True)}
                    for (it, j, _), y in zip(prompts, ys, strict=True)
                ]
                seqs = [p + y for (_, _, p), y in zip(prompts, ys, strict=True)]
                score(metric, seqs, [len(y) for y in ys], from_base, keys)
            if passages and METRICS[2] in cfg.metrics:
                score(
                    METRICS[2],
                    [ids for _, ids in passages],
                    [len(ids) - 1 for _, ids in passages],
                    True,
                    [{"id": p["id"]} for p, _ in passages],
                )
    finally:
        model.train(was_training)

    rows, cross = [], {}
    for m in METRICS:
        recs = [r for r in records if r["metric"] == m]
        if recs:
            rows += _rows(m, recs)
            cross[m] = {
                "exact": float(np.mean([r["kl"] for r in recs])),
                "log_ratio": float(np.mean([r["log_ratio"] for r in recs])),
            }
    timing["sample_tokens_per_s"] = timing["tokens_sampled"] / max(timing["sample_seconds"], 1e-9)
    timing["score_tokens_per_s"] = timing["tokens_scored"] / max(timing["score_seconds"], 1e-9)
    return {"rows": rows, "sequences": records, "cross_check": cross, "timing": timing}


def throughput(model, tokenizer, data: TaskData, cfg: KLEval | None = None) -> dict:
    """Run the stage once and report its speed (seconds, tokens/s for sampling and for exact scoring)."""
    t = time.perf_counter()
    result = run(model, tokenizer, data, cfg or KLEval())
    return {"seconds": time.perf_counter() - t, **result["timing"]}
