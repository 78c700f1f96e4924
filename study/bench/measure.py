"""`study bench --only kl,regression,persona`: the measurement stages' speeds on the bundled model (see the
package docstring)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from study import io
from study.bench.common import adapter_dirs, bench_task, small_limits
from study.config import Protocol
from study.paths import CellPaths

if TYPE_CHECKING:
    from study.models import Runtime


def fresh_adapter_model(proto: Protocol, runtime: Runtime):
    """The base wrapped in a new LoRA of the protocol's config: a PeftModel that costs what a trained one
    does."""
    from peft import get_peft_model

    from study.models import load_model, load_tokenizer
    from study.train import lora_config

    model = get_peft_model(load_model(proto.model.source, runtime), lora_config(proto.cells()[0]))
    model.eval()
    return model, load_tokenizer(proto.model.source)


def bench_kl(proto: Protocol, model, tokenizer) -> dict:
    from study.measure import kl
    from study.tasks import build

    t = kl.throughput(model, tokenizer, build(bench_task(proto)), proto.kl)
    print(
        f"kl          {t['seconds']:7.1f} s  sampling {t['sample_tokens_per_s']:7.1f} tokens/s  "
        f"scoring {t['score_tokens_per_s']:8.1f} tokens/s"
    )
    return {"task": bench_task(proto).name, "config": proto.kl.model_dump(mode="json"), **t}


def bench_regression(proto: Protocol, model, tokenizer, limit: int) -> dict:
    from study.measure import regression

    cfg = proto.regression.model_copy(update={"limit": small_limits(proto.regression.suites, limit)})
    table = regression.throughput(model, tokenizer, cfg)
    for suite, t in table.items():
        print(
            f"{suite:16s} {t['items']:4d} items {t['requests']:5d} requests {t['seconds']:7.1f} s  "
            f"{t['items_per_s']:6.2f} items/s {t['requests_per_s']:7.2f} requests/s"
        )
    return {"config": cfg.model_dump(mode="json"), "suites": table}


def bench_persona(proto: Protocol, runtime: Runtime, run_root: Path) -> dict:
    """The persona stage on one trained cell of the run (the first in name order), as the runner runs it:
    the base's persona direction from the run's cache when it is there (it is computed once per protocol;
    when it is not, its cost is reported apart), the newtask stage's greedy answers reused when that cell has
    them. Returns the time split (generation / embedding / questionnaire / activations) next to the cell's
    training time."""
    from study.measure import persona
    from study.models import AdapterHost
    from study.tasks import build

    if proto.persona is None:
        raise SystemExit(f"bench persona: {proto.model.source} protocol has no persona: block")
    adapters = adapter_dirs(run_root, 1)
    if not adapters:
        raise SystemExit(f"bench persona: no trained adapter under {run_root}/cells (run `make study` first)")
    cp = CellPaths(adapters[0].parent)
    data = build(bench_task(proto))
    previous = {"newtask": io.read_json(cp.stage("newtask"))} if cp.stage("newtask").is_file() else {}
    cache = run_root / "base" / data.name / "persona_direction.npz"
    host = AdapterHost(proto.model.source, runtime)
    with host.attached(cp.root / "adapter") as model:
        t = time.perf_counter()
        out = persona.run(
            model,
            host.tokenizer,
            data,
            proto.persona,
            cache=cache if cache.is_file() else None,
            previous=previous,
        )
        total = time.perf_counter() - t
    status = io.read_json(cp.status) if cp.status.is_file() else {}
    timing = out["timing"]
    split = {
        k: timing.get(k, 0.0) for k in ("generation", "embedding", "questionnaire", "activations", "judge")
    }
    if timing.get("direction"):
        split["activations"] -= timing["direction"]  # "activations" includes a direction computed here
    for k, v in split.items():
        print(f"persona {k:13s} {v:7.1f} s")
    print(
        f"persona total         {total:7.1f} s   (the cell trained in {status.get('train_seconds', float('nan')):.0f} s)"
    )
    return {
        "cell": cp.root.name,
        "seconds": total,
        "split": split,
        "direction_seconds": timing.get("direction", 0.0),
        "direction_cached": cache.is_file(),
        "greedy_answers_from_newtask": out.get("greedy_answers_from_newtask", []),
        "train_seconds": status.get("train_seconds"),
        "config": proto.persona.model_dump(mode="json"),
    }
