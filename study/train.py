"""Train one cell's LoRA adapter with TRL at the protocol's matched budget.

All four methods share the LoRA config, optimizer steps, batch size, max length, learning-rate schedule
and seed; the method's own block adds only what differs (beta, num_generations, ...). Checkpoints every
`train.checkpoint_every` steps are kept (the emergence trajectories read them) and make a killed cell
resume where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from study.models import Runtime, load_model, load_tokenizer
from study.paths import CellPaths
from study.protocol import Cell, Method
from study.rewards import reward_functions
from study.tasks import ROWS, TaskData, build

log = logging.getLogger("study")

CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "trainer_state.json")


def _common_args(cell: Cell, paths: CellPaths, runtime: Runtime) -> dict:
    t = cell.train
    return dict(
        output_dir=str(paths.train_dir),
        max_steps=t.steps,
        per_device_train_batch_size=t.batch_size,
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
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=t.gradient_checkpointing,
    )


def _sft(cell, common, data, model, tok, peft):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(max_length=cell.train.max_length, **common)
    return SFTTrainer(model=model, args=args, train_dataset=_dataset(cell, data), processing_class=tok,
                      peft_config=peft)


def _dpo(cell, common, data, model, tok, peft):
    from trl import DPOConfig, DPOTrainer

    extra = {k: cell.options[k] for k in ("beta",) if k in cell.options}
    if "loss_type" in cell.options:
        extra["loss_type"] = [cell.options["loss_type"]]
    args = DPOConfig(max_length=cell.train.max_length, **extra, **common)
    return DPOTrainer(model=model, args=args, train_dataset=_dataset(cell, data), processing_class=tok,
                      peft_config=peft)


def _kto(cell, common, data, model, tok, peft):
    from trl import KTOConfig, KTOTrainer

    extra = {k: cell.options[k] for k in ("beta", "loss_type") if k in cell.options}
    args = KTOConfig(max_length=cell.train.max_length, **extra, **common)
    return KTOTrainer(model=model, args=args, train_dataset=_dataset(cell, data), processing_class=tok,
                      peft_config=peft)


def _grpo(cell, common, data, model, tok, peft):
    from trl import GRPOConfig, GRPOTrainer

    extra = {k: cell.options[k] for k in ("beta", "loss_type", "temperature") if k in cell.options}
    # the optimised reward at weight 1, each persona component at weight 0: TRL then logs every component
    funcs, weights = reward_functions(data, cell.options.get("reward"))
    args = GRPOConfig(
        num_generations=cell.options.get("num_generations", 4),
        max_completion_length=cell.train.max_completion_length,
        reward_weights=weights,
        **extra,
        **common,
    )
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=_dataset(cell, data),
                       processing_class=tok, peft_config=peft)


TRAINERS: dict[Method, Callable] = {Method.sft: _sft, Method.dpo: _dpo, Method.kto: _kto, Method.grpo: _grpo}


def _dataset(cell: Cell, data: TaskData):
    from datasets import Dataset

    return Dataset.from_list(ROWS[cell.method](data))


def lora_config(cell: Cell):
    from peft import LoraConfig

    lo = cell.train.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                      task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, by step. An incomplete one (a kill during its save) is left out."""
    out = []
    for d in Path(train_dir).glob("checkpoint-*"):
        if d.is_dir() and all((d / f).is_file() for f in CHECKPOINT_FILES):
            out.append((int(d.name.split("-")[1]), d))
    return sorted(out)


def _drop_incomplete(train_dir: Path) -> None:
    complete = {p for _, p in checkpoints(train_dir)}
    for d in Path(train_dir).glob("checkpoint-*"):
        if d.is_dir() and d not in complete:
            log.warning("removing incomplete checkpoint %s", d)
            shutil.rmtree(d)


def _trim_log(log_path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint we resume from (they will be logged again)."""
    if not log_path.is_file():
        return
    keep = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    log_path.write_text("".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------------------------------------- train


def _callbacks(paths: CellPaths, progress: Callable[[int], None] | None):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}}
                with paths.train_log.open("a") as f:
                    f.write(json.dumps(row) + "\n")

        def on_step_end(self, args, state, control, **kw):
            if progress:
                progress(state.global_step)

    return [JsonlLog()]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def train_cell(cell: Cell, paths: CellPaths, runtime: Runtime, progress=None) -> Path:
    """Train (or resume) a cell; write its adapter atomically to `paths.adapter` and return it."""
    import torch
    from transformers import set_seed

    if (paths.adapter / "adapter_model.safetensors").is_file():
        return paths.adapter
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    _drop_incomplete(paths.train_dir)
    done = checkpoints(paths.train_dir)
    resume = str(done[-1][1]) if done else None
    _trim_log(paths.train_log, done[-1][0] if done else 0)
    if resume:
        log.info("%s: resuming from %s", paths.root.name, resume)

    set_seed(cell.seed)
    tok = load_tokenizer(cell.model)
    model = load_model(cell.model, runtime)
    model.train()
    data = build(cell.task)
    trainer = TRAINERS[cell.method](cell, _common_args(cell, paths, runtime), data, model, tok, lora_config(cell))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our JSONL log and rich progress replace its prints
    for cb in _callbacks(paths, progress):
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume)

    tmp = paths.root / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    shutil.rmtree(paths.adapter, ignore_errors=True)
    tmp.rename(paths.adapter)
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return paths.adapter
