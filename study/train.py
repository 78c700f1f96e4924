"""Train one cell's LoRA adapter with TRL at the protocol's matched budget.

Every method gets the same prompts per optimizer step, steps, max length, LoRA config, schedule and seed;
TRL's per-device batch is derived per method (`Cell.rows_per_step`: KTO sees each prompt's two answers,
GRPO a group of completions). The method's own options and its `trl:` pass-through go into its TRL config
class (`Method.trl_config`). Checkpoints every `train.checkpoint_every` steps are kept (the emergence
trajectories read them) and make a killed cell resume where it stopped.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from study.config import Cell, Method, Protocol, trl_options
from study.models import Runtime, load_model, load_tokenizer
from study.paths import CellPaths, checkpoints
from study.rewards import reward_functions, reward_weights
from study.tasks import ROWS, TaskData, build

log = logging.getLogger("study")


def trl_config(
    cell: Cell, output_dir: Path, runtime: Runtime, report_to: list[str] | None = None, **overrides
):
    """The cell's TRL config object (SFTConfig, DPOConfig, ...): the matched budget, then the method's
    options, then its `trl:` pass-through. Building it is how `study validate` checks TRL options."""
    t = cell.train
    module, name = cell.method.trl_config
    cls = getattr(importlib.import_module(module), name)
    common = dict(
        output_dir=str(output_dir),
        max_steps=t.steps,
        per_device_train_batch_size=cell.rows_per_step // t.grad_accum,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of max_steps (transformers 5)
        seed=cell.seed,
        data_seed=cell.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=None,
        save_only_model=False,
        use_cpu=runtime.device == "cpu",
        bf16=runtime.dtype == "bfloat16",
        fp16=runtime.dtype == "float16",
        report_to=list(report_to or []),
        run_name=cell.name,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=t.max_length,
    )
    # always passed: TRL's configs default it to True (trl/trainer/base_config.py), so leaving it out when the
    # protocol says False trained every cell with checkpointing on (~2x GRPO step time on this CPU, measured)
    common["gradient_checkpointing"] = t.gradient_checkpointing
    if cell.method.trainer == "grpo":
        common.pop("max_length")
        common["max_completion_length"] = t.max_completion_length
        # the optimised reward at weight 1, each persona component at weight 0: TRL then logs every component
        common["reward_weights"] = reward_weights(cell.task.name)
    with warnings.catch_warnings():  # transformers 5 warns on the name `gradient_checkpointing`, set or not
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        return cls(**common | trl_options(cell.method, cell.method_options) | overrides)


def check_trl_options(proto: Protocol) -> list[str]:
    """One line per method whose TRL config cannot be built from the protocol (an unknown `trl:` field, a
    loss TRL rejects, ...). Loads no model; imports TRL."""
    from study.models import Runtime

    problems, seen = [], set()
    runtime = Runtime("cpu", "float32")
    with tempfile.TemporaryDirectory() as tmp:
        for cell in proto.cells():
            if (cell.method, json.dumps(cell.options, sort_keys=True)) in seen:
                continue
            seen.add((cell.method, json.dumps(cell.options, sort_keys=True)))
            name = cell.method.trl_config[1]
            try:
                args = trl_config(cell, Path(tmp), runtime)
            except (TypeError, ValueError) as e:
                msg = " ".join(str(e).split())
                problems.append(
                    f"methods.{cell.method}: TRL's {name} rejects the options: {msg}; fix the "
                    f"option (see the TRL docs of that class)"
                )
                continue
            problems += _outside_choices(cell, args, name)
    return problems


def _outside_choices(cell: Cell, args, name: str) -> list[str]:
    """Values TRL lists `choices` for but does not check itself (e.g. KTO's loss_type)."""
    import dataclasses

    out = []
    for f in dataclasses.fields(args):
        choices = f.metadata.get("choices")
        given = trl_options(cell.method, cell.method_options)
        if not choices or f.name not in given:
            continue
        values = given[f.name] if isinstance(given[f.name], list) else [given[f.name]]
        bad = [v for v in values if v not in choices]
        if bad:
            out.append(
                f"methods.{cell.method}.{f.name}: {bad[0]!r} is not one of TRL's {name} choices "
                f"{list(choices)}; use one of them"
            )
    return out


def make_trainer(cell: Cell, args, data: TaskData, model, tok, peft):
    """The TRL trainer of the cell's method family."""
    import trl

    dataset = _dataset(cell, data)
    family = cell.method.trainer
    if family == "grpo":
        funcs, _ = reward_functions(data, cell.options.get("reward"))
        return trl.GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft,
        )
    if family == "orpo":
        from trl.experimental.orpo import ORPOTrainer as cls
    else:
        cls = {"sft": trl.SFTTrainer, "dpo": trl.DPOTrainer, "kto": trl.KTOTrainer}[family]
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft)


def _dataset(cell: Cell, data: TaskData):
    from datasets import Dataset

    return Dataset.from_list(ROWS[cell.method](data))


def lora_config(cell: Cell):
    from peft import LoraConfig

    lo = cell.train.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        task_type="CAUSAL_LM",
    )


# ------------------------------------------------------------------------------------------- checkpoints


def _drop_incomplete(train_dir: Path) -> None:
    complete = {p for _, p in checkpoints(train_dir)}
    for d in Path(train_dir).glob("checkpoint-*"):
        if d.is_dir() and d not in complete:
            log.warning("removing incomplete checkpoint %s", d)
            shutil.rmtree(d)


def _trim_log(log_path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint we resume from (they will be logged again), and a torn
    last line left by a kill mid-write."""
    if not log_path.is_file():
        return
    keep = []
    for ln in log_path.read_text().splitlines():
        try:
            row = json.loads(ln) if ln else None
        except json.JSONDecodeError:
            log.warning("%s: dropping a torn line (a kill during a write): %r", log_path, ln[:80])
            continue
        if row is not None and row.get("step", 0) <= step:
            keep.append(ln)
    log_path.write_text("".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------------------------------------- train


class DivergenceError(RuntimeError):
    """Training diverged; the message names the step, the quantity and its value."""


def lora_update_norm(model) -> float:
    """||ΔW||_F of the model's LoRA update over all modules (ΔW = scaling · B A), the live counterpart of
    `lora/delta_norm` (study.lora_norm): r x r products, in float64, so it is cheap at every logging step."""
    import torch

    total = 0.0
    with torch.no_grad():
        for module in model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_a, torch.nn.ModuleDict):
                continue
            for name in lora_a:
                a, b = lora_a[name].weight.double(), lora_b[name].weight.double()
                total += float(torch.trace((a @ a.T) @ (b.T @ b))) * module.scaling[name] ** 2
    return math.sqrt(total) if total >= 0 else math.nan


def _callbacks(paths: CellPaths, progress: Callable[[int], None] | None, cell: Cell | None = None):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and state.is_world_process_zero:  # one line per step under `accelerate launch`
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}}
                with paths.train_log.open("a") as f:
                    f.write(json.dumps(row) + "\n")

        def on_step_end(self, args, state, control, **kw):
            if progress:
                progress(state.global_step)

    class Divergence(TrainerCallback):
        """Fail the cell at the first logged step whose loss or gradient norm is not finite, whose gradient
        norm passes train.max_grad_norm_abort, or whose LoRA update passes train.max_weight_norm_abort (a
        diverged run otherwise finishes as "done", with a grad norm of 0 or a loss of 0.0 from NaN weights)."""

        def on_log(self, args, state, control, logs=None, model=None, **kw):
            if not logs or "loss" not in logs and "grad_norm" not in logs:
                return  # the end-of-training summary
            t, step = cell.train, state.global_step
            where = f"training diverged at step {step}/{t.steps}"
            fix = "lower the learning rate (or raise the guard in train: if this is expected)"
            for key in ("loss", "grad_norm"):
                value = logs.get(key)
                if _is_number(value) and not math.isfinite(value):
                    raise DivergenceError(f"{where}: {key} is {value}; {fix}")
            grad = logs.get("grad_norm")
            if _is_number(grad) and grad > t.max_grad_norm_abort:
                raise DivergenceError(
                    f"{where}: grad_norm {grad:.3g} > train.max_grad_norm_abort "
                    f"{t.max_grad_norm_abort:g}; {fix}"
                )
            norm = lora_update_norm(model) if model is not None else 0.0
            if not math.isfinite(norm) or norm > t.max_weight_norm_abort:
                raise DivergenceError(
                    f"{where}: LoRA update ||ΔW||_F {norm:.3g} > train.max_weight_norm_abort "
                    f"{t.max_weight_norm_abort:g}; {fix}"
                )

    return [JsonlLog()] + ([Divergence()] if cell is not None else [])


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def train_cell(
    cell: Cell, paths: CellPaths, runtime: Runtime, progress=None, report_to: list[str] | None = None
) -> Path:
    """Train (or resume) a cell; write its adapter atomically to `paths.adapter` and return it."""
    import torch
    from transformers import set_seed

    if (paths.adapter / "adapter_model.safetensors").is_file():
        return paths.adapter
    main = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch` process 0 owns the files
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    if main:
        _drop_incomplete(paths.train_dir)
    done = checkpoints(paths.train_dir)
    resume = str(done[-1][1]) if done else None
    if main:
        _trim_log(paths.train_log, done[-1][0] if done else 0)
    if resume:
        log.info("%s: resuming from %s", paths.root.name, resume)

    set_seed(cell.seed)
    tok = load_tokenizer(cell.model, cell.revision)
    model = load_model(cell.model, runtime, cell.revision)
    model.train()
    data = build(cell.task)
    args = trl_config(cell, paths.train_dir, runtime, report_to)
    trainer = make_trainer(cell, args, data, model, tok, lora_config(cell))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our JSONL log and rich progress replace its prints
    for cb in _callbacks(paths, progress, cell):
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume)

    if trainer.accelerator.is_main_process:
        tmp = paths.root / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp)
        shutil.rmtree(paths.adapter, ignore_errors=True)
        tmp.rename(paths.adapter)
    trainer.accelerator.wait_for_everyone()
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return paths.adapter


__all__ = [
    "DivergenceError",
    "Method",
    "check_trl_options",
    "checkpoints",
    "lora_config",
    "make_trainer",
    "train_cell",
    "trl_config",
]
