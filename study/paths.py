"""One place owns the layout of results/ and paper/generated/.

results/<protocol stem>/
    protocol.yaml        the resolved protocol as run
    manifest.json        versions, git commit (+dirty flag), hardware
    study.log            the run's log
    metrics.csv          the tidy table: one row per cell x checkpoint x metric
    base/<task>/         the base model's measurements, made once per protocol
    cells/<cell name>/   cell.json (resolved config), train/ (checkpoints, log.jsonl), adapter/,
                         <stage>.json measurements, status.json
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
