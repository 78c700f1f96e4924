"""The base model's measurements, shared by every run on this machine that measures the same thing.

A protocol measures its base once (results/<protocol>/base/); two protocols with the same model, task and
stage settings would measure it twice. Each base stage file is also kept under
$STUDY_CACHE/base/ (default ~/.cache/forgetting-study/base), keyed by

    the base weights' fingerprint (the exact bytes of the input embeddings, study.models.weights_fingerprint)
    + the stage's cache key (its settings and its code version, study.metrics.stage_key)
    + the task's definition (for per-task stages; `methods` and `stages` left out: they change no base file)

and a run whose base stage is missing copies the cached file in (atomically) instead of measuring; the run's
log says so. The persona stage's direction file goes with it. A changed setting, code version or weight
gives another key, so a stale file is never read. `STUDY_BASE_CACHE=0` turns it off (the test suite does,
except in the test of this module).

    from study.basecache import restore, store
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from study import io
from study.metrics import MODEL_LEVEL, stage_done, stage_key
from study.models import cache_root

DIRECTION = "persona_direction.npz"


def enabled() -> bool:
    return os.environ.get("STUDY_BASE_CACHE", "1") != "0"


def root() -> Path:
    return cache_root() / "base"


def entry(fingerprint: str, task, name: str, settings) -> Path:
    """The cache folder of one base stage (holds `<name>.json`, and the direction file for persona)."""
    blob = {
        "weights": fingerprint,
        "stage": name,
        "key": stage_key(name, settings),
        "task": None
        if name in MODEL_LEVEL
        else task.model_dump(mode="json", exclude={"methods", "stages", "checkpoint_stages"}),
    }
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]
    return root() / f"{name}-{digest}"


def restore(
    fingerprint: str, task, stages: dict[str, object], where: Callable[[str], Path], direction: Path
) -> list[str]:
    """Copy each cached base stage that `where(name)` lacks; returns the names restored."""
    if not enabled():
        return []
    out = []
    for name, settings in stages.items():
        dest, key = where(name), stage_key(name, settings)
        src = entry(fingerprint, task, name, settings)
        if stage_done(dest, key) or not stage_done(src / f"{name}.json", key):
            continue
        if name == "persona" and (src / DIRECTION).is_file():
            io.copy_file(src / DIRECTION, direction)
        io.copy_file(src / f"{name}.json", dest)
        out.append(name)
    return out


def store(
    fingerprint: str, task, stages: dict[str, object], where: Callable[[str], Path], direction: Path
) -> list[str]:
    """Put each current base stage file of the run into the cache (where it is not yet); returns the names.
    A cache that cannot be written is skipped: it saves time, it is never needed."""
    if not enabled():
        return []
    out = []
    for name, settings in stages.items():
        src, key = where(name), stage_key(name, settings)
        dest = entry(fingerprint, task, name, settings)
        if not stage_done(src, key) or stage_done(dest / f"{name}.json", key):
            continue
        try:
            if name == "persona" and direction.is_file():
                io.copy_file(direction, dest / DIRECTION)
            io.copy_file(src, dest / f"{name}.json")
        except OSError:
            continue
        out.append(name)
    return out
