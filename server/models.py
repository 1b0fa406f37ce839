"""Model construction: tiny in-code configs for tests, and real pretrained folders for experiments.

Tests never download anything: `tiny_config` builds small random models of the three families the
split code supports (GPT-2, BERT, LLaMA). Real experiments use all-MiniLM-L6-v2 and SmolLM2-135M-Instruct,
shipped inside PyPI packages that we locate on disk without importing them (server/pretrained.py).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
)

from splitwave.server.pretrained import PRETRAINED, minilm_path

__all__ = ["FAMILIES", "TASKS", "build_model", "family_of", "minilm_path", "tiny_config"]

log = logging.getLogger(__name__)

FAMILIES = ("gpt2", "bert", "llama")
TASKS = ("seq-cls", "causal-lm")
#: pad id of the tiny configs; tests keep real tokens >= 1 so "last non-pad" is unambiguous.
TINY_PAD_ID = 0
#: vocabulary of the tiny configs unless a tokenizer's vocabulary is asked for (`vocab_size=`)
TINY_VOCAB = 100


def family_of(config: PretrainedConfig) -> str:
    """Map a HF config to one of the supported split families (BERT-like encoders count as bert)."""
    mt = config.model_type
    if mt in ("bert",):
        return "bert"
    if mt in ("gpt2",):
        return "gpt2"
    if mt in ("llama",):
        return "llama"
    raise ValueError(f"unsupported model_type {mt!r}; supported families: {FAMILIES}")


def tiny_config(
    family: str,
    task: str = "seq-cls",
    num_labels: int = 2,
    vocab_size: int = TINY_VOCAB,
    init_std: float | None = None,
    tie_embeddings: bool | None = None,
) -> PretrainedConfig:
    """A small random config (hidden 32, 4 layers): fast to build, split and export in tests.

    vocab_size: a real tokenizer's vocabulary (e.g. MiniLM's 30,522 WordPiece ids) lets a tiny random
    model train on text; the blocks stay tiny, only the embeddings (and head) grow.
    init_std: std of the random weights (None: HF's 0.02, sized for 768-wide models). A frozen random
    LM head keeps every logit within |normed h| x |embedding| ~ sqrt(32) x 0.02 sqrt(32) = 0.64 at 0.02,
    so no adapter can make the next-token distribution much sharper than uniform; at ~1/sqrt(32) = 0.18
    LoRA visibly moves a 30k-token distribution (tested on E2E and on the synthetic task).
    tie_embeddings: one matrix for the input embedding and the LM head (None: the family's default, GPT-2
    tied, LLaMA untied), like SmolLM2 (a tied LLaMA with grouped-query attention: 4 heads, 2 key-value heads).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    common = dict(num_labels=num_labels, attn_implementation="eager")
    if init_std is not None:
        common["initializer_range"] = init_std
    if family == "bert":
        if task != "seq-cls":
            raise ValueError("bert supports task 'seq-cls' only")
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=TINY_PAD_ID,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **common,
        )
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=4,
            n_head=2,
            n_positions=128,
            n_inner=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=TINY_PAD_ID,
            bos_token_id=1,
            eos_token_id=1,
            **common,
        )
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=TINY_PAD_ID,
            bos_token_id=1,
            eos_token_id=1,
            tie_word_embeddings=False,
            **common,
        )
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if tie_embeddings is not None:
        if family == "bert":
            raise ValueError("tie_embeddings is for causal-LM families (gpt2, llama)")
        cfg.tie_word_embeddings = bool(tie_embeddings)
    return cfg


def build_model(
    family_or_path: str,
    task: str = "seq-cls",
    num_labels: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
    init_std: float | None = None,
    tie_embeddings: bool | None = None,
) -> torch.nn.Module:
    """A HF model for `task`: a tiny random one for a family name, or pretrained weights from a folder (or the
    name of a packaged real model: "minilm", "smollm2"; see server/pretrained.py).

    The seed fixes both the random base weights (tiny) and a freshly initialised head (real models), so two
    processes building the same model agree bit for bit. pad_token_id is always set, because GPT-2/LLaMA
    sequence classification needs it for batches > 1.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
    if family_or_path in FAMILIES:
        cfg = tiny_config(family_or_path, task, num_labels, vocab_size or TINY_VOCAB, init_std, tie_embeddings)
        model = auto.from_config(cfg)
    else:
        if vocab_size is not None or init_std is not None or tie_embeddings is not None:
            raise ValueError(
                "vocab_size, init_std and tie_embeddings are for tiny models; a pretrained model keeps its own"
            )
        if family_or_path in PRETRAINED:
            family_or_path = PRETRAINED[family_or_path]()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cfg = AutoConfig.from_pretrained(family_or_path)
        kwargs = {"attn_implementation": "eager"}
        if task == "seq-cls":
            kwargs["num_labels"] = num_labels
        if cfg.pad_token_id is None:
            kwargs["pad_token_id"] = cfg.eos_token_id if cfg.eos_token_id is not None else 0
        model = auto.from_pretrained(family_or_path, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    family_of(model.config)  # validate early
    model.eval()
    return model
