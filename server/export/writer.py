"""The bundle's files: weights.bin (every large initializer once, deduplicated by content), the graphs that
reference it, factors.npz, the tokenizer files and manifest.json, which says where everything is.

Its own module because this is the bundle format an edge reads (shared/specs): how it is laid out on disk
is kept apart from how its graphs are traced.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from splitwave.common.lora import is_a_key, module_of
from splitwave.common.manifest import (
    FORMAT,
    BaseWeightPlace,
    BundleManifest,
    FactorSpec,
    InitializerEntry,
    LoraInfo,
)
from splitwave.server.export.passes import rename_initializers
from splitwave.server.export.trace import OPSET, grad_name
from splitwave.server.split import DEFAULT_TARGETS, SplitModel

WEIGHTS_FILE = "weights.bin"
FACTORS_FILE = "factors.npz"
MODES = ("recompute", "saved")
GRAPHS = {"recompute": ("forward.onnx", "vjp.onnx"), "saved": ("forward_saved.onnx", "backward_saved.onnx")}
#: initializers smaller than this stay inside the graph (shape constants, scalars)
EXTERNAL_MIN_BYTES = 1024
ALIGN = 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
)


def write_bundle(
    split: SplitModel,
    out: Path,
    models: dict[str, onnx.ModelProto],
    modes,
    saved_names: list[str],
    model_id: str | None,
    tokenizer_dir,
    times: dict[str, float],
) -> BundleManifest:
    """Write every file of the bundle but manifest.json into `out`; returns the manifest."""
    names = split.edge_factor_names()
    t0 = time.perf_counter()
    wbytes, wsha, init_table, graph_inits = externalize(models, out)
    base = base_weights(split, init_table)
    times["write"] = round(time.perf_counter() - t0, 2)
    factors = split.edge_factors()
    np.savez(out / FACTORS_FILE, **factors)
    tok_files = []
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / f
            if src.is_file():
                shutil.copy2(src, out / f)
                tok_files.append(f)
    cfg = split.peft_model.base_model.model.config
    return BundleManifest(
        format=FORMAT,
        model_id=model_id or getattr(cfg, "_name_or_path", "") or f"tiny-{split.family}",
        family=split.family,
        task=split.task,
        cut=split.cut,
        n_blocks=split.n_blocks,
        hidden_size=int(cfg.hidden_size),
        lora=LoraInfo(
            **(split.lora.to_dict() | {"targets": split.lora.targets or list(DEFAULT_TARGETS[split.family])})
        ),
        factors=[FactorSpec(k, tuple(factors[k].shape), "float32") for k in names],
        factors_file=FACTORS_FILE,
        weights_file=WEIGHTS_FILE,
        weights_bytes=wbytes,
        weights_sha256=wsha,
        initializers={
            k: InitializerEntry(e["offset"], e["length"], tuple(e["shape"]), e["dtype"]) for k, e in init_table.items()
        },
        graph_initializers=graph_inits,
        base_weights={m: [BaseWeightPlace(**p) for p in places] for m, places in base.items()},
        opset=OPSET,
        modes=list(modes),
        graphs={m: GRAPHS[m] for m in modes},
        inputs=["input_ids", "attention_mask"],
        output="h",
        grad_outputs={k: grad_name(k) for k in names},
        saved_names=saved_names,
        tokenizer_files=tok_files,
        export_seconds=times,
    )


def externalize(models: dict[str, onnx.ModelProto], out_dir: Path) -> tuple[int, str, dict, dict]:
    """Write all large initializers once (dedup by content) to weights.bin; save the graphs referencing it.

    Also returns the table {name: offset/length/dtype/shape} and {graph file: [names]} (manifest keys
    "initializers" / "graph_initializers"): the runtime maps weights.bin once and hands the same buffers to
    every session, instead of each session mapping (and paging in) its own copy.
    """
    offsets: dict[str, tuple[int, int, str]] = {}
    table: dict[str, dict] = {}
    per_graph: dict[str, list[str]] = {}
    wpath = out_dir / WEIGHTS_FILE
    h = hashlib.sha256()
    pos = 0
    with open(wpath, "wb") as wf:
        for fname, model in models.items():
            renames = {}
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    raise RuntimeError("unexpected external initializer from the exporter")
                raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                digest = hashlib.sha256(raw + str(t.data_type).encode() + str(list(t.dims)).encode()).hexdigest()
                if digest not in offsets:
                    pad = (-pos) % ALIGN
                    if pad:
                        wf.write(b"\0" * pad)
                        h.update(b"\0" * pad)
                        pos += pad
                    wf.write(raw)
                    h.update(raw)
                    offsets[digest] = (pos, len(raw), f"w_{digest[:16]}")
                    pos += len(raw)
                off, length, canon = offsets[digest]
                renames[t.name] = canon
                table[canon] = {
                    "offset": off,
                    "length": length,
                    "shape": [int(d) for d in t.dims],
                    "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).name,
                }
                if canon not in per_graph.setdefault(fname, []):
                    per_graph[fname].append(canon)
                t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(f)
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
            rename_initializers(model, renames)
            onnx.save_model(model, str(out_dir / fname))
    return pos, h.hexdigest(), table, per_graph


def base_weights(split: SplitModel, table: dict) -> dict[str, list[dict]]:
    """module -> where its frozen weight lives in weights.bin ([{"initializer", "transposed"}], torch layout).

    Found by content (initializer names are content digests), so an edge can fold base-weight deltas
    (FedEx-LoRA, FLoRA) into exactly these initializers without a new export.
    """
    modules = dict(split.peft_model.named_modules())
    out = {}
    for key in split.edge_factor_names():
        if not is_a_key(key):
            continue
        m = module_of(key)
        w = modules[m].base_layer.weight.detach().to(torch.float32).numpy()
        hits = []
        for arr, transposed in ((np.ascontiguousarray(w), False), (np.ascontiguousarray(w.T), True)):
            digest = hashlib.sha256(
                arr.tobytes() + str(onnx.TensorProto.FLOAT).encode() + str(list(arr.shape)).encode()
            ).hexdigest()
            name = f"w_{digest[:16]}"
            if name in table:
                hits.append({"initializer": name, "transposed": transposed})
        out[m] = hits
    return out
