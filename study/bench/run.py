"""The roofline and bf16 parts together: one model load, the roofline sweep on the base, then the stages
metered on a LoRA-wrapped copy in fp32 and under bf16 autocast. Writes results/bench/roofline.{json,md}
and results/bench/bf16.{json,md}."""

from __future__ import annotations

import time
from pathlib import Path

from study import io
from study.bench import bf16 as b16
from study.bench import roofline as rl
from study.bench.common import BENCH, bench_task, environment

# What a LoRA training step costs in forwards: forward + backward through the activations (the frozen base's
# weight gradients are skipped), about 2 forward-equivalents. An approximation, stated as one.
TRAIN_FORWARD_EQUIVALENTS = 2.0


def perturbed_adapter(model, lora, seed: int = 0, scale: float = 0.02):
    """The base wrapped in a LoRA whose B matrices are small random values instead of zeros: a model that
    differs from the base (KL > 0) and costs what a trained adapter costs."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)  # PEFT draws the A matrices from the global generator: the same adapter every run
    model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.eval()
    return model


def training_fractions(roof_fp32: dict, train_file: Path) -> dict:
    """Each method's trained tokens/s from `study bench --only train` (train.json) against the fp32 prefill
    roofline, counted as TRAIN_FORWARD_EQUIVALENTS forwards per token."""
    if not train_file.is_file() or not roof_fp32.get("best_prefill"):
        return {}
    best = roof_fp32["best_prefill"]["tokens_per_s"]
    methods = io.read_json(train_file).get("methods", {})
    return {
        m: {
            "tokens_per_s": t["tokens_per_s"],
            "fraction": t["tokens_per_s"] * TRAIN_FORWARD_EQUIVALENTS / best,
        }
        for m, t in methods.items()
    }


def run(
    protocol: Path,
    parts: list[str],
    lm_eval_limit: int,
    items: int = 16,
    grids: dict | None = None,
    say=print,
    folder: Path = BENCH,
) -> dict:
    from study.config import load_protocol
    from study.measure import persona
    from study.models import load_model, load_tokenizer, quiet_libraries, resolve_runtime
    from study.tasks import build
    from study.train import lora_config

    quiet_libraries()
    folder.mkdir(parents=True, exist_ok=True)
    proto = load_protocol(protocol)
    # the machine's capability, whatever the protocol forces: `auto` turns bf16 on where the CPU has it
    runtime = resolve_runtime(proto.model.device, "auto")
    tok, model = load_tokenizer(proto.model.source), load_model(proto.model.source, runtime)
    env = environment(runtime) | {"autocast_available": runtime.autocast}
    out: dict = {"env": env, "protocol": str(protocol)}
    if "roofline" in parts:
        t = time.perf_counter()
        out["roofline"] = rl.sweep(model, runtime, True, **(grids or {}), say=say)
        out["roofline_seconds"] = time.perf_counter() - t
        io.write_json(folder / "roofline.json", out)  # kept if a stage below fails
    data = build(bench_task(proto))  # snark where there is one: every stage, persona too, applies to it
    stages = b16.small_stages(proto, lm_eval_limit, items)
    model = perturbed_adapter(model, lora_config(proto.cells()[0]))
    if "persona" in stages:  # the direction is the base's, computed once per protocol (memoised): not timed
        with model.disable_adapter():
            persona.persona_direction(model, tok, data, stages["persona"])
    # warm-up, untimed: one-time costs (the persona classifier and probe, the sentence embedder, lm-eval's
    # task index) would otherwise fall on whichever pass runs first
    b16.stage_pass(model, tok, data, b16.small_stages(proto, 2, 2), runtime, False, say=lambda _: None)
    passes = {"float32": b16.stage_pass(model, tok, data, stages, runtime, False, say=say)}
    if runtime.autocast:
        passes["bfloat16"] = b16.stage_pass(model, tok, data, stages, runtime, True, say=say)
    if "roofline" in parts:
        with model.disable_adapter():  # the base, as in the sweep
            rl.recheck(model, runtime, out["roofline"], (grids or {}).get("decode_grid"), say=say)
    out["stage_settings"] = {k: v.model_dump(mode="json") for k, v in stages.items()}
    out["loadavg_end"] = list(__import__("os").getloadavg())
    if "roofline" in parts:
        table = {}
        for mode, stage_runs in passes.items():
            roof = out["roofline"].get(mode)
            for name, s in stage_runs.items():
                table[f"{name} ({mode})"] = {
                    "compute": s["compute"],
                    "seconds": s["seconds"],
                    "tokens": s["tokens"],
                    "loadavg": s["loadavg"],
                    "roofline": rl.fraction(s["tokens"], s["seconds"], roof),
                    "timing": s["result"].get("timing"),  # the stage's own split (KL sampling, suites, ...)
                }
        out["stages"] = table
        out["training"] = training_fractions(out["roofline"]["float32"], folder / "train.json")
        io.write_json(folder / "roofline.json", out)
        md = rl.markdown(out["roofline"], table)
        if out["training"]:
            md += "\n| training (train.json) | tokens/s | fraction of fp32 prefill x 2 |\n|---|---:|---:|\n"
            md += "".join(
                f"| {m} | {t['tokens_per_s']:.0f} | {t['fraction']:.2f} |\n"
                for m, t in out["training"].items()
            )
        (folder / "roofline.md").write_text(md)
        say(md)
    if "bf16" in parts and "bfloat16" in passes:
        verdicts = b16.compare(passes["float32"], passes["bfloat16"])
        io.write_json(
            folder / "bf16.json",
            {
                "env": env,
                "protocol": str(protocol),
                "stage_settings": out["stage_settings"],
                "tolerances": {
                    "row_ci_share": b16.ROW_CI_SHARE,
                    "choice_flip_share": b16.CHOICE_FLIP_SHARE,
                    "scoring_nats_per_token": b16.SCORING_TOLERANCE,
                },
                "stages": verdicts,
            },
        )
        md = b16.markdown(verdicts)
        (folder / "bf16.md").write_text(md)
        say(md)
    elif "bf16" in parts:
        say("bf16: this CPU has no native bf16 multiply: nothing to compare, every stage runs in fp32")
    return out
