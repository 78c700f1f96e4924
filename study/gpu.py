"""The GPU throughput paths: vLLM inference for the measurement stages, vLLM rollouts for GRPO, and cells
that train on several GPUs through `accelerate launch`. None of them has run on a GPU in this project: the
CPU machine it was built on checks what can be checked without one (the configs, the command lines, the
vLLM arguments: tests/test_gpu_paths.py); the README's "GPU paths (unverified here)" gives the command that
verifies each on a GPU machine.

    model.engine: vllm          one vLLM engine per process for the base, shared by every adapter (each a
                                LoRARequest): lm-eval's `vllm` model for the regression suites, and the same
                                engine's sampling for the newtask/persona answers and KL's samples
    methods.<grpo>.trl:         {use_vllm: true, vllm_mode: colocate, vllm_gpu_memory_utilization: 0.3}:
                                TRL's own vLLM rollouts (checked by building the GRPOConfig, like any `trl:`)
    executor.num_processes / gpus_per_cell > 1, executor.accelerate_config:
                                each cell runs as `accelerate launch ... -m study.cli run-cell PROTOCOL CELL`

vLLM is the optional extra `gpu` (`make install-gpu`: uv keeps our transformers pin), never needed on a CPU. The pure functions here
build every argument, so that they are tested without it; only `VllmSession` imports vLLM.
"""

from __future__ import annotations

import importlib.util
import itertools
import shlex
import sys
from pathlib import Path

from study.config import Protocol

GPU_EXTRA = "make install-gpu"
# vLLM accepts only these LoRA ranks as max_lora_rank (vllm.config.lora.MaxLoRARanks, 0.31)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_available() -> bool:
    """Whether `import vllm` can work here (its spec is found; nothing is imported)."""
    return importlib.util.find_spec("vllm") is not None


def _grpo_vllm(proto: Protocol) -> list[str]:
    return [f"methods.{m}.trl.use_vllm" for m, spec in proto.methods.items() if spec.trl.get("use_vllm")]


def missing_extra(proto: Protocol, available: bool | None = None) -> list[str]:
    """One line per setting of `proto` that needs vLLM when it is not installed (`study run` refuses then;
    TRL itself would fail only after loading the model, with a traceback)."""
    if available if available is not None else vllm_available():
        return []
    wanted = (["model.engine: vllm"] if proto.model.engine == "vllm" else []) + [
        f"{f}: true" for f in _grpo_vllm(proto)
    ]
    return [f"{w} needs the gpu extra (vLLM, not installed here): {GPU_EXTRA}" for w in wanted]


def unverified_paths(proto: Protocol) -> list[str]:
    """One note per GPU path the protocol uses that has not run on a GPU in this project."""
    notes = []
    if proto.model.engine == "vllm":
        notes.append("model.engine: vllm")
    notes += [f"{f}: true" for f in _grpo_vllm(proto)]
    if proto.executor.processes > 1:
        notes.append(f"{proto.executor.processes} processes per cell (accelerate launch)")
    return [
        f"unverified GPU path: {n} has not run on a GPU in this project (README: GPU paths)" for n in notes
    ]


# ---------------------------------------------------------------------------------------- vLLM arguments


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds a LoRA of rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"train.lora.r={r}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; use engine: hf")


def lm_eval_vllm_args(
    proto: Protocol, pretrained: str, dtype: str, adapter: str | Path | None = None
) -> dict:
    """Keyword arguments of lm-eval's `vllm` model (lm_eval.models.vllm_causallms.VLLM) for the protocol's
    base at `pretrained` (a folder or hub id) with `adapter` as its `lora_local_path`. Without an adapter
    LoRA stays enabled, so that one engine serves the base and every adapter (VllmSession swaps requests)."""
    m = proto.model
    args = {
        "pretrained": pretrained,
        "dtype": dtype,
        "revision": m.revision,
        "tensor_parallel_size": m.tensor_parallel_size,
        "gpu_memory_utilization": m.vllm_gpu_memory_utilization,
        "max_lora_rank": max_lora_rank(proto.train.lora.r),
        "batch_size": "auto",
        "seed": 1234,  # lm-eval's default: the harness's own seed
    }
    if adapter is not None:
        args["lora_local_path"] = str(adapter)
    else:
        args["enable_lora"] = True  # merged into vllm.LLM's arguments by lm-eval (**kwargs)
    return {k: v for k, v in args.items() if v is not None}


def model_args_string(args: dict) -> str:
    """lm-eval's `--model_args` form of `args` (the equivalent `lm_eval --model vllm` command line)."""
    return ",".join(f"{k}={v}" for k, v in args.items())


def sampling_kwargs(
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    seed: int | None = None,
    stop_token_ids: list[int] | None = None,
) -> dict:
    """vllm.SamplingParams arguments matching study.models.generate: greedy (temperature 0) or sampled at
    `temperature` with the full distribution (top_p 1, top_k off), seeded per request."""
    out = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0, "top_p": 1.0}
    out |= {"top_k": -1, "skip_special_tokens": True}
    if do_sample and seed is not None:
        out["seed"] = seed
    if stop_token_ids:
        out["stop_token_ids"] = sorted(stop_token_ids)
    return out


_LORA_IDS: dict[tuple[str, int], int] = {}
_NEXT_ID = itertools.count(1)


def lora_request_args(adapter: str | Path) -> tuple[str, int, str]:
    """(name, id, path) of vllm's LoRARequest for an adapter folder. vLLM caches adapters by id, so every
    distinct folder (and a folder rewritten since: its mtime) gets its own id in this process."""
    path = Path(adapter).resolve()
    key = (str(path), path.stat().st_mtime_ns if path.exists() else 0)
    if key not in _LORA_IDS:
        _LORA_IDS[key] = next(_NEXT_ID)
    return path.name, _LORA_IDS[key], str(path)


def token_prompts(tokenizer, conversations: list[list[dict]]) -> list[dict]:
    """vLLM prompts as token ids, tokenised exactly as study.models.generate does (chat template, no added
    special tokens), so that both engines answer the same inputs."""
    out = []
    for c in conversations:
        text = tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        out.append({"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
    return out


# ---------------------------------------------------------------------------------------- the vLLM engine


class VllmSession:
    """One vLLM engine for the base (through lm-eval's `vllm` model, whose `.model` is the vllm.LLM), shared
    by the regression suites and the generation of every stage; `use(adapter)` picks the LoRA adapter the
    next measurements read (None: the base)."""

    def __init__(self, proto: Protocol, pretrained: str, dtype: str):
        if not vllm_available():
            raise RuntimeError(
                f"model.engine: vllm needs the gpu extra (vLLM, not installed here): {GPU_EXTRA}"
            )
        self.args = lm_eval_vllm_args(proto, pretrained, dtype)
        self.adapter: str | None = None
        self._lm = None

    @property
    def lm(self):
        if self._lm is None:
            from lm_eval.models.vllm_causallms import VLLM

            self._lm = VLLM(**self.args)
        return self._lm

    def _request(self, adapter_on: bool = True):
        if self.adapter is None or not adapter_on:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(*lora_request_args(self.adapter))

    def use(self, adapter: str | Path | None) -> VllmSession:
        self.adapter = None if adapter is None else str(adapter)
        self.lm.lora_request = self._request()
        return self

    def generate(self, tokenizer, conversations, max_new_tokens, do_sample, temperature, seed, adapter_on):
        """Answers as study.models.generate returns them (stripped text), the adapter on unless the caller
        disabled it (a PeftModel's disable_adapter: the base's answers)."""
        from vllm import SamplingParams

        params = [
            SamplingParams(**sampling_kwargs(max_new_tokens, do_sample, temperature, seed + i))
            for i in range(len(conversations))
        ]
        outs = self.lm.model.generate(
            token_prompts(tokenizer, conversations), params, lora_request=self._request(adapter_on)
        )
        return [o.outputs[0].text.strip() for o in outs]

    def sample_ids(self, prompts, max_new_tokens, temperature, eos, seed, adapter_on) -> list[list[int]]:
        """KL's samples: token ids from the full tempered softmax, through the first EOS (kept: it is scored)."""
        from vllm import SamplingParams

        params = [
            SamplingParams(**sampling_kwargs(max_new_tokens, True, temperature, seed + i, sorted(eos)))
            for i in range(len(prompts))
        ]
        outs = self.lm.model.generate(
            [{"prompt_token_ids": p} for p in prompts], params, lora_request=self._request(adapter_on)
        )
        return [list(o.outputs[0].token_ids) for o in outs]


# ------------------------------------------------------------------------------------ multi-GPU cells


def accelerate_command(
    protocol: str | Path,
    cell: str,
    num_processes: int,
    config_file: str | Path | None = None,
    python: str | None = None,
    cpu: bool = False,
) -> list[str]:
    """The command that runs one cell under `accelerate launch` with this interpreter's accelerate (the
    project venv's): every process trains (DDP through TRL's Trainer), process 0 measures."""
    cmd = [
        python or sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
    ]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    if cpu:
        cmd.append("--cpu")
    if num_processes > 1 and not cpu and config_file is None:
        cmd.append("--multi_gpu")  # a config file says the distributed type itself
    return [*cmd, "-m", "study.cli", "run-cell", str(protocol), cell]


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
