import os
from pathlib import Path

import pytest
import yaml

# Never wait on the hub in tests: a missing model must fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test measures its own base (tests/test_runner.py turns the cross-run base cache on where it tests it).
os.environ["STUDY_BASE_CACHE"] = "0"

REPO = Path(__file__).resolve().parent.parent
# The offline benchmark mirror next to the checkout (as on CI); the regression stage reads it.
if (REPO.parent / "shared" / "benchmarks").is_dir():
    os.environ.setdefault("STUDY_DATA_DIR", str(REPO.parent / "shared" / "benchmarks"))


@pytest.fixture
def write_protocol(tmp_path):
    """Write a protocol dict as YAML into tmp_path (results go to tmp_path/results) and return its path."""

    def write(body: dict, name: str = "proto") -> Path:
        body = {"results_dir": str(tmp_path / "results"), **body}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    return write


TINY_PROTOCOL = {
    "model": {"source": "tiny-random"},
    "tasks": [{"name": "snark"}],
    "train": {
        "steps": 4,
        "prompts_per_step": 1,
        "max_length": 64,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
        "checkpoint_every": 2,
    },
    "methods": {"sft": {}, "dpo": {"beta": 0.1}, "kto": {"beta": 0.1}, "grpo": {"num_generations": 4}},
    "seeds": [0],
    "newtask": {"max_new_tokens": 8, "limit": 4},
    "regression": {"suites": ["hellaswag"], "limit": {"hellaswag": 4}},
    "kl": {"n_prompts": 4, "max_new_tokens": 8, "n_general": 4, "max_length_general": 32},
}
