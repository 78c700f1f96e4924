"""The size of an adapter's weight change: ||ΔW||_F over all LoRA modules, ΔW = (alpha / r) · B A per module
(rsLoRA: alpha / sqrt(r)), the square root of the summed squared Frobenius norms. One of the candidate
predictors of forgetting the report compares (`lora/delta_norm`). Reads the adapter's safetensors with numpy:
no torch, so the report can recompute it from a copied run folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def delta_norm(adapter_dir: str | Path) -> tuple[float, int]:
    """(||ΔW||_F, number of LoRA modules) of the adapter in `adapter_dir` (a PEFT folder or checkpoint)."""
    from safetensors.numpy import load_file

    folder = Path(adapter_dir)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    weights = load_file(folder / "adapter_model.safetensors")
    total, modules = 0.0, 0
    for name, a in weights.items():
        if ".lora_A." not in name:
            continue
        b = weights[name.replace(".lora_A.", ".lora_B.")]
        # ||B A||_F² = trace(A Aᵀ Bᵀ B): r x r products instead of the full (out x in) matrix
        total += (
            float(
                np.trace(
                    (a.astype(np.float64) @ a.T.astype(np.float64))
                    @ (b.T.astype(np.float64) @ b.astype(np.float64))
                )
            )
            * scale**2
        )
        modules += 1
    return math.sqrt(max(total, 0.0)), modules
