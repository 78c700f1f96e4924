"""Golden file: a tiny-random run of a fixed protocol must reproduce the committed metrics.csv (values to a
tolerance), so that a silent change in any metric fails here until the file is regenerated on purpose:

    STUDY_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

import os

import numpy as np
import pandas as pd
import pytest

from study.runner import Runner
from tests.conftest import REPO, TINY_PROTOCOL

GOLDEN = REPO / "tests" / "golden" / "tiny_metrics.csv"
KEY = ["task", "method", "seed", "checkpoint", "metric"]
PROTOCOL = dict(
    TINY_PROTOCOL,
    methods={"sft": {}, "grpo": {"num_generations": 4}},
    checkpoints={"stages": ["newtask", "kl"], "probe": None},
)


def _table(path) -> pd.DataFrame:
    df = pd.read_csv(path)
    if "cell" in df.columns:  # the run's table; the golden file has no cell column
        df = df[df.cell != "stats"].drop(
            columns=["cell"]
        )  # cell names carry the config hash; the key suffices
    return df.sort_values(KEY, na_position="first").reset_index(drop=True)


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    import torch
    import yaml

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in another order round differently
    try:
        tmp = tmp_path_factory.mktemp("golden")
        path = tmp / "golden.yaml"
        path.write_text(yaml.safe_dump({"results_dir": str(tmp / "results"), **PROTOCOL}, sort_keys=False))
        runner = Runner(path)
        assert runner.run() == 0
        return _table(runner.run_paths.metrics)
    finally:
        torch.set_num_threads(threads)


def test_metrics_match_the_golden_file(metrics):
    if os.environ.get("STUDY_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        metrics.to_csv(GOLDEN, index=False)
        pytest.skip(f"regenerated {GOLDEN}")
    golden = _table(GOLDEN)
    got_keys = set(map(tuple, metrics[KEY].astype(str).values))
    want_keys = set(map(tuple, golden[KEY].astype(str).values))
    assert got_keys == want_keys, (
        f"rows appeared: {sorted(got_keys - want_keys)[:10]}; "
        f"rows vanished: {sorted(want_keys - got_keys)[:10]}"
    )
    merged = golden.merge(metrics, on=KEY, suffixes=("_want", "_got"))
    for col in ("value", "ci_low", "ci_high"):
        want, got = merged[f"{col}_want"].to_numpy(float), merged[f"{col}_got"].to_numpy(float)
        bad = ~np.isclose(want, got, rtol=1e-3, atol=1e-4, equal_nan=True)
        assert not bad.any(), merged.loc[bad, KEY + [f"{col}_want", f"{col}_got"]].head(10).to_string()
