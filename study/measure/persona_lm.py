"""The language-model side of the persona stage (study.measure.persona): reading hidden states under a
chat prefix, option likelihoods for the self-report questionnaire (with its validity gate and respondent
CI), and the forward hooks of the causal test (steering along the persona direction, ablating it).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_persona.py -k "likert or self_report or steering"
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import yaml

from study.config import PersonaEval
from study.measure.persona_stats import Direction
from study.models import padded, transformers_only
from study.tasks import TaskData

QUESTIONNAIRE = Path(__file__).with_name("questionnaire.yaml")
MIN_SHARED = 8  # tokens: a shorter common prefix is not worth a separate forward pass


# ----------------------------------------------------------------------------------------------- models


def base_policy(model):
    """The base model: the adapter disabled on a PeftModel, the model itself otherwise."""
    from peft import PeftModel

    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()


def _prefix_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    chats = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
    ]
    return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]


def response_states(
    model, tokenizer, conversations, responses, batch_size: int = 16, layer: int | None = None
) -> np.ndarray:
    """Hidden states mean-pooled over each response's tokens, teacher-forced after its chat prefix:
    (n, layers + 1, hidden), or (n, 1, hidden) for one `layer`. An empty response pools the last prefix
    token (where the answer would start)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefixes = _prefix_ids(tokenizer, conversations)
    out = []
    for s in range(0, len(prefixes), batch_size):
        seqs, spans = [], []
        for p, r in zip(prefixes[s : s + batch_size], responses[s : s + batch_size]):
            a = tokenizer(r, add_special_tokens=False)["input_ids"] if r else []
            seqs.append(p + a)
            spans.append((len(p), len(p) + len(a)) if a else (len(p) - 1, len(p)))
        ids, mask = padded(seqs, pad, model.device, left=False)
        with torch.no_grad():
            # logits_to_keep=1: the states are wanted, not a (B, T, vocab) logits tensor
            hs = model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
            ).hidden_states
        h = torch.stack(hs if layer is None else (hs[layer],), dim=1).float()  # (B, L, T, H)
        for i, (a, b) in enumerate(spans):
            out.append(h[i, :, a:b].mean(1).cpu().numpy())
    return np.stack(out)


def _next_token_logprobs(model, seqs: list[list[int]], pad: int, share: bool):
    """log p(next token | sequence), (n, vocab). With `share`, the sequences' longest common prefix runs once
    and its KV cache serves every row: the questionnaire's items share all but their statement, which cuts
    the tokens processed about fourfold."""
    import torch

    lcp, shortest = 0, min(map(len, seqs))
    while share and len(seqs) > 1 and lcp < shortest - 1 and all(s[lcp] == seqs[0][lcp] for s in seqs):
        lcp += 1
    with torch.no_grad():
        if lcp >= MIN_SHARED:
            cache = model(
                input_ids=torch.tensor([seqs[0][:lcp]], device=model.device), use_cache=True
            ).past_key_values
            cache.batch_repeat_interleave(len(seqs))
            ids, mask = padded([s[lcp:] for s in seqs], pad, model.device, left=False)
            mask = torch.cat([torch.ones(len(seqs), lcp, dtype=mask.dtype, device=mask.device), mask], 1)
            ends = torch.tensor([len(s) - lcp - 1 for s in seqs])
            keep, row = torch.unique(ends, return_inverse=True)  # logits only where some row ends
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep.to(model.device),
            ).logits
        else:
            ids, mask = padded(seqs, pad, model.device, left=False)
            ends = torch.tensor([len(s) - 1 for s in seqs])
            keep, row = torch.unique(ends, return_inverse=True)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep.to(model.device)).logits
        return torch.log_softmax(logits[torch.arange(len(seqs)), row].float(), -1)


def likert(
    model,
    tokenizer,
    conversations,
    options=("1", "2", "3", "4", "5"),
    batch_size: int = 16,
    fast: bool = True,
    share_prefix: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(expected option value, probability mass on the options) per conversation: softmax over the
    options' log-likelihoods as the assistant's answer, values 1..len(options). Options that are single
    tokens are read from one forward pass of the prefix (`fast`); otherwise each option is teacher-forced."""
    import torch

    opt_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefixes = _prefix_ids(tokenizer, conversations)
    single = fast and all(len(o) == 1 for o in opt_ids) and len({o[0] for o in opt_ids}) == len(opt_ids)
    lps = []
    for s in range(0, len(prefixes), batch_size):
        chunk = prefixes[s : s + batch_size]
        if single:
            lps.append(
                _next_token_logprobs(model, chunk, pad, share_prefix)[:, [o[0] for o in opt_ids]]
                .cpu()
                .numpy()
            )
            continue
        seqs = [p + o for p in chunk for o in opt_ids]
        ids, mask = padded(seqs, pad, model.device, left=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        rows = []
        for j, seq in enumerate(seqs):
            p = chunk[j // len(opt_ids)]
            pos = torch.arange(len(p) - 1, len(seq) - 1)
            rows.append(float(logp[j, pos, torch.tensor(seq[len(p) :])].sum()))
        lps.append(np.array(rows).reshape(len(chunk), len(opt_ids)))
    lp = np.concatenate(lps) if lps else np.zeros((0, len(options)))
    top = lp.max(1, keepdims=True)
    p = np.exp(lp - top)
    mass = np.exp(top[:, 0]) * p.sum(1)
    p /= p.sum(1, keepdims=True)
    return p @ np.arange(1, len(options) + 1), mass


# --------------------------------------------------------------------------------------- self-report


def load_questionnaire(path: Path | None = None) -> dict:
    q = yaml.safe_load(Path(path or QUESTIONNAIRE).read_text())
    n_rev = sum(bool(it["reverse"]) for it in q["items"])
    if len(q["items"]) < 2 or len(q["respondents"]) < 2 or n_rev == 0 or n_rev == len(q["items"]):
        raise ValueError(f"{path or QUESTIONNAIRE}: needs >= 2 items, both keyings, and >= 2 respondents")
    return q


def item_prompt(q: dict, instruction: str, statement: str) -> str:
    # The statement comes last, so that all items of a respondent share the rest (see _next_token_logprobs).
    return (
        f"{instruction}\n{q['scale']['anchors']}\nAnswer with a single number from "
        f'{q["scale"]["options"][0]} to {q["scale"]["options"][-1]}.\n\nStatement: "{statement}"'
    )


def keyed(scores: np.ndarray, reverse: list[bool], n_options: int = 5) -> np.ndarray:
    """Reverse-keyed columns flipped (1 <-> 5): every column then counts up toward the trait."""
    rev = np.asarray(reverse, bool)
    return np.where(rev, n_options + 1 - scores, scores)


def self_report(
    model, tokenizer, data: TaskData, cfg: PersonaEval, contexts: list[tuple[str, str]] = ()
) -> dict:
    """The questionnaire: respondents x items, keyed; mean, per-item means, Cronbach's alpha. A respondent
    is one paraphrased instruction, asked either cold or after one of `contexts` (a held-out prompt and the
    model's own answer to it, as the previous turn): paraphrases x (1 + len(contexts)) respondents."""
    import pandas as pd
    import pingouin as pg

    q = load_questionnaire(cfg.questionnaire)
    phrasings = q["respondents"][: cfg.respondents] if cfg.respondents else q["respondents"]
    before = [[]] + [data.messages(p)[-1:] + [{"role": "assistant", "content": a}] for p, a in contexts]
    resp = [f"{r} | " + (f"after: {c[0]['content']}" if c else "cold") for c in before for r in phrasings]
    items = q["items"]
    convs = [
        data.messages("")[:-1] + c + [{"role": "user", "content": item_prompt(q, r, it["text"])}]
        for c in before
        for r in phrasings
        for it in items
    ]
    per = len(items)  # one respondent's items per batch: they share everything but the statement
    ev, mass = map(
        np.concatenate,
        zip(
            *(
                likert(
                    model,
                    tokenizer,
                    convs[i : i + per],
                    tuple(q["scale"]["options"]),
                    max(cfg.batch_size, per),
                )
                for i in range(0, len(convs), per)
            )
        ),
    )
    raw = ev.reshape(len(resp), len(items))
    m = keyed(raw, [it["reverse"] for it in items], len(q["scale"]["options"]))
    out = {
        "items": [it["id"] for it in items],
        "reverse": [bool(it["reverse"]) for it in items],
        "respondents": resp,
        "raw": raw.tolist(),
        "keyed": m.tolist(),
        "item_means": m.mean(0).tolist(),
        "option_mass": float(mass.mean()),
        "alpha": math.nan,
    }
    if m.std(0).min() > 1e-9 and m.sum(1).std() > 1e-9:
        alpha, ci = pg.cronbach_alpha(data=pd.DataFrame(m, columns=out["items"]))
        out["alpha"], out["alpha_ci"] = float(alpha), [float(ci[0]), float(ci[1])]
    else:
        out["alpha_reason"] = "an item (or the total) does not vary across respondents"
    rev = np.asarray(out["reverse"], bool)
    # Per respondent: the keyed mean, and forward-minus-reverse raw agreement (a trait pushes it up;
    # acquiescence, agreeing with everything, leaves it near 0 while lifting both raw means).
    out["respondent_means"] = m.mean(1).tolist()
    fmr = raw[:, ~rev].mean(1) - raw[:, rev].mean(1)
    out["raw_forward_mean"], out["raw_reverse_mean"] = float(raw[:, ~rev].mean()), float(raw[:, rev].mean())
    out["forward_minus_reverse"] = [float(fmr.mean()), *respondent_ci(fmr)]
    out["mean"] = [float(m.mean()), *respondent_ci(m.mean(1))]
    return out


def respondent_ci(values) -> list[float]:
    """95% CI of a mean over respondents (scipy's BCa bootstrap; the respondents are the units that vary,
    not the items, whose forward / reverse keying differs systematically)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, float)
    if len(x) < 2 or np.ptp(x) < 1e-12:
        return [float(x.mean()), float(x.mean())] if len(x) else [math.nan, math.nan]
    ci = bootstrap((x,), np.mean, n_resamples=2000, method="BCa", random_state=0).confidence_interval
    return [float(ci.low), float(ci.high)]


def self_report_gate(base_sr: dict, cfg: PersonaEval) -> dict:
    """Whether the questionnaire measures anything on this base model: enough probability on the options
    and a positive internal consistency. Judged on the BASE, so every cell of a protocol shares the verdict."""
    mass, alpha = base_sr["option_mass"], base_sr["alpha"]
    reasons = []
    if not mass >= cfg.self_report_min_mass:
        reasons.append(f"option mass {mass:.3f} < {cfg.self_report_min_mass}")
    if not (np.isfinite(alpha) and alpha > cfg.self_report_min_alpha):
        reasons.append(
            f"Cronbach's alpha {alpha:.3f} <= {cfg.self_report_min_alpha}"
            if np.isfinite(alpha)
            else "Cronbach's alpha undefined (" + base_sr.get("alpha_reason", "") + ")"
        )
    return {
        "valid": not reasons,
        "option_mass": float(mass),
        "alpha": float(alpha),
        "min_mass": cfg.self_report_min_mass,
        "min_alpha": cfg.self_report_min_alpha,
        "reason": ("self-report invalid for this base model: " + "; ".join(reasons)) if reasons else "",
    }


# ---------------------------------------------------------------------------------------------- causal


def _layer_module(model, layer: int):
    """The module whose output is hidden_states[layer]: decoder block layer-1, or the final norm for the
    last layer (HF returns the normed state there)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = next(
        m for n, m in base.named_modules() if isinstance(m, torch.nn.ModuleList) and n.endswith("layers")
    )
    if layer == len(blocks):
        return base.model.norm
    return blocks[layer - 1]


@contextmanager
def edit_hidden(model, layer: int, fn):
    """Applies `fn(h) -> h` to hidden_states[layer] of every forward pass (generation included)."""

    def hook(_module, _inputs, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    # prepend: transformers records hidden_states with its own forward hooks; ours must run first, so that
    # the recorded states (read by response_states) are the edited ones
    handle = _layer_module(model, layer).register_forward_hook(hook, prepend=True)
    try:
        with transformers_only():  # model.engine vllm: the hook acts on this model, not on vLLM's
            yield
    finally:
        handle.remove()


def steering(model, direction: Direction, alpha: float):
    """Adds alpha x the direction at its layer: +1 alpha moves a state by the base's persona-minus-plain gap."""
    import torch

    v = torch.tensor(direction.vector, dtype=torch.float32)
    return edit_hidden(model, direction.layer, lambda h: h + alpha * v.to(h.device, h.dtype))


def ablation(model, direction: Direction):
    """Projects the direction out of the hidden states at its layer: h - (h . u) u, u = v / |v|."""
    import torch

    u = torch.tensor(direction.vector / np.linalg.norm(direction.vector), dtype=torch.float32)

    def fn(h):
        uu = u.to(h.device, h.dtype)
        return h - (h @ uu)[..., None] * uu

    return edit_hidden(model, direction.layer, fn)
