"""`study bench --only train`: optimizer steps per second and trained tokens per second of each method at the
protocol's matched budget (see the package docstring)."""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
from pathlib import Path

from study.config import Method, load_protocol


def bench_training(protocol: Path, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from study.models import load_model, load_tokenizer, quiet_libraries, resolve_runtime
    from study.tasks import build
    from study.train import lora_config, make_trainer, trl_config

    quiet_libraries()
    proto = load_protocol(protocol)
    runtime = resolve_runtime(proto.model.device, proto.model.dtype)
    cells = {c.method: c for c in proto.cells() if c.seed == proto.seeds[0]}
    out = {}
    for method in (m for m in Method if m in cells):  # the protocol's methods, in table order
        cell = cells[method].model_copy(
            update={
                "train": cells[method].train.model_copy(update={"steps": steps, "checkpoint_every": 10_000})
            }
        )
        scratch = Path(tempfile.mkdtemp(prefix=f"bench-{method.value}-"))
        times: list[float] = []
        tokens: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "num_tokens" in logs:
                    tokens.append(float(logs["num_tokens"]))

        try:
            tok = load_tokenizer(cell.model)
            model = load_model(cell.model, runtime)
            model.train()
            args = trl_config(cell, scratch, runtime, save_strategy="no")
            trainer = make_trainer(cell, args, build(cell.task), model, tok, lora_config(cell))
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(Clock())
            trainer.train()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        steady = times[1:] or times
        s_per_step = sum(steady) / len(steady)
        # num_tokens is cumulative: tokens of steps 2..n over their time
        tok_steady = (tokens[-1] - tokens[0]) if len(tokens) > 1 else (tokens[-1] if tokens else float("nan"))
        out[method.value] = {
            "s_per_step": s_per_step,
            "tokens_per_s": tok_steady / sum(steady),
            "steps_timed": len(steady),
            "step_times": times,
        }
        print(
            f"{method.value:5s} {s_per_step:6.2f} s/step  {out[method.value]['tokens_per_s']:7.1f} tokens/s"
        )
        del trainer, model
    return {
        "protocol": str(protocol),
        "device": runtime.device,
        "dtype": runtime.dtype,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "budget": proto.train.model_dump(mode="json"),
        "methods": out,
    }
