"""study.executor without a cluster: SLURM time syntax, array-task ids, and `study status` on a run whose
SLURM jobs no longer exist (or where SLURM is not installed): the run folder alone still answers.
The real-cluster tests are in tests/test_slurm.py."""

from __future__ import annotations

import pytest
from conftest import TINY_PROTOCOL
from typer.testing import CliRunner

from study import io
from study.cli import app
from study.config import load_protocol
from study.executor import _expand, jobs_path, parse_minutes, query_states
from study.paths import RunPaths


@pytest.mark.parametrize(
    "t, minutes", [("90", 90), (45, 45), ("1:30:00", 90), ("45:30", 46), ("2-00:00:00", 2880), ("0:00:01", 1)]
)
def test_parse_minutes(t, minutes):
    assert parse_minutes(t) == minutes


def test_parse_minutes_rejects_garbage():
    with pytest.raises(ValueError):
        parse_minutes("1:2:3:4")


def test_expand_array_tasks():
    assert _expand("7", "3") == ["7_3"]
    assert _expand("7", "0-2%2") == ["7_0", "7_1", "7_2"]
    assert _expand("7", "1,3-4") == ["7_1", "7_3", "7_4"]


def test_status_without_slurm(write_protocol, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no squeue/scontrol/sacct
    assert query_states(["12"]) == {}
    path = write_protocol({**TINY_PROTOCOL, "methods": {"sft": {}}})
    proto = load_protocol(path)
    rp = RunPaths.for_protocol(path, proto.results_dir)
    (cell,) = proto.cells()
    io.write_json(jobs_path(rp), {"base": "11", "array": "12", "report": "13", "cells": {cell.name: "12"}})
    out = CliRunner().invoke(app, ["status", str(path)])
    assert out.exit_code == 0, out.output
    assert "UNKNOWN" in out.output and "pending" in out.output and "slurm base job 11" in out.output
