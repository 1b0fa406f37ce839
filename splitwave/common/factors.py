"""LoRA factor files (.npz or .safetensors) as {name: float32 array}: what every edge backend loads and saves.

Torch-free, so the ONNX Runtime edge and the torch reference backend share one reader and one writer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


def load_factors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Factors from .npz or .safetensors (safetensors.numpy, which does not need torch)."""
    path = str(path)
    if path.endswith(".safetensors"):
        # lazy: safetensors is not part of the edge install; only a .safetensors file needs it
        from safetensors.numpy import load_file

        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in load_file(path).items()}
    with np.load(path) as z:
        return {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files}


def save_factors(factors: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Write factors as .safetensors when the name says so, else as .npz (whatever the suffix)."""
    path = str(path)
    if path.endswith(".safetensors"):
        # lazy: safetensors is not part of the edge install; only a .safetensors file needs it
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in factors.items()}, path)
    else:
        with open(path, "wb") as f:  # np.savez would append .npz to other suffixes
            np.savez(f, allow_pickle=True, **factors)  # allow_pickle: savez's default, named for the type checker
