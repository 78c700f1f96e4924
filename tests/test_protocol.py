import subprocess
import sys

import pytest

from study.config import Method, ProtocolError, load_protocol
from tests.conftest import REPO, TINY_PROTOCOL


@pytest.mark.parametrize("path", sorted((REPO / "protocols").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_protocols_validate(path):
    proto = load_protocol(path)
    assert proto.cells()
    # every shipped protocol compares RL's Razor's two arms; the paper protocol every arm and the control
    assert {Method.sft, Method.grpo} <= set(proto.methods)
    if path.stem == "qwen2.5-3b":
        assert set(proto.methods) == set(Method)


def test_cells_cross_methods_sweeps_and_seeds(write_protocol):
    body = dict(TINY_PROTOCOL, seeds=[0, 1, 2])
    body["methods"] = {"sft": {"sweep": {"learning_rate": [1e-4, 3e-4]}}, "dpo": {"beta": 0.2}}
    cells = load_protocol(write_protocol(body)).cells()
    assert len(cells) == 2 * 3 + 3
    assert len({c.key for c in cells}) == len(cells)
    lrs = sorted({c.train.learning_rate for c in cells if c.method is Method.sft})
    assert lrs == [1e-4, 3e-4]
    dpo = [c for c in cells if c.method is Method.dpo][0]
    assert dpo.options["beta"] == 0.2 and dpo.train.learning_rate == TINY_PROTOCOL["train"]["learning_rate"]


def test_cell_key_is_stable_and_sensitive(write_protocol):
    a = load_protocol(write_protocol(TINY_PROTOCOL)).cells()
    b = load_protocol(write_protocol(TINY_PROTOCOL)).cells()
    assert [c.key for c in a] == [c.key for c in b]
    changed = dict(TINY_PROTOCOL, train=dict(TINY_PROTOCOL["train"], steps=5))
    c = load_protocol(write_protocol(changed)).cells()
    assert not {x.key for x in a} & {x.key for x in c}


BAD = {
    "methods.ppo": dict(TINY_PROTOCOL, methods={"ppo": {}, "sft": {}}),
    "methods.dpo.beta": dict(TINY_PROTOCOL, methods={"dpo": {"beta": -0.1}}),
    "tasks.0.data": dict(TINY_PROTOCOL, tasks=[{"name": "snark", "data": "no/such/folder"}]),
    "model.source": dict(TINY_PROTOCOL, model={"source": "not a model"}),
}


@pytest.mark.parametrize("field", list(BAD))
def test_bad_protocol_names_field_and_fix(write_protocol, field):
    with pytest.raises(ProtocolError) as e:
        load_protocol(write_protocol(BAD[field]))
    line = next(line for line in e.value.problems if line.startswith(field))
    assert len(line) > len(field) + 10  # says what is wrong / what to do, not just the field


def test_cli_validate_exit_codes(write_protocol):
    good = write_protocol(TINY_PROTOCOL, "good")
    bad = dict(TINY_PROTOCOL, methods={"ppo": {}, "dpo": {"beta": -1}})
    bad = write_protocol(bad, "bad")
    run = [sys.executable, "-m", "study.cli", "validate"]
    assert subprocess.run(run + [str(good)], capture_output=True).returncode == 0
    out = subprocess.run(run + [str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    lines = [ln.strip().removeprefix(f"{bad}: ") for ln in out.stderr.splitlines()]
    assert any(ln.startswith("methods.ppo") and "sft, dpo, kto" in ln and "grpo" in ln for ln in lines)
    assert any(ln.startswith("methods.dpo.beta") for ln in lines)


def test_grad_accum_must_divide_prompts_per_step(write_protocol):
    body = dict(TINY_PROTOCOL, train=dict(TINY_PROTOCOL["train"], prompts_per_step=3, grad_accum=2))
    with pytest.raises(ProtocolError, match="grad_accum"):
        load_protocol(write_protocol(body))


def test_plan_loads_no_model(write_protocol):
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from study.cli import app; sys.argv=['study','plan',sys.argv[1]];\n"
            "try: app()\nexcept SystemExit: pass\n"
            "print('LOADED' if 'transformers' in sys.modules or 'torch' in sys.modules else 'CLEAN')",
            str(REPO / "protocols" / "qwen2.5-3b.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert "GB" in out.stdout and out.stdout.strip().endswith("CLEAN"), out.stdout + out.stderr


OPTION_ERRORS = {
    "methods.sft.beta": ({"sft": {"beta": 0.3}}, "not an option of sft"),
    "methods.grpo.beta": ({"grpo": {"beta": 0.04}}, "smaller"),  # the no-KL arm; a KL GRPO is grpo_kl
    "methods.dpo.trl": ({"dpo": {"trl": {"max_steps": 3}}}, "train.steps"),
    "methods.sft.steps": ({"sft": {"steps": 3}}, "allow_unmatched"),
    "methods.dpo.sweep": ({"dpo": {"sweep": {"beta": [-1]}}}, "beta"),
}


@pytest.mark.parametrize("field", list(OPTION_ERRORS))
def test_foreign_or_unmatched_options_are_rejected(write_protocol, field):
    methods, words = OPTION_ERRORS[field]
    with pytest.raises(ProtocolError) as e:
        load_protocol(write_protocol(dict(TINY_PROTOCOL, methods=methods)))
    line = next(ln for ln in e.value.problems if ln.startswith(field))
    assert words in line, line


def test_allow_unmatched_accepts_a_method_budget(write_protocol):
    proto = load_protocol(
        write_protocol(dict(TINY_PROTOCOL, methods={"sft": {"steps": 3}}, allow_unmatched=True))
    )
    assert proto.cells()[0].train.steps == 3


def test_trl_pass_through_is_checked_by_building_the_trl_config(write_protocol):
    from study.models import Runtime
    from study.train import check_trl_options, trl_config

    good = load_protocol(
        write_protocol(
            dict(
                TINY_PROTOCOL,
                methods={
                    "sft": {"trl": {"lr_scheduler_type": "cosine", "optim": "adamw_torch"}},
                    "kto": {"loss_type": "kto"},
                },
            )
        )
    )
    assert check_trl_options(good) == []
    cell = good.cells()[0]
    assert trl_config(cell, REPO / "results" / "_t", Runtime("cpu", "float32")).lr_scheduler_type == "cosine"
    bad = load_protocol(
        write_protocol(
            dict(
                TINY_PROTOCOL,
                methods={"sft": {"trl": {"no_such_option": 1}}, "dpo": {"trl": {"optim": "bogus"}}},
            )
        )
    )
    problems = check_trl_options(bad)
    assert any(p.startswith("methods.sft") and "no_such_option" in p for p in problems), problems
    assert any(p.startswith("methods.dpo") and "bogus" in p for p in problems), problems
    with pytest.raises(ProtocolError, match="methods.kto.loss_type"):  # a loss TRL lacks: the schema says so
        load_protocol(write_protocol(dict(TINY_PROTOCOL, methods={"kto": {"loss_type": "bogus"}})))


def test_orpo_and_the_control_are_arms(write_protocol):
    proto = load_protocol(
        write_protocol(dict(TINY_PROTOCOL, methods={"orpo": {}, "control": {}, "grpo_kl": {}}))
    )
    by = {c.method: c for c in proto.cells()}
    assert by[Method.orpo].method.trl_config == ("trl.experimental.orpo", "ORPOConfig")
    assert by[Method.control].method.data == "neutral" and by[Method.control].method.trainer == "sft"
    assert by[Method.grpo_kl].options["beta"] > 0 and by[Method.grpo_kl].method.needs_reference_model


def test_sweep_values_cannot_leave_the_run_folder(write_protocol):
    from study.config.protocol import _token

    body = dict(TINY_PROTOCOL, methods={"grpo": {"sweep": {"loss_type": ["/../../../../outside/x"]}}})
    with pytest.raises(ProtocolError, match="methods.grpo.sweep.loss_type.0"):  # not a loss TRL has
        load_protocol(write_protocol(body))
    for value in ("/../../../../outside/x", "..", ".", "a/b", "\x00", "~root", "x" * 300):
        token = _token(value)  # whatever a future free-text sweep field holds, its token stays a name
        assert (
            "/" not in token
            and token not in ("", ".", "..")
            and not token.startswith(".")
            and len(token) <= 24
        )


def test_tasks_choose_their_methods_and_stages(write_protocol):
    """tasks[].methods trains only those arms on that task; tasks[].stages measures only those stages (final
    and checkpoints); neither is part of a cell's key (they do not change the adapter)."""
    from study.metrics import checkpoint_stages, final_stages

    body = dict(TINY_PROTOCOL, seeds=[0])
    body["methods"] = {"sft": {}, "grpo": {"num_generations": 2}, "control": {}}
    body["tasks"] = [
        {
            "name": "arithmetic",
            "n_train": 40,
            "n_heldout": 10,
            "methods": ["sft", "grpo"],
            "stages": ["newtask"],
        },
        {"name": "snark"},
    ]
    body["checkpoints"] = {"stages": ["newtask", "kl"], "probe": None}
    proto = load_protocol(write_protocol(body))
    cells = proto.cells()
    assert sorted((c.task.name, c.method.value) for c in cells) == [
        ("arithmetic", "grpo"),
        ("arithmetic", "sft"),
        ("snark", "control"),
        ("snark", "grpo"),
        ("snark", "sft"),
    ]
    arith, snark = proto.tasks
    assert list(final_stages(proto, arith)) == ["newtask"]
    assert list(checkpoint_stages(proto, arith)) == ["newtask"]
    assert {"newtask", "kl"} <= set(final_stages(proto, snark)) == set(final_stages(proto))
    plain = dict(body, tasks=[{"name": "arithmetic", "n_train": 40, "n_heldout": 10}, {"name": "snark"}])
    same = {c.key for c in load_protocol(write_protocol(plain, "plain")).cells()}
    assert {c.key for c in cells} <= same


def test_task_methods_and_primary_must_be_trained(write_protocol):
    body = dict(TINY_PROTOCOL, methods={"sft": {}, "grpo": {"num_generations": 2}})
    body["tasks"] = [{"name": "snark", "methods": ["dpo"]}]
    with pytest.raises(ProtocolError, match=r"tasks\.0\.methods"):
        load_protocol(write_protocol(body))
    body["tasks"] = [{"name": "snark", "methods": ["sft"]}]
    body["primary"] = [{"metric": "persona/probe", "task": "snark", "contrast": ["grpo", "sft"]}]
    with pytest.raises(ProtocolError, match=r"primary\.0\.contrast.*not a method trained on snark"):
        load_protocol(write_protocol(body))
