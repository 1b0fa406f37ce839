"""Export the edge part of a SplitModel as a torch-free ONNX "edge bundle".

The edge bottom is a pure function h = f(lora_factors, input_ids, attention_mask) with the frozen weights as
constants. We trace it (and its vector-Jacobian product) to decomposed ATen graphs with `make_fx` in
symbolic mode, so batch and sequence stay dynamic, and export each graph with the dynamo ONNX exporter:

* recompute mode: forward.onnx (h) and vjp.onnx (factor grads; recomputes the forward: low memory);
* saved mode: the joint forward+backward graph is split by AOTAutograd's min-cut partitioner into
  forward_saved.onnx (h + saved activations) and backward_saved.onnx (saved + grad_h -> factor grads).

Frozen weights are deduplicated by content across all graphs and written once to `weights.bin` as ONNX
external data, under content-derived names so a runtime can share one copy between sessions.
See shared/specs/edge_training.md for why this form (plain autograd inside make_fx, not torch.func.vjp).

The steps live in one module each: trace.py (the edge function, recompute-mode graphs), saved.py (the
saved-mode partition), passes.py (ONNX rewrites), writer.py (the bundle's files and manifest). `export_bundle`
is the one public entry.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from splitwave.server.export.passes import peel_output_reshapes
from splitwave.server.export.saved import trace_saved
from splitwave.server.export.trace import Tracing, grad_name, trace_recompute
from splitwave.server.export.writer import GRAPHS, MODES, write_bundle
from splitwave.server.split import SplitModel

__all__ = ["GRAPHS", "MODES", "export_bundle", "grad_name"]

log = logging.getLogger(__name__)


def export_bundle(
    split: SplitModel,
    out_dir,
    modes=MODES,
    model_id: str | None = None,
    tokenizer_dir=None,
    trace_shape: tuple[int, int] = (3, 11),
) -> dict:
    """Write the edge bundle for `split` into `out_dir` and return its manifest (also manifest.json).

    trace_shape is the example (batch, seq) used for tracing; the graphs are dynamic in both, but tracing
    at sizes distinct from every model dimension avoids accidental specialization.
    """
    modes = tuple(modes)
    bad = set(modes) - set(MODES)
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for p in split.peft_model.parameters():
        p.requires_grad_(False)
    try:
        manifest = _export(split, out, modes, model_id, tokenizer_dir, trace_shape)
    finally:
        for p in [*split.edge_factor_params().values(), *split.server_factor_params().values()]:
            p.requires_grad_(True)
    manifest.export_seconds["total"] = round(time.perf_counter() - t_all, 2)
    manifest.write(out)
    log.info("exported bundle to %s in %.1f s", out, manifest.export_seconds["total"])
    return manifest


def _export(split: SplitModel, out: Path, modes, model_id, tokenizer_dir, trace_shape) -> dict:
    t = Tracing.of(split, trace_shape)
    models = trace_recompute(t) if "recompute" in modes else {}
    saved_names: list[str] = []
    if "saved" in modes:
        saved, saved_names = trace_saved(t)
        models.update(saved)
        n_peeled = peel_output_reshapes(models["forward_saved.onnx"], models["backward_saved.onnx"])
        log.info("saved activations handed over unreshaped: %d of %d", n_peeled, len(saved_names))
    return write_bundle(split, out, models, modes, saved_names, model_id, tokenizer_dir, t.times)
