"""The GPU throughput paths, checked without a GPU and without vLLM: the configs they build, the vLLM and
lm-eval arguments, the `accelerate launch` command line, the gpu-extra error, and that generation routes
through the engine that is set. None of this shows that the paths work on a GPU (README: GPU paths)."""

from __future__ import annotations

import sys

import pytest
from conftest import TINY_PROTOCOL
from typer.testing import CliRunner

from study import gpu
from study.cli import app
from study.config import ProtocolError, load_protocol
from study.executor import CellJob, SlurmOptions

GRPO_VLLM = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}


def _proto(write_protocol, **over):
    return write_protocol({**TINY_PROTOCOL, "methods": {"sft": {}}, **over})


def test_lm_eval_vllm_args(write_protocol, tmp_path):
    path = _proto(
        write_protocol, model={"source": "tiny-random", "engine": "vllm", "tensor_parallel_size": 2}
    )
    proto = load_protocol(path)
    base = {
        "pretrained": "/models/qwen",
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.4,
        "max_lora_rank": 8,
        "batch_size": "auto",
        "seed": 1234,
    }
    assert gpu.lm_eval_vllm_args(proto, "/models/qwen", "bfloat16") == base | {"enable_lora": True}
    args = gpu.lm_eval_vllm_args(proto, "/models/qwen", "bfloat16", tmp_path / "adapter")
    assert args == base | {"lora_local_path": str(tmp_path / "adapter")}
    assert gpu.model_args_string(args) == (
        "pretrained=/models/qwen,dtype=bfloat16,tensor_parallel_size=2,gpu_memory_utilization=0.4,"
        f"max_lora_rank=8,batch_size=auto,seed=1234,lora_local_path={tmp_path / 'adapter'}"
    )


def test_lm_eval_vllm_constructor_takes_the_arguments():
    """Every argument we pass is a parameter of lm-eval's VLLM or one it forwards to vllm.LLM (read from the
    source: the module imports vllm, so it cannot be imported here)."""
    import ast
    from importlib.util import find_spec

    src = open(find_spec("lm_eval.models").submodule_search_locations[0] + "/vllm_causallms.py").read()
    init = next(
        n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    )
    params = {a.arg for a in init.args.args}
    assert {
        "pretrained",
        "dtype",
        "revision",
        "tensor_parallel_size",
        "max_lora_rank",
        "batch_size",
    } <= params
    assert {"seed", "lora_local_path"} <= params and init.args.kwarg is not None  # the rest go to vllm.LLM


@pytest.mark.parametrize(("r", "rank"), [(1, 1), (8, 8), (12, 16), (64, 64), (300, 320)])
def test_max_lora_rank(r, rank):
    assert gpu.max_lora_rank(r) == rank


def test_max_lora_rank_too_large():
    with pytest.raises(ValueError, match="train.lora.r=600"):
        gpu.max_lora_rank(600)


def test_sampling_kwargs():
    greedy = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "skip_special_tokens": True}
    assert gpu.sampling_kwargs(64, False, 0.7, seed=3) == greedy
    sampled = gpu.sampling_kwargs(48, True, 0.7, seed=3, stop_token_ids=[9, 2])
    assert sampled == greedy | {"max_tokens": 48, "temperature": 0.7, "seed": 3, "stop_token_ids": [2, 9]}


def test_lora_request_ids_are_distinct_per_adapter(tmp_path):
    a, b = tmp_path / "cell-a" / "adapter", tmp_path / "cell-b" / "adapter"
    a.mkdir(parents=True), b.mkdir(parents=True)
    name, ia, path = gpu.lora_request_args(a)
    assert (name, path) == ("adapter", str(a.resolve()))
    assert gpu.lora_request_args(a)[1] == ia != gpu.lora_request_args(b)[1]


def test_token_prompts_match_hf_generation():
    from study.models import tiny_tokenizer

    tok = tiny_tokenizer()
    conv = [[{"role": "user", "content": "2 + 2"}]]
    text = tok.apply_chat_template(conv[0], tokenize=False, add_generation_prompt=True)
    assert gpu.token_prompts(tok, conv) == [
        {"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]}
    ]


def test_missing_extra_message(write_protocol):
    proto = load_protocol(
        _proto(
            write_protocol,
            model={"source": "tiny-random", "engine": "vllm"},
            methods={"grpo": {"trl": GRPO_VLLM}},
        )
    )
    assert gpu.missing_extra(proto, available=False) == [
        "model.engine: vllm needs the gpu extra (vLLM, not installed here): make install-gpu",
        "methods.grpo.trl.use_vllm: true needs the gpu extra (vLLM, not installed here): make install-gpu",
    ]
    assert gpu.missing_extra(proto, available=True) == []
    assert len(gpu.unverified_paths(proto)) == 2


@pytest.mark.skipif(gpu.vllm_available(), reason="vLLM is installed here")
def test_run_refuses_engine_vllm_without_the_extra(write_protocol):
    path = _proto(write_protocol, model={"source": "tiny-random", "engine": "vllm"})
    out = CliRunner().invoke(app, ["run", str(path)])
    assert out.exit_code == 2
    assert "model.engine: vllm needs the gpu extra (vLLM, not installed here): make install-gpu" in out.output


@pytest.mark.skipif(gpu.vllm_available(), reason="vLLM is installed here")
def test_runner_refuses_grpo_use_vllm_before_loading(write_protocol):
    """A SLURM cell job starts through Runner.start: the same one line, not TRL's ImportError after loading."""
    from study.runner import Runner

    path = _proto(write_protocol, methods={"grpo": {"trl": GRPO_VLLM}})
    with pytest.raises(RuntimeError, match=r"methods.grpo.trl.use_vllm: true needs the gpu extra"):
        Runner(path).start()


def test_grpo_vllm_options_validate_and_reach_grpo_config(write_protocol, tmp_path):
    from study.models import Runtime
    from study.train import check_trl_options, trl_config

    path = _proto(write_protocol, methods={"grpo": {"num_generations": 4, "trl": GRPO_VLLM}})
    proto = load_protocol(path)
    assert check_trl_options(proto) == []
    args = trl_config(proto.cells()[0], tmp_path, Runtime("cpu", "float32"))
    assert type(args).__name__ == "GRPOConfig"
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, "colocate", 0.3)
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 0, out.output
    assert "unverified GPU path: methods.grpo.trl.use_vllm: true" in out.output


def test_grpo_unknown_vllm_mode_is_a_validate_error(write_protocol):
    from study.train import check_trl_options

    proto = load_protocol(
        _proto(write_protocol, methods={"grpo": {"trl": {"use_vllm": True, "vllm_mod": "x"}}})
    )
    assert "vllm_mod" in " ".join(check_trl_options(proto))


def test_accelerate_command(tmp_path):
    cfg = tmp_path / "fsdp.yaml"
    py = sys.executable
    assert gpu.accelerate_command("p.yaml", "snark-sft-s0-abc", 4) == [
        *(py, "-m", "accelerate.commands.launch", "--num_processes", "4", "--multi_gpu"),
        *("-m", "study.cli", "run-cell", "p.yaml", "snark-sft-s0-abc"),
    ]
    assert gpu.accelerate_command("p.yaml", "c", 2, cfg, python="/v/bin/python") == [
        *("/v/bin/python", "-m", "accelerate.commands.launch", "--num_processes", "2"),
        *("--config_file", str(cfg), "-m", "study.cli", "run-cell", "p.yaml", "c"),
    ]
    assert gpu.accelerate_command("p.yaml", "c", 1, cpu=True)[4:7] == ["1", "--cpu", "-m"]


def test_slurm_cells_use_accelerate_above_one_process(write_protocol, tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("compute_environment: LOCAL_MACHINE\n")
    path = _proto(
        write_protocol, executor={"kind": "slurm", "gpus_per_cell": 2, "accelerate_config": str(cfg)}
    )
    proto = load_protocol(path)
    opts = SlurmOptions.from_protocol(proto.executor)
    assert opts.processes == 2 and opts.accelerate_config == str(cfg)
    job = CellJob(str(path), opts.processes, opts.accelerate_config)
    assert job.command("c", python="py") == [
        *("py", "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file", str(cfg)),
        *("-m", "study.cli", "run-cell", str(path), "c"),
    ]
    assert CellJob(str(path)).command("c") is None  # one process: the cell runs in the job itself
    assert "2 processes per cell (accelerate launch)" in " ".join(gpu.unverified_paths(proto))


def test_accelerate_config_must_exist(write_protocol, tmp_path):
    with pytest.raises(ProtocolError, match="executor.accelerate_config"):
        load_protocol(_proto(write_protocol, executor={"accelerate_config": str(tmp_path / "no.yaml")}))


def test_generation_routes_through_the_engine():
    """With an engine set, `generate` asks it (adapter on unless disabled); steering hooks force transformers."""
    from peft import LoraConfig, get_peft_model

    from study.models import generate, generation_engine, tiny_model, tiny_tokenizer, transformers_only

    class Fake:
        calls: list = []

        def generate(self, tok, convs, max_new, do_sample, temperature, seed, adapter_on):
            self.calls.append(adapter_on)
            return ["vllm"] * len(convs)

    tok, fake = tiny_tokenizer(), Fake()
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    conv = [[{"role": "user", "content": "hi"}]]
    with generation_engine(fake):
        assert generate(model, tok, conv, 2) == ["vllm"]
        with model.disable_adapter():
            generate(model, tok, conv, 2)
        with transformers_only():
            assert generate(model, tok, conv, 2) != ["vllm"]
    assert fake.calls == [True, False]
    assert generate(model, tok, conv, 2) != ["vllm"]  # no engine: transformers


def test_a_cell_runs_under_accelerate_launch_on_cpu(write_protocol):
    """The command the SLURM executor runs for a multi-GPU cell, here with one CPU process (~15 s): the
    hidden `run-cell` entry point trains and measures the cell under accelerate. Several processes on GPUs
    (DDP: process 0 saves and measures) are not exercised here."""
    import json
    import os
    import subprocess

    from study.paths import REPO, RunPaths

    body = {
        **TINY_PROTOCOL,
        "methods": {"sft": {}},
        "train": {**TINY_PROTOCOL["train"], "steps": 2, "checkpoint_every": 2},
        "newtask": {"max_new_tokens": 4, "limit": 2},
        "regression": {"suites": ["hellaswag"], "limit": {"hellaswag": 2}},
        "kl": {"n_prompts": 2, "max_new_tokens": 4, "metrics": ["kl/forward_newtask"]},
    }
    path = write_protocol(body)
    proto = load_protocol(path)
    cell = proto.cells()[0].name
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = gpu.accelerate_command(path, cell, 1, cpu=True)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    status = RunPaths.for_protocol(path, proto.results_dir).cell(cell).status
    assert json.loads(status.read_text())["state"] == "done"


def test_gpu_install_keeps_the_project_pins():
    """`make install-gpu` resolves vLLM with uv overrides that must equal the project's own torch and
    transformers pins (vLLM 0.31.0 declares transformers<5.18; plain pip cannot resolve `.[gpu]`)."""
    import tomllib

    from tests.conftest import REPO

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d for d in deps if d.split("==")[0] in ("torch", "transformers")}
    lines = (REPO / "scripts" / "gpu-overrides.txt").read_text().splitlines()
    overrides = {ln.split("==")[0]: ln for ln in lines if ln and not ln.startswith("#")}
    assert overrides == pins
    make = (REPO / "Makefile").read_text()
    assert "--override scripts/gpu-overrides.txt -e '.[gpu]'" in make
