"""What every party derives from the config before training: the split model and its edge bundle.

Its own module because the same seed must give the same weights and LoRA init everywhere (server, the in-process
references, the torch edge, benchmarks), and because exporting a bundle is slow: `cached_bundle` is the one
on-disk bundle cache (the server, the tests and the benchmarks all export through it), keyed by what the
bundle is made of and by the source of every module that determines its bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from splitwave.common import lora as common_lora
from splitwave.common import manifest as common_manifest
from splitwave.common.config import ConfigError, ExperimentConfig
from splitwave.common.manifest import MANIFEST_FILE, BundleManifest, BundleSource
from splitwave.common.tokenizer import Tokenizer
from splitwave.server.export import export_bundle
from splitwave.server.export.quantize import quantize_bundle, weight_names
from splitwave.server.models import build_model
from splitwave.server.pretrained import MODEL_IDS, PRETRAINED, TOKENIZERS
from splitwave.server.split import LoraSpec, SplitModel, split_model

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
#: the int8 pass, applied to a finished fp32 bundle: it keys the int8 bundles only, so editing it re-quantizes
#: them and leaves the fp32 bundles in the cache
QUANTIZE_SOURCES = (_HERE / "export" / "quantize.py",)
#: the source files whose code determines a bundle's bytes: building and splitting the model, exporting it, and
#: this module (the manifest's "source" block, the model a config builds). Editing any of them re-exports.
BUNDLE_SOURCES = (
    *sorted(p for p in (_HERE / "export").glob("*.py") if p not in QUANTIZE_SOURCES),
    _HERE / "models.py",
    _HERE / "split.py",
    _HERE / "setup.py",
    Path(common_lora.__file__),  # the factor names written into the bundle
    Path(common_manifest.__file__),  # the manifest written into the bundle
)


def model_source(cfg: ExperimentConfig) -> str:
    """A tiny model's family name, or the folder of a real model (SmolLM2: converted on first use)."""
    return PRETRAINED[cfg.model.family]() if cfg.model.family in PRETRAINED else cfg.model.family


def tokenizer_source(cfg: ExperimentConfig) -> str | None:
    """Folder of the tokenizer that encodes the run's text data (it goes into the bundle), or None."""
    if cfg.model.family in PRETRAINED:
        return PRETRAINED[cfg.model.family]()
    return TOKENIZERS[cfg.model.tokenizer]() if cfg.model.tokenizer else None


def model_vocab_size(cfg: ExperimentConfig) -> int | None:
    """A tiny model's vocabulary: model.vocab_size, else the tokenizer's; None: the model's own / tiny default."""
    tok = tokenizer_source(cfg) if cfg.model.tiny else None
    if tok is None:
        return cfg.model.vocab_size
    need = Tokenizer.from_dir(tok).vocab_size
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < need:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {need} ids of tokenizer "
            f"{cfg.model.tokenizer!r}"
        )
    return cfg.model.vocab_size or need


def build_split(cfg: ExperimentConfig) -> SplitModel:
    """The split model every party derives from the config (same seed: same weights, same LoRA init)."""
    torch.manual_seed(cfg.seed)
    model = build_model(
        model_source(cfg),
        cfg.model.task,
        cfg.model.num_labels,
        seed=cfg.seed,
        vocab_size=model_vocab_size(cfg),
        init_std=cfg.model.init_std,
        tie_embeddings=cfg.model.tie_embeddings,
    )
    lora = LoraSpec(
        r=cfg.lora.r, alpha=cfg.lora.alpha, targets=cfg.lora.targets, dropout=cfg.lora.dropout, rslora=cfg.lora.rslora
    )
    return split_model(model, cfg.model.cut, lora, cfg.model.task)


# -- the bundle cache -------------------------------------------------------------------------------------------
def exporter_digest(sources=BUNDLE_SOURCES) -> str:
    """Digest of the code that determines a bundle's bytes (BUNDLE_SOURCES)."""
    code = b"".join(p.read_bytes() for p in sources)
    return hashlib.sha256(code).hexdigest()[:12]


def bundle_dir(cache_dir: Path, ident: dict, label: str = "") -> Path:
    """Where `cached_bundle` keeps the bundle of `ident` (what the bundle is made of, as JSON); an ident with a
    "quantize" entry is an int8 bundle, keyed by the quantizer's code too."""
    code = {"exporter": exporter_digest()}
    if ident.get("quantize"):
        code["quantizer"] = exporter_digest(QUANTIZE_SOURCES)
    key = hashlib.sha256(json.dumps({**ident, **code}, sort_keys=True).encode())
    key = key.hexdigest()[:16]
    return Path(cache_dir) / (f"{label}-{key}" if label else key)


def cached_bundle(
    cache_dir: Path,
    ident: dict,
    split: SplitModel,
    label: str = "",
    source: BundleSource | None = None,
    quantize: str = "none",
    keep_fp32: list[str] | tuple[str, ...] = (),
    **export,
) -> Path:
    """Export `split`'s edge bundle once per `ident` (and exporter code) into `cache_dir`; later calls, in this
    process or another, reuse it. `export`: keyword arguments of `export_bundle`; `source`: what built the
    model, written into the manifest. The split's requires_grad flags are as they were before (the export changes them).

    quantize "int8": the int8 version of that fp32 bundle (exported or reused first), cached under `ident` plus
    the quantize settings (`keep_fp32`: parameter-name patterns left fp32)."""
    if quantize != "none":
        fp32 = cached_bundle(cache_dir, ident, split, label, source, **export)
        qident = {**ident, "quantize": quantize, "keep_fp32": list(keep_fp32)}
        names = weight_names(
            {k: p.detach().to(torch.float32).numpy() for k, p in split.edge.named_parameters()},
            BundleManifest.from_file(fp32),
        )
        return _cache_into(
            bundle_dir(cache_dir, qident, f"{label}-{quantize}" if label else quantize),
            cache_dir,
            lambda tmp: quantize_bundle(fp32, tmp, quantize, keep=keep_fp32, names=names),
        )
    target = bundle_dir(cache_dir, ident, label)

    def build(tmp: Path) -> None:
        flags = {id(p): p.requires_grad for p in split.peft_model.parameters()}
        try:
            export_bundle(split, tmp, **export)
        finally:
            for p in split.peft_model.parameters():
                p.requires_grad_(flags[id(p)])
        if source is not None:
            replace(BundleManifest.from_file(tmp), source=source).write(tmp)

    return _cache_into(target, cache_dir, build)


def _cache_into(target: Path, cache_dir: Path, build) -> Path:
    """`target` if it is in the cache, else build(tmp) in a temporary folder renamed to `target` when done."""
    if (target / MANIFEST_FILE).exists():
        log.info("edge bundle found in the cache (%s)", target)
        return target
    log.info(
        "first start of this model/cut/LoRA: exporting the edge bundle (ONNX graphs + weights) to %s; "
        "this takes a minute or more, and later starts reuse it",
        target,
    )
    t0 = time.perf_counter()
    tmp = Path(cache_dir) / f".tmp-{uuid.uuid4().hex[:8]}"
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process exported it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("edge bundle exported in %.1f s", time.perf_counter() - t0)
    return target


def bundle_ident(cfg: ExperimentConfig) -> dict:
    """What determines a run's fp32 bundle besides the exporter code: model, cut, LoRA, seed (not training
    settings); an int8 bundle (edge.quantize) is keyed by this plus its quantize settings (`cached_bundle`)."""
    return {"model": cfg.model.model_dump(), "lora": cfg.lora.model_dump(), "seed": cfg.seed}


def ensure_bundle(cfg: ExperimentConfig, cache_dir: Path, split: SplitModel | None = None) -> Path:
    """The run's edge bundle from the cache, exported on first use (`split`: the run's split model, built from
    `cfg` when not given)."""
    split = split if split is not None else build_split(cfg)
    source = BundleSource(
        family=cfg.model.family,
        tiny=cfg.model.tiny,
        num_labels=cfg.model.num_labels,
        seed=cfg.seed,
        vocab_size=model_vocab_size(cfg),
        init_std=cfg.model.init_std,
        tie_embeddings=cfg.model.tie_embeddings,
    )  # what the torch reference backend rebuilds
    return cached_bundle(
        cache_dir,
        bundle_ident(cfg),
        split,
        source=source,
        quantize=cfg.edge.quantize,
        keep_fp32=cfg.edge.keep_fp32,
        model_id=cfg.model.family if cfg.model.tiny else MODEL_IDS[cfg.model.family],
        tokenizer_dir=tokenizer_source(cfg),
    )


def index_bundle(bundle: Path) -> tuple[dict[str, tuple[Path, str, int]], str]:
    """The bundle's files as {relative name: (path, sha256, size)} and the bundle hash edges cache it under."""
    files = {}
    for p in sorted(bundle.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(bundle))] = (p, _file_sha256(p), p.stat().st_size)
    digest = hashlib.sha256(json.dumps(sorted((n, s) for n, (_, s, _) in files.items())).encode()).hexdigest()[:32]
    return files, digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
