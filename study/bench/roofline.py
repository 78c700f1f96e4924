"""`study bench --only roofline`: what the machine can do with this model, and how close each stage comes.

The roofline is the best forward throughput of the model over a sweep of batch x sequence length, in fp32 and
under bf16 autocast, for the two kinds of work the stages do:

prefill  teacher-forced forwards of whole sequences (scoring, lm-eval, the prompt part of generation):
         tokens/s of `model(input_ids, logits_to_keep=1)` on random tokens
decode   generation with the KV cache: tokens/s of the new tokens, (t(N new) - t(1 new)) at each batch,
         so the prompt's prefill is taken out

A stage's fraction of the roofline: the seconds the roofline would need for the tokens the stage ran through
the model (counted by TokenMeter, prefill and decode apart) over the stage's wall time. 1.0 = the stage runs
at the machine's best for its mix of work; what is missing is padding, small batches, Python and
tokenisation between the forwards.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

PREFILL_GRID = {"batch": (1, 4, 16, 32), "seq": (64, 256), "max_tokens": 2048}
DECODE_GRID = {"batch": (1, 8, 32, 64), "prompt": 32, "new_tokens": 16}


@dataclass
class Tally:
    """Tokens through the model's decoder, by kind, and the seconds spent inside it."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    calls: int = 0
    _t: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("prefill_tokens", "decode_tokens", "prefill_seconds", "decode_seconds", "calls")
        }


def _decoder(model):
    """The transformer stack under any wrapper. PEFT calls the causal LM's `.forward` directly (no hooks
    fire there), but the causal LM calls its decoder as a module, so the decoder's hooks see every forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else base


@contextmanager
def token_meter(model):
    """Count the tokens each decoder forward processes: a call with one new column on a non-empty KV cache is
    a decode step (one token per row), anything else prefill (the attention mask's real tokens in the new
    columns; all of them without a mask)."""
    tally = Tally()
    decoder = _decoder(model)

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        rows, cols = ids.shape[0], ids.shape[1]
        past = kwargs.get("past_key_values")
        cached = past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else 1) > 0
        mask = kwargs.get("attention_mask")
        kind = "decode" if cols == 1 and cached else "prefill"
        if kind == "decode":
            n = rows
        elif mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            n = int(mask[:, -cols:].sum())
        else:
            n = rows * cols
        tally._t.append((kind, n, time.perf_counter()))

    def post(module, args, kwargs, output):
        kind, n, t = tally._t.pop()
        setattr(tally, f"{kind}_tokens", getattr(tally, f"{kind}_tokens") + n)
        setattr(tally, f"{kind}_seconds", getattr(tally, f"{kind}_seconds") + time.perf_counter() - t)
        tally.calls += 1

    hooks = [
        decoder.register_forward_pre_hook(pre, with_kwargs=True),
        decoder.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        yield tally
    finally:
        for h in hooks:
            h.remove()


def _random_ids(model, batch: int, seq: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(min(100, vocab // 2), vocab - 1, (batch, seq), generator=g).to(model.device)


def prefill_rate(model, batch: int, seq: int, repeats: int = 1) -> float:
    """Tokens/s of full-sequence forwards (one warm-up call, then `repeats` timed ones)."""
    import torch

    ids = _random_ids(model, batch, seq)
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
        t = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, logits_to_keep=1)
        return batch * seq * repeats / (time.perf_counter() - t)


def decode_rate(model, batch: int, prompt: int, new_tokens: int) -> float:
    """Tokens/s of KV-cached generation: (new_tokens - 1) steps per row over t(new_tokens) - t(1)."""
    import torch

    ids = _random_ids(model, batch, prompt, seed=1)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return time.perf_counter() - t

    gen(2)  # warm-up
    one, full = gen(1), gen(new_tokens)
    return batch * (new_tokens - 1) / max(full - one, 1e-9)


def sweep(
    model,
    runtime,
    bf16_too: bool = True,
    prefill_grid: dict | None = None,
    decode_grid: dict | None = None,
    say=print,
) -> dict[str, dict]:
    """The rooflines of `model`: every point of the grids in fp32 and, when `bf16_too` and the runtime has
    autocast, right after it under bf16 autocast (back to back: on a shared CPU the load drifts between
    minutes, so the ratio is read point by point). Returns {"float32": ..., "bfloat16": ...}, each with
    its points and the best prefill and decode point."""
    import os

    from study.models import compute_autocast

    pg, dg = prefill_grid or PREFILL_GRID, decode_grid or DECODE_GRID
    modes = [False] + ([True] if bf16_too and runtime.autocast else [])
    out = {
        ("bfloat16" if m else "float32"): {
            "compute": "bfloat16-autocast" if m else "float32",
            "prefill": [],
            "decode": [],
        }
        for m in modes
    }
    points = [("prefill", b, s) for s in pg["seq"] for b in pg["batch"] if b * s <= pg["max_tokens"]]
    points += [("decode", b, dg["prompt"]) for b in dg["batch"]]
    for kind, batch, seq in points:
        for m in modes:
            roof = out["bfloat16" if m else "float32"]
            with compute_autocast(runtime, m):
                if kind == "prefill":
                    r = prefill_rate(model, batch, seq)
                else:
                    r = decode_rate(model, batch, seq, dg["new_tokens"])
            key = "seq" if kind == "prefill" else "prompt"
            roof[kind].append({"batch": batch, key: seq, "tokens_per_s": r, "loadavg": os.getloadavg()[0]})
            say(f"  roofline {roof['compute']:17s} {kind:7s} batch {batch:3d} x {seq:4d}: {r:9.1f} tokens/s")
    for roof in out.values():
        for kind in ("prefill", "decode"):
            roof[f"best_{kind}"] = max(roof[kind], key=lambda p: p["tokens_per_s"])
    return out


def recheck(model, runtime, roofs: dict[str, dict], decode_grid: dict | None = None, say=print) -> None:
    """Measure each mode's best points again (after the stages, back to back) and keep the better: on a shared
    CPU the load drifts, and a roofline measured at a busier minute than a stage would put that stage
    above 1. Both measurements stay in the points, the recheck marked."""
    import os

    from study.models import compute_autocast

    dg = decode_grid or DECODE_GRID
    for name, roof in roofs.items():
        with compute_autocast(runtime, name == "bfloat16"):
            p, d = roof["best_prefill"], roof["best_decode"]
            again = {
                "prefill": {
                    "batch": p["batch"],
                    "seq": p["seq"],
                    "tokens_per_s": prefill_rate(model, p["batch"], p["seq"]),
                },
                "decode": {
                    "batch": d["batch"],
                    "prompt": d["prompt"],
                    "tokens_per_s": decode_rate(model, d["batch"], d["prompt"], dg["new_tokens"]),
                },
            }
        for kind, point in again.items():
            point |= {"loadavg": os.getloadavg()[0], "recheck": True}
            roof[kind].append(point)
            roof[f"best_{kind}"] = max(roof[kind], key=lambda q: q["tokens_per_s"])
            say(
                f"  roofline {roof['compute']:17s} {kind:7s} recheck at batch {point['batch']}: "
                f"{point['tokens_per_s']:9.1f} tokens/s"
            )


def fraction(tally: dict, seconds: float, roof: dict) -> dict:
    """How close a stage came to the roofline: ideal seconds (its tokens at the best rates) over its wall
    time, overall and per kind (the kind's tokens/s inside the model over the kind's best)."""
    best_p, best_d = roof["best_prefill"]["tokens_per_s"], roof["best_decode"]["tokens_per_s"]
    ideal = tally["prefill_tokens"] / best_p + tally["decode_tokens"] / best_d
    out = {"ideal_seconds": ideal, "fraction": ideal / seconds if seconds > 0 else None}
    for kind, best in (("prefill", best_p), ("decode", best_d)):
        s = tally[f"{kind}_seconds"]
        rate = tally[f"{kind}_tokens"] / s if s > 0 else None
        out[f"{kind}_tokens_per_s"] = rate
        out[f"{kind}_fraction"] = rate / best if rate else None
    return out


def markdown(roofs: dict[str, dict], stages: dict[str, dict]) -> str:
    """The roofline table and each stage's fractions, as results/bench/roofline.md."""
    lines = [
        "| compute | work | best tokens/s | at batch | seq | load avg |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for roof in roofs.values():
        for kind in ("prefill", "decode"):
            b = roof.get(f"best_{kind}")
            if b:
                lines.append(
                    f"| {roof['compute']} | {kind} | {b['tokens_per_s']:.0f} | {b['batch']} | "
                    f"{b.get('seq', b.get('prompt'))} | {b['loadavg']:.1f} |"
                )
    lines += [
        "",
        "| stage | compute | seconds | prefill tokens | decode tokens | prefill tok/s in model | "
        "decode tok/s in model | fraction of roofline (wall) | prefill frac | decode frac | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    for name, s in stages.items():
        t, fr = s["tokens"], s["roofline"]
        lines.append(
            f"| {name} | {s['compute']} | {s['seconds']:.1f} | {t['prefill_tokens']} | "
            f"{t['decode_tokens']} | {f(fr['prefill_tokens_per_s'], '.0f')} | "
            f"{f(fr['decode_tokens_per_s'], '.0f')} | {f(fr['fraction'])} | "
            f"{f(fr['prefill_fraction'])} | {f(fr['decode_fraction'])} | {s['loadavg']:.1f} |"
        )
    return "\n".join(lines) + "\n"
