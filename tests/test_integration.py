"""The smoke protocol on the bundled SmolLM2-135M: all four methods train and are measured, end to end."""

import shutil

import pandas as pd
import pytest
import yaml

from study.config import Method, load_protocol
from study.metrics import cell_state
from study.runner import Runner
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_smoke_protocol_on_bundled_model(tmp_path):
    body = yaml.safe_load((REPO / "protocols" / "smoke.yaml").read_text())
    body["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(body))
    runner = Runner(path)
    assert runner.run() == 0
    proto = load_protocol(path)
    cells = proto.cells()
    assert {c.method for c in cells} == {Method.sft, Method.dpo, Method.kto, Method.grpo}  # the smoke's four
    assert all(cell_state(runner.run_paths, proto, c)["state"] == "done" for c in cells)
    df = pd.read_csv(runner.run_paths.metrics)
    success = df[df.metric == "newtask/success"].set_index("method")
    assert set(success.index) == {"base", "sft", "dpo", "kto", "grpo"}
    assert success.value.between(0, 1).all()
    for c in cells:  # a checkpoint per step was kept for the emergence trajectories
        steps = sorted(p.name for p in runner.run_paths.cell(c.name).train_dir.glob("checkpoint-*"))
        assert steps == ["checkpoint-1", "checkpoint-2"], c.name
    adapters = df[df.method != "base"]
    for c in cells:  # every adapter: KL, every regression suite from the shared mirror, forgetting
        d = adapters[adapters.cell == c.name]
        final = set(d[d.checkpoint == 2].metric)
        assert {
            "kl/forward_newtask",
            "kl/reverse_newtask",
            "kl/forward_general",
            "forgetting/mean",
            "lm_eval/mmlu/acc",
            "lm_eval/hellaswag/acc_norm",
            "lm_eval/truthfulqa_mc2/acc",
            "lm_eval/humaneval/pass@1",
            "emergence/hellaswag/acc_norm",
        } <= final, c.name
        assert {"newtask/success", "kl/forward_newtask", "emergence/hellaswag/acc_norm"} <= set(
            d[d.checkpoint == 1].metric
        ), c.name  # the intermediate checkpoint was measured too
        assert d.metric.str.startswith("emergence/onset/").any()
    base = df[df.method == "base"]
    assert {"lm_eval/mmlu/acc", "emergence/hellaswag/acc_norm"} <= set(base.metric)
    shutil.rmtree(tmp_path / "results")
