"""`study bench --only bf16` (and the stage timings of `--only roofline`): each measurement stage run twice on
the same model and data, in fp32 and under bf16 autocast, with the tokens it pushes through the model
counted; then the largest bf16-vs-fp32 difference per stage and a verdict against the tolerances below.

The verdict decides `study.pipeline.BF16_STAGES`: a stage runs under autocast by default only when it
passed here. The parts compared:

newtask     per-item preference margins (teacher-forced), greedy answers that changed, every row
kl          per-token KL of sequences with identical tokens in both runs (general text always; sampled
            text when the sample did not change), every row
regression  per-item lm-eval choice (argmax log-likelihood) that flipped, max |log-likelihood| change, rows
persona     per-response probe / activation values where the response is the same text, every row
generation  greedy answers that changed (decode-bound work on its own)
scoring     per-answer log p (teacher-forced work on its own)
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

# Tolerances. A row's bf16 shift must stay under ROW_CI_SHARE of its fp32 95% CI half-width: a tenth of the
# sampling uncertainty the study already reports cannot move an interval's conclusion (it widens a CI
# by < 0.5 % when added in quadrature). lm-eval: at most CHOICE_FLIP_SHARE of items may change their argmax
# choice (at 50 items, one item); a near-tie flips under any rounding, more than that is a real shift.
ROW_CI_SHARE = 0.1
CHOICE_FLIP_SHARE = 0.02
STAGES = ("generation", "scoring", "newtask", "kl", "regression", "persona")


def small_stages(proto, lm_eval_limit: int = 20, items: int = 16) -> dict:
    """The protocol's stage settings cut to bench size (its batch sizes, token caps and data kept).
    HumanEval is left out: generated programs, no per-item choice, 0/10 on this model."""
    from study.bench.common import small_limits

    out = {
        "newtask": proto.newtask.model_copy(update={"limit": items}),
        "kl": proto.kl.model_copy(update={"n_prompts": items // 2, "n_general": items // 2}),
    }
    suites = [s for s in proto.regression.suites if s != "humaneval"]
    out["regression"] = proto.regression.model_copy(
        update={"suites": suites, "limit": small_limits(suites, lm_eval_limit)}
    )
    if proto.persona is not None:
        out["persona"] = proto.persona.model_copy(
            update={"direction_prompts": 8, "retest_prompts": 4, "limit_per_domain": max(1, items // 8)}
        )
    return out


@contextmanager
def lm_eval_follows_autocast(bf16: bool):
    """lm-eval's HFLM runs every forward inside `torch.autocast(..., enabled=mixed_precision_dtype is not
    None)`, which switches an outer autocast off; regression.run does not pass `mixed_precision_dtype`. For
    the bf16 pass the bench sets it on the harness's lm-eval model, as that one-line edit to regression.run
    would (see README "bf16 autocast")."""
    if not bf16:
        yield
        return
    from unittest import mock

    import torch

    from study.measure.lm_eval_local import PrefixCachedHFLM

    original = PrefixCachedHFLM.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.mixed_precision_dtype = torch.bfloat16

    with mock.patch.object(PrefixCachedHFLM, "__init__", init):
        yield


def stage_pass(model, tokenizer, data, stages: dict, runtime, bf16: bool, say=print) -> dict[str, dict]:
    """Run each stage once in one compute mode, metered: {stage: {result, seconds, tokens, loadavg}}."""
    from study.bench.roofline import token_meter
    from study.measure import kl, newtask, persona, regression
    from study.models import completion_logprobs, compute_autocast, generate

    nt = stages["newtask"]
    items = data.heldout[: nt.limit]
    convs = [data.messages(it.prompt) for it in items]
    calls = {
        "generation": lambda: {
            "answers": generate(model, tokenizer, convs, nt.max_new_tokens, nt.batch_size)
        },
        "scoring": lambda: {
            "logprobs": completion_logprobs(model, tokenizer, convs, [it.good for it in items], nt.batch_size)
        },
        "newtask": lambda: newtask.run(model, tokenizer, data, nt),
        "kl": lambda: kl.run(model, tokenizer, data, stages["kl"]),
        "regression": lambda: regression.run(model, tokenizer, stages["regression"]),
        "persona": lambda: persona.run(
            model, tokenizer, data, stages["persona"], previous={"newtask": out["newtask"]["result"]}
        ),
    }
    out: dict[str, dict] = {}
    mode = "bfloat16-autocast" if bf16 else "float32"
    for name in STAGES:
        if name not in calls or (name in ("kl", "regression", "persona") and name not in stages):
            continue
        load = os.getloadavg()[0]
        with token_meter(model) as tally, compute_autocast(runtime, bf16), lm_eval_follows_autocast(bf16):
            t = time.perf_counter()
            result = calls[name]()
            seconds = time.perf_counter() - t
        out[name] = {
            "result": result,
            "seconds": seconds,
            "tokens": tally.as_dict(),
            "loadavg": load,
            "compute": mode,
        }
        say(
            f"  {mode:17s} {name:10s} {seconds:7.1f} s  prefill {tally.prefill_tokens:6d}  "
            f"decode {tally.decode_tokens:6d} tokens  (load {load:.1f})"
        )
    return out


# ------------------------------------------------------------------------------------------- comparison


def _row_shifts(a: list[dict], b: list[dict]) -> dict:
    """Per row: |bf16 - fp32| and that shift over the fp32 CI half-width (None without a CI)."""
    by = {r["metric"]: r for r in b}
    out = {}
    for r in a:
        s = by.get(r["metric"])
        if s is None or r.get("value") is None or s.get("value") is None:
            continue
        shift = abs(float(s["value"]) - float(r["value"]))
        lo, hi = r.get("ci_low"), r.get("ci_high")
        half = (hi - lo) / 2 if lo is not None and hi is not None else None
        out[r["metric"]] = {
            "fp32": r["value"],
            "bf16": s["value"],
            "shift": shift,
            "share_of_ci": shift / half if half else (0.0 if shift == 0 else None),
        }
    return out


def _max(values) -> float:
    values = [abs(v) for v in values if v is not None]
    return max(values) if values else 0.0


def _changed_share(a: list[str], b: list[str]) -> float:
    return sum(x != y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def _score_of(record: dict) -> float | None:
    for k in ("acc_norm", "acc"):
        if isinstance(record.get(k), int | float):
            return float(record[k])
    return None


def _per_item(name: str, a: dict, b: dict) -> dict:
    """The stage's per-item differences (see the module docstring)."""
    if name == "generation":
        return {"answers_changed": _changed_share(a["answers"], b["answers"])}
    if name == "scoring":
        return {
            "max_abs_logprob_per_token": _max(
                (x[0] - y[0]) / max(1, x[1]) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)
            )
        }
    if name == "newtask":
        key = lambda r: (r["metric"], r["id"])  # noqa: E731
        mb = {key(r): r for r in b["responses"]}
        margins = [
            (r["margin"], mb[key(r)]["margin"]) for r in a["responses"] if "margin" in r and key(r) in mb
        ]
        gens = [
            (r["response"], mb[key(r)]["response"])
            for r in a["responses"]
            if "response" in r and key(r) in mb
        ]
        return {
            "max_abs_pref_margin": _max(x - y for x, y in margins),
            "answers_changed": _changed_share(*zip(*gens)) if gens else 0.0,
        }
    if name == "kl":
        key = lambda r: (r["metric"], r["id"], r.get("sample"))  # noqa: E731
        sb = {key(r): r for r in b["sequences"]}
        same = [
            (r, sb[key(r)])
            for r in a["sequences"]
            if key(r) in sb and r.get("text") == sb[key(r)].get("text")
        ]
        diffs = [x - y for r, s in same for x, y in zip(r["token_kl"], s["token_kl"], strict=True)]
        per_seq = [r["kl"] / max(1, r["tokens"]) - s["kl"] / max(1, s["tokens"]) for r, s in same]
        return {
            "sequences_compared": len(same),
            "sequences": len(a["sequences"]),
            "max_abs_token_kl": _max(diffs),
            "max_abs_kl_per_token": _max(per_seq),
            "mean_kl_per_token_fp32": sum(r["kl"] for r, _ in same)
            / max(1, sum(r["tokens"] for r, _ in same)),
        }
    if name == "regression":
        key = lambda r: (r["suite"], r["task"], r["doc_id"])  # noqa: E731
        rb = {key(r): r for r in b.get("responses", []) if "ll" in r}
        pairs = [(r["ll"], rb[key(r)]["ll"]) for r in a.get("responses", []) if "ll" in r and key(r) in rb]
        flips = [
            max(range(len(x)), key=x.__getitem__) != max(range(len(y)), key=y.__getitem__) for x, y in pairs
        ]
        # the suite's own per-item score (acc_norm: length-normalised choice; mc2: probability mass): a 0/1
        # score that changes by >= 0.5 is an item whose scored choice flipped
        scores = [(_score_of(r), _score_of(rb[key(r)])) for r in a.get("responses", []) if key(r) in rb]
        scores = [(x, y) for x, y in scores if x is not None and y is not None]
        flipped = [abs(x - y) >= 0.5 for x, y in scores]
        return {
            "items": len(pairs),
            "choice_flip_share": max(sum(flips) / max(1, len(flips)), sum(flipped) / max(1, len(flipped))),
            "argmax_loglikelihood_flip_share": sum(flips) / max(1, len(flips)),
            "item_score_flip_share": sum(flipped) / max(1, len(flipped)),
            "max_abs_item_score": _max(x - y for x, y in scores),
            "max_abs_loglikelihood": _max(u - v for x, y in pairs for u, v in zip(x, y, strict=True)),
        }
    if name == "persona":
        key = lambda r: (r["set"], r["id"])  # noqa: E731
        pb = {key(r): r for r in b["responses"]}
        same = [
            (r, pb[key(r)])
            for r in a["responses"]
            if key(r) in pb and r["response"] == pb[key(r)]["response"]
        ]
        out = {"responses_compared": len(same), "responses": len(a["responses"])}
        for v in ("probe", "probe_masked", "activation"):
            out[f"max_abs_{v}"] = _max(r[v] - s[v] for r, s in same if v in r and v in s)
        return out
    return {}


def compare(fp32: dict[str, dict], bf16: dict[str, dict]) -> dict[str, dict]:
    """Per stage present in both passes: per-item differences, row shifts, the verdict and why."""
    out = {}
    for name in fp32:
        if name not in bf16:
            continue
        a, b = fp32[name]["result"], bf16[name]["result"]
        rows = _row_shifts(a.get("rows", []), b.get("rows", []))
        items = _per_item(name, a, b)
        worst = max(rows.items(), key=lambda kv: kv[1]["share_of_ci"] or 0.0, default=(None, None))
        fails = [
            f"{m}: shift {r['shift']:.4g} = {r['share_of_ci']:.2f} of its CI half-width"
            for m, r in rows.items()
            if r["share_of_ci"] is not None and r["share_of_ci"] > ROW_CI_SHARE
        ]
        if name == "regression" and items["choice_flip_share"] > CHOICE_FLIP_SHARE:
            fails.append(f"{items['choice_flip_share']:.1%} of items changed their choice")
        if name == "generation" and items["answers_changed"] > CHOICE_FLIP_SHARE:
            fails.append(f"{items['answers_changed']:.1%} of greedy answers changed")
        if name == "scoring" and items["max_abs_logprob_per_token"] > SCORING_TOLERANCE:
            fails.append(f"log p per token moved by {items['max_abs_logprob_per_token']:.3g}")
        out[name] = {
            "verdict": "pass" if not fails else "fail",
            "why": fails,
            "per_item": items,
            "worst_row": worst[0],
            "rows": rows,
            "speedup": fp32[name]["seconds"] / max(bf16[name]["seconds"], 1e-9),
        }
    return out


# A teacher-forced log p per token read to this precision: the newtask margin is a difference of two of them,
# and a 0.05-nat change moves a margin's sigmoid by < 1.3 points.
SCORING_TOLERANCE = 0.05


def markdown(verdicts: dict[str, dict]) -> str:
    lines = [
        "| stage | verdict | bf16 speed-up | largest per-item difference | worst row (shift / CI half-width) |",
        "|---|---|---:|---|---|",
    ]
    for name, v in verdicts.items():
        items = ", ".join(
            f"{k} {x:.3g}" if isinstance(x, float) else f"{k} {x}" for k, x in v["per_item"].items()
        )
        w = v["rows"].get(v["worst_row"]) if v["worst_row"] else None
        worst = (
            f"{v['worst_row']}: {w['shift']:.3g} / {w['share_of_ci']:.2f}"
            if w and w["share_of_ci"] is not None
            else ""
        )
        lines.append(f"| {name} | {v['verdict']} | {v['speedup']:.2f}x | {items} | {worst} |")
    lines.append(
        f"\nTolerances: every row's shift <= {ROW_CI_SHARE} of its fp32 95% CI half-width; lm-eval and "
        f"greedy generation: <= {CHOICE_FLIP_SHARE:.0%} of items change; scoring: <= "
        f"{SCORING_TOLERANCE} nats per token."
    )
    return "\n".join(lines) + "\n"
