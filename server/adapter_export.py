"""Join the edge and server adapters of a run into ONE standard PEFT folder for the unsplit model.

Because every factor carries its unsplit peft name, joining is just loading both halves into the unsplit
PeftModel and calling `save_pretrained`: the folder loads with `PeftModel.from_pretrained(base, folder)`.
Strategies that fold aggregation residuals into base weights (FedEx-LoRA, FLoRA) also get those folded
deltas written beside the adapter (`base_deltas.safetensors`), because an adapter alone cannot express them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from splitwave.common.config import dump_config, load_config
from splitwave.server.setup import build_split, model_source
from splitwave.server.trainer import trainable_parameters

log = logging.getLogger(__name__)

FINAL_DIR = "final"
EDGE_FILE = "edge_factors.npz"
TOP_FILE = "top_factors.npz"
BASE_DELTA_FILE = "base_deltas.npz"


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    tmp.replace(path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_final(run_dir: Path, cfg, edge: dict, top: dict, base_deltas: dict | None = None) -> Path:
    """Persist a run's final adapters (what export-adapter and the tests read)."""
    final = Path(run_dir) / FINAL_DIR
    save_npz(final / EDGE_FILE, edge)
    save_npz(final / TOP_FILE, top)
    if base_deltas:
        save_npz(final / BASE_DELTA_FILE, base_deltas)
    (Path(run_dir) / "config.yaml").write_text(dump_config(cfg))
    return final


def apply_to_split(split, edge: dict, top: dict, base_deltas: dict | None = None) -> None:
    """Load final factors (and folded base deltas) into a freshly built split model."""
    split.set_edge_factors(edge)
    params = trainable_parameters(split.peft_model)
    unknown = set(top) - set(params)
    if unknown:
        raise KeyError(f"top factors not in the model: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for k, v in top.items():
            params[k].copy_(torch.from_numpy(np.asarray(v)))
        modules = dict(split.peft_model.named_modules())
        for module, delta in (base_deltas or {}).items():
            layer = modules.get(module)
            if layer is None or not hasattr(layer, "base_layer"):
                raise KeyError(f"base delta for unknown LoRA module {module!r}")
            layer.base_layer.weight.add_(torch.from_numpy(np.asarray(delta)).to(layer.base_layer.weight.dtype))


def export_adapter(run_dir: Path, out_dir: Path) -> dict:
    """`splitwave export-adapter RUN_DIR OUT_DIR`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / FINAL_DIR).is_dir() and (run_dir / "server" / FINAL_DIR).is_dir():
        run_dir = run_dir / "server"  # the folder `splitwave simulate` prints holds the server's in server/
    final = run_dir / FINAL_DIR
    if not (final / EDGE_FILE).exists():
        raise FileNotFoundError(
            f"{final / EDGE_FILE} not found: give the folder a finished `splitwave server` or "
            f"`splitwave simulate` run printed (runs/NAME/TIMESTAMP)"
        )
    cfg = load_config(run_dir / "config.yaml")
    split = build_split(cfg)
    deltas = load_npz(final / BASE_DELTA_FILE) if (final / BASE_DELTA_FILE).exists() else None
    apply_to_split(split, load_npz(final / EDGE_FILE), load_npz(final / TOP_FILE), deltas)
    out_dir.mkdir(parents=True, exist_ok=True)
    split.peft_model.save_pretrained(str(out_dir))
    info = {
        "adapter": str(out_dir),
        "base_model": model_source(cfg),
        "seed": cfg.seed,
        "task": cfg.model.task,
        "folded_base_deltas": bool(deltas),
    }
    if deltas:
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in deltas.items()},
            str(out_dir / "base_deltas.safetensors"),
        )
        info["note"] = (
            "the strategy folded aggregation residuals into base weights: add base_deltas.safetensors "
            "(module -> dense delta, nn.Linear layout) to the base model's weights before loading"
        )
    (out_dir / "splitwave.json").write_text(json.dumps(info, indent=2))
    log.info("wrote PEFT adapter to %s", out_dir)
    return info
