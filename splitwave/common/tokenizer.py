"""Torch-free tokenizer for edge clients, built on Hugging Face `tokenizers` (Rust, no torch).

Why a wrapper: an edge device must turn raw text into exactly the ids/mask the server-side
`transformers.AutoTokenizer` would produce (the exported ONNX bottom was traced against those), but it
may not import transformers. We load the same `tokenizer.json`, switch off whatever padding/truncation
the file bakes in (MiniLM's file pads to a fixed 128), and pad ourselves into numpy arrays.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from tokenizers import Encoding
from tokenizers import Tokenizer as _HFTokenizer

logger = logging.getLogger(__name__)

PadTo = None | str | int

# transformers uses this sentinel (int(1e30)) for "no limit" in tokenizer_config.json.
_HUGE_MAX_LEN = 1_000_000


def _read_json(path: Path) -> dict[str, Any]:
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def _token_content(tok: str | dict[str, Any] | None) -> str | None:
    """special_tokens_map / tokenizer_config store a token as a string or as an AddedToken dict."""
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class Tokenizer:
    """A `tokenizer.json` plus the bits of tokenizer_config that matter for batching (pad, eos, sep, max len)."""

    def __init__(
        self,
        hf_tokenizer: _HFTokenizer,
        pad_token: str | None = None,
        eos_token: str | None = None,
        model_max_length: int | None = None,
        sep_token: str | None = None,
    ):
        self._tok = hf_tokenizer
        # Padding/truncation are applied per call; never trust what the file baked in.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.eos_token = eos_token
        self.eos_id = self._tok.token_to_id(eos_token) if eos_token else None
        # BERT-style vocabularies have no eos; their [SEP] is what ends a sequence (causal-LM rows use it)
        self.sep_id = self._tok.token_to_id(sep_token) if sep_token else None
        if pad_token is None and eos_token is not None:
            # GPT-2 style models ship without a pad token; HF practice is pad = eos (masked anyway).
            pad_token = eos_token
        self.pad_token = pad_token
        self.pad_id = self._tok.token_to_id(pad_token) if pad_token else None
        if pad_token is not None and self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.model_max_length = model_max_length

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and read pad/eos/model_max_length from the config files next to it."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        cfg = _read_json(path / "tokenizer_config.json")
        stm = _read_json(path / "special_tokens_map.json")
        pad = _token_content(stm.get("pad_token", cfg.get("pad_token")))
        eos = _token_content(stm.get("eos_token", cfg.get("eos_token")))
        sep = _token_content(stm.get("sep_token", cfg.get("sep_token")))
        mml = cfg.get("model_max_length")
        if mml is not None and int(mml) >= _HUGE_MAX_LEN:
            mml = None
        return cls(
            _HFTokenizer.from_file(str(tj)),
            pad_token=pad,
            eos_token=eos,
            model_max_length=int(mml) if mml is not None else None,
            sep_token=sep,
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_lists(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Unpadded, untruncated ids (for callers that assemble sequences themselves, e.g. causal LM)."""
        encs = self._encode(texts, text_pairs, add_special_tokens)
        return [list(e.ids) for e in encs]

    def _encode(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None, add_special_tokens: bool
    ) -> list[Encoding]:
        inputs: list[str] | list[tuple[str, str]] = list(texts)
        if text_pairs is not None:
            pairs = list(text_pairs)
            if len(pairs) != len(inputs):
                raise ValueError(f"{len(inputs)} texts but {len(pairs)} text_pairs")
            inputs = list(zip(texts, pairs))
        return self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens)

    @overload
    def encode_batch(
        self,
        texts: Sequence[str],
        max_len: int | None = None,
        pad_to: PadTo = None,
        text_pairs: Sequence[str] | None = None,
        add_special_tokens: bool = True,
        return_token_type_ids: Literal[False] = False,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def encode_batch(
        self,
        texts: Sequence[str],
        max_len: int | None = None,
        pad_to: PadTo = None,
        text_pairs: Sequence[str] | None = None,
        add_special_tokens: bool = True,
        *,
        return_token_type_ids: Literal[True],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def encode_batch(
        self,
        texts: Sequence[str],
        max_len: int | None = None,
        pad_to: PadTo = None,
        text_pairs: Sequence[str] | None = None,
        add_special_tokens: bool = True,
        return_token_type_ids: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenize, truncate to `max_len` (longest-first for pairs) and right-pad with the pad id.

        pad_to: None -> pad every row to `max_len` (fixed shapes, = HF padding="max_length");
        "longest" -> to the longest row in this batch (= HF padding="longest"); int n -> to n
        (n >= max_len). Returns (input_ids, attention_mask) int64 [b, s], plus token_type_ids if asked.
        """
        if max_len is None:
            max_len = self.model_max_length
        if max_len is None and pad_to != "longest":
            raise ValueError("max_len is required: the tokenizer declares no model_max_length")
        if self.pad_id is None:
            raise ValueError("tokenizer has no pad token (and no eos to fall back on)")
        if max_len is not None:
            self._tok.enable_truncation(int(max_len), strategy="longest_first")
        try:
            encs = self._encode(texts, text_pairs, add_special_tokens)
        finally:
            self._tok.no_truncation()
        longest = max((len(e.ids) for e in encs), default=0)
        if pad_to is None:
            assert max_len is not None  # refused above: only pad_to="longest" may go without a max_len
            width = int(max_len)
        elif pad_to == "longest":
            width = longest
        elif isinstance(pad_to, (int, np.integer)) and not isinstance(pad_to, bool):
            width = int(pad_to)
            if max_len is not None and width < max_len:
                raise ValueError(f"pad_to={width} < max_len={max_len}: lower max_len instead")
        else:
            raise ValueError(f"pad_to must be None, 'longest' or an int, got {pad_to!r}")
        b = len(encs)
        ids = np.full((b, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        tti = np.zeros((b, width), dtype=np.int64) if return_token_type_ids else None
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
            if tti is not None:
                tti[i, :n] = e.type_ids
        if tti is not None:
            return ids, mask, tti
        return ids, mask
