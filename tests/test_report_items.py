"""Item-level mixed models (study.report.items) on constructed run folders with known effects."""

import math

import numpy as np
import pytest

from study import io
from study.report.items import fit_outcome, item_models, item_table
from study.stats import holm


def _write_run(root, effects: dict[str, float], seeds=(0, 1, 2), n_items=40, seed=0):
    """A run folder whose newtask.json files hold per-prompt margins: item difficulty + method effect +
    seed effect + noise (on the margin scale)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 1.0, n_items)

    def newtask(shift):
        m = difficulty + shift + rng.normal(0, 0.3, n_items)
        return {
            "rows": [],
            "responses": [
                {"metric": "newtask/pref_margin", "id": f"p{i}", "margin": float(v)} for i, v in enumerate(m)
            ],
        }

    io.write_json(root / "base" / "snark" / "newtask.json", newtask(0.0))
    for method, eff in effects.items():
        for s in seeds:
            cell = root / "cells" / f"snark-{method}-s{s}"
            io.write_json(cell / "cell.json", {"method": method, "seed": s, "task": {"name": "snark"}})
            (cell / "adapter").mkdir(parents=True)
            (cell / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
            io.write_json(cell / "newtask.json", newtask(eff + rng.normal(0, 0.1)))
    return difficulty


def test_planted_effects_are_recovered_and_null_is_not_rejected(tmp_path):
    # Five seeds: with the cell as the replicated unit a method's interval has df >= cells - 1, and three seeds
    # (df 2) cannot give p_holm < 0.01 for this effect (the old item-as-replicate model could, by counting the
    # 40 items of a cell as replicates of the method; it rejected 27-71 % of null studies, test_calibration).
    _write_run(tmp_path, {"sft": 0.8, "dpo": 0.0}, seeds=(0, 1, 2, 3, 4))
    items = item_table(tmp_path)
    assert set(items["method"]) == {"base", "sft", "dpo"} and items["item"].nunique() == 40
    out = item_models(tmp_path).set_index("method")
    # on the sigma scale the planted margin shift of 0.8 is roughly +0.15 in success; 0 stays 0
    sft, dpo = out.loc["sft"], out.loc["dpo"]
    assert sft.ci_low > 0.08 and sft.p_holm < 0.01
    assert dpo.ci_low < 0 < dpo.ci_high and dpo.p_holm > 0.05
    assert sft.sd_item > 0.1  # the item difficulty was found
    assert sft.n_cells == 5 and sft.df >= 4 and "cells x items" in sft.model  # df: the equivalent t df


def test_item_model_matches_the_mean_difference_on_balanced_data(tmp_path):
    """Balanced data: every method answers every item, so the fixed effect equals the difference of means."""
    _write_run(tmp_path, {"kto": 0.4}, seeds=(0, 1))
    items = item_table(tmp_path)
    d = items[items["outcome"] == "newtask/success"]
    means = d.groupby("method")["y"].mean()
    est = fit_outcome(d).set_index("method").loc["kto", "est"]
    assert est == pytest.approx(means["kto"] - means["base"], abs=1e-6)


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, 0.2, math.nan]
    ours = holm(p).tolist()
    ref = multipletests([x for x in p if not math.isnan(x)], method="holm")[1]
    assert np.allclose(ours[:4], ref) and math.isnan(ours[4])


def test_stale_stage_files_are_skipped(tmp_path):
    """A stage file whose settings differ from the run's protocol.yaml is stale and left out."""
    import yaml

    _write_run(tmp_path, {"sft": 0.5}, seeds=(0, 1))
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump({"newtask": {"max_new_tokens": 48}}))
    for f in tmp_path.glob("**/newtask.json"):
        io.write_json(f, io.read_json(f) | {"config": {"max_new_tokens": 48}})
    stale = tmp_path / "cells" / "snark-sft-s1" / "newtask.json"
    io.write_json(stale, io.read_json(stale) | {"config": {"max_new_tokens": 64}})
    items = item_table(tmp_path)
    assert set(items["cell"]) == {"base-snark", "snark-sft-s0"}
