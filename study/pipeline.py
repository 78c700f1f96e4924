"""The study for one model, top to bottom: train a cell, then measure a model stage by stage.

    measure_model: newtask -> kl -> regression -> persona -> probe, each skipped when its file is current

Each stage writes one JSON (rows + what they are made of) with its cache key (settings + stage version),
its settings and its time; a rerun skips a stage whose file carries the current key. The runner calls these
for the base (once per protocol) and for every cell's final adapter and intermediate checkpoints.

With `model.dtype: auto` on a CPU that multiplies bf16 natively, the stages in BF16_STAGES run under bf16
autocast (weights stay fp32); `model.dtype: float32` turns it off. Which stages are there is decided by
`study bench --only bf16` (largest bf16-vs-fp32 difference per stage against its stated tolerance).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from study import io
from study.measure import VERSIONS
from study.metrics import rename_probe, stage_done, stage_key
from study.models import Runtime, compute_autocast, generation_engine
from study.tasks import TaskData

log = logging.getLogger("study")

# Stages whose results bf16 autocast leaves within tolerance (`study bench --only bf16`, README "Throughput and
# bf16 autocast"). A stage not listed runs in fp32. Empty as measured: greedy generation changes (newtask,
# persona), KL per token moves by up to 2x its CI half-width, lm-eval failed on one adapter in three; only
# teacher-forced scoring passes, and it is part of newtask, not a stage of its own.
BF16_STAGES: frozenset[str] = frozenset()


def measure_model(
    model,
    tokenizer,
    data: TaskData,
    stages: dict[str, object],
    where: Callable[[str], Path],
    direction_cache: Path,
    base: bool = False,
    say: Callable[[str], None] = print,
    runtime: Runtime | None = None,
    label: str = "",
    vllm=None,
) -> None:
    """Run every stage in `stages` (name -> settings) whose file `where(name)` is not current for `model`.
    `base`: the model is the base (no KL stage: its KL to itself is 0). `runtime`: its `autocast` turns on
    bf16 autocast for the stages in BF16_STAGES (None: fp32 throughout). `vllm`: a study.gpu.VllmSession set
    to this model's adapter (model.engine vllm): the stages generate through it, regression evaluates it."""

    def stage(name: str, measure: Callable[[object], dict]) -> None:
        if name not in stages or (base and name == "kl"):
            return
        settings, path = stages[name], where(name)
        bf16 = runtime is not None and bool(runtime.autocast) and name in BF16_STAGES
        # the key leaves the compute mode out (metrics.cell_complete and collection check it too): a stage's
        # file records it under "compute"; bf16 is used only where it stays within the stated tolerance
        key = stage_key(name, settings)
        if stage_done(path, key):
            return
        say(f"measuring {name}")
        t = time.time()
        with compute_autocast(runtime, bf16), generation_engine(vllm):
            result = measure(settings)
        result |= {
            "engine": "hf" if vllm is None else "vllm",
            "compute": "bfloat16-autocast" if bf16 else "float32",
            "config_hash": key,
            "version": VERSIONS[name],
            "config": settings.model_dump(mode="json"),
            "seconds": time.time() - t,
        }
        io.write_json(path, result)
        log.info("%s: %s %.1f s", label or path.parent.name, name, time.time() - t)

    from study.measure import kl, newtask, persona, regression

    stage("newtask", lambda s: newtask.run(model, tokenizer, data, s))
    stage("kl", lambda s: kl.run(model, tokenizer, data, s))
    lm = None if vllm is None else vllm.lm
    stage("regression", lambda s: regression.run(model, tokenizer, s, lm=lm))
    stage(
        "persona",
        lambda s: persona.run(
            model, tokenizer, data, s, cache=direction_cache, previous=_previous(where("newtask"))
        ),
    )
    stage("probe", lambda s: _renamed(regression.run(model, tokenizer, s, lm=lm)))


def _previous(newtask_file: Path) -> dict:
    """The newtask stage's answers, which the persona stage reuses instead of generating them again."""
    return {"newtask": io.read_json(newtask_file)} if newtask_file.is_file() else {}


def _renamed(result: dict) -> dict:
    return result | {"rows": rename_probe(result["rows"])}
