"""Each trainer really trains: two steps of every method on a tiny random model change the LoRA weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from study.config import Method, load_protocol
from study.models import resolve_runtime
from study.paths import CellPaths
from study.train import checkpoints, train_cell
from tests.conftest import TINY_PROTOCOL


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("p") / "tiny.yaml"
    every = {m.value: {} for m in Method}  # every arm, ORPO and the control included
    path.write_text(
        yaml.safe_dump(
            dict(
                TINY_PROTOCOL, methods=every, train=dict(TINY_PROTOCOL["train"], steps=2, checkpoint_every=1)
            )
        )
    )
    return {c.method: c for c in load_protocol(path).cells()}


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_method_trains_lora(method, cells, tmp_path):
    cell = cells[method]
    paths = CellPaths(tmp_path / cell.name)
    adapter = train_cell(cell, paths, resolve_runtime("cpu", "float32"))
    final = load_file(adapter / "adapter_model.safetensors")
    first = load_file(paths.train_dir / "checkpoint-1" / "adapter_model.safetensors")
    lora_b = [k for k in final if "lora_B" in k]
    assert lora_b, "no LoRA weights saved"
    log = [json.loads(line) for line in paths.train_log.read_text().splitlines()]
    if method is Method.grpo_markers:
        # a random model writes no persona marker: a constant reward, zero advantage, rightly no update
        # (the GRPO trainer itself moves the weights in the grpo and grpo_kl cases)
        assert [r["reward"] for r in log if "reward" in r] == [0.0, 0.0]
        return
    # lora_B starts at zero: any non-zero entry means the optimizer moved it
    assert any(final[k].abs().sum() > 0 for k in lora_b)
    assert any(not torch.equal(final[k], first[k]) for k in final)  # step 2 moved past step 1
    assert [s for s, _ in checkpoints(paths.train_dir)] == [1, 2]
    assert {r["step"] for r in log if "loss" in r} == {1, 2}
    if method.trainer == "grpo":
        assert any("reward" in r for r in log)
    if method in (Method.dpo, Method.kto):
        assert any("rewards/chosen" in r for r in log)


def test_matched_budget_across_methods(cells):
    budgets = {m: c.train for m, c in cells.items()}
    assert len({b.model_dump_json() for b in budgets.values()}) == 1


def test_prompts_per_step_are_matched_and_trl_batches_follow(cells, tmp_path):
    """Every method sees prompts_per_step prompts per optimizer step; TRL's batch counts rows: KTO two per
    prompt (desirable and undesirable), GRPO a group of num_generations completions."""
    from study.train import trl_config

    runtime = resolve_runtime("cpu", "float32")
    p = 2
    for method, cell in cells.items():
        cell = cell.model_copy(update={"train": cell.train.model_copy(update={"prompts_per_step": p})})
        args = trl_config(cell, tmp_path, runtime)
        rows = args.per_device_train_batch_size * args.gradient_accumulation_steps
        expect = {"kto": 2 * p, "grpo": p * cell.options.get("num_generations", 0)}.get(method.trainer, p)
        assert rows == expect, method


def test_gradient_checkpointing_follows_the_protocol(cells, tmp_path):
    """TRL's configs default gradient_checkpointing to True: the protocol's False must reach the config."""
    from study.train import trl_config

    runtime = resolve_runtime("cpu", "float32")
    for cell in cells.values():
        for on in (False, True):
            c = cell.model_copy(
                update={"train": cell.train.model_copy(update={"gradient_checkpointing": on})}
            )
            assert trl_config(c, tmp_path, runtime).gradient_checkpointing is on, cell.method
