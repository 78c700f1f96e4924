"""One place owns the layout of results/ and paper/generated/.

results/<protocol stem>/
    protocol.yaml        the resolved protocol as run
    manifest.json        every start of the run: versions, git commit (+dirty flag), hardware
    study.log            the run's log
    metrics.csv          the tidy table: one row per cell x checkpoint x metric
    base/<task>/         the base model's measurements, made once per protocol
    base/model/          the base's model-level stages (regression, probe), made once
    cells/<cell name>/   cell.json (resolved config), record.json (commit, versions, model fingerprint and
                         stage versions it was measured with), train/ (checkpoints, log.jsonl), adapter/,
                         <stage>.json measurements, checkpoints/step-NNNNNN/<stage>.json, status.json
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("STUDY_RESULTS", REPO / "results"))
PAPER_GENERATED = REPO / "paper" / "generated"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def for_protocol(cls, protocol_file: Path, results_dir: Path | None = None) -> RunPaths:
        return cls((results_dir or RESULTS) / Path(protocol_file).stem)

    @property
    def protocol(self) -> Path:
        return self.root / "protocol.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def log(self) -> Path:
        return self.root / "study.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    @property
    def base_model(self) -> Path:
        """The base's model-level stages (not per task)."""
        return self.root / "base" / "model"

    def cell(self, name: str) -> CellPaths:
        return CellPaths(self.cells / name)

    def base(self, task: str) -> Path:
        return self.root / "base" / task


@dataclass(frozen=True)
class CellPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "cell.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def record(self) -> Path:
        return self.root / "record.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def train_log(self) -> Path:
        return self.root / "train" / "log.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def stage(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def checkpoint(self, step: int) -> Path:
        """Measurements of the intermediate checkpoint at `step`."""
        return self.root / "checkpoints" / f"step-{step:06d}"


CHECKPOINT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
)


def checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    """Complete training checkpoints, by step. An incomplete one (a kill during its save) is left out."""
    out = []
    for d in Path(train_dir).glob("checkpoint-*"):
        if d.is_dir() and all((d / f).is_file() for f in CHECKPOINT_FILES):
            out.append((int(d.name.split("-")[1]), d))
    return sorted(out)
