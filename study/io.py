"""Atomic writes: a reader (or a rerun after a kill) sees the old file or the new one, never half of one.

Temporary files are `.<name>.<random>.tmp` beside their target (unique per write, so concurrent writers never
share one); a kill between the write and the rename leaves one behind, which `remove_orphans` clears at the
next run's start. Results get the usual file mode (0644 under the default umask), not mkstemp's 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: 0644 under the usual umask 022
ORPHAN_AGE = 60.0  # seconds: a temporary file this old belongs to no live write (writes take milliseconds)


@contextmanager
def _atomic(path: Path, mode: str):
    """An open file beside `path` that replaces it on success (fsync, then rename) and vanishes on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with _atomic(path, "w") as f:
        f.write(text)


def copy_file(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` atomically (a unique temporary file beside `dest`, then a rename)."""
    with _atomic(dest, "wb") as f, open(src, "rb") as g:
        shutil.copyfileobj(g, f)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def remove_orphans(root: Path, age: float = ORPHAN_AGE) -> list[Path]:
    """Delete temporary files and folders (`*.tmp`, `*.tmp.npy`, `*.tmp.npz`, `*.tmp-<pid>`) under `root` that
    are older than `age` seconds: left by a killed run. Younger ones may be a live writer's, and stay."""
    now, removed = time.time(), []
    if not Path(root).is_dir():
        return removed
    for p in sorted(Path(root).rglob("*.tmp*")):
        if not (p.name.endswith((".tmp", ".tmp.npy", ".tmp.npz")) or ".tmp-" in p.name):
            continue
        try:
            if now - p.lstat().st_mtime < age:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:  # a parent already removed, or another runner cleaned it first
            continue
    return removed
