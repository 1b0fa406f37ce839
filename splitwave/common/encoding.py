"""Text rows -> token arrays with a model's tokenizer: classification texts, and causal-LM prompt/target rows.

Tokenized once up front (padded to max_len); `TokenDataset.batch` trims each step's batch, which gives the
same ids as tokenizing that batch with padding="longest".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from splitwave.common.datasets import PromptDataset, TextDataset
from splitwave.common.tokens import IGNORE_INDEX, TokenDataset, causal_lm_labels

if TYPE_CHECKING:  # annotations only: this module itself never needs the `tokenizers` package
    from splitwave.common.tokenizer import Tokenizer


def tokenize_dataset(ds: TextDataset, tokenizer: Tokenizer, max_len: int) -> TokenDataset:
    """Tokenize once up front (pad to max_len); batches are trimmed per step by `TokenDataset.batch`."""
    ids, mask = tokenizer.encode_batch(ds.texts, max_len=max_len, pad_to=None)
    return TokenDataset(ds.name, ids, mask, ds.labels.astype(np.int64), ds.num_labels)


def encode_prompt_target(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_len: int,
    pad_to: int | str | None = "longest",
    sep_id: int | None = None,
    add_eos: bool = True,
    train_on_prompt: bool = False,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Causal-LM rows `prompt [sep] " "+target [eos]` -> (input_ids, attention_mask, labels).

    Follows the LoRA paper's E2E encoding (context, bos/eos as separator, completion with a leading
    space, eos). Loss is on the target only unless train_on_prompt. Rows longer than max_len are cut
    at the right. pad_to: None -> max_len, "longest", or an int >= max_len. eos_id: None -> the
    tokenizer's eos.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    eos = tokenizer.eos_id if eos_id is None else eos_id
    if add_eos and eos is None:
        raise ValueError("tokenizer has no eos token; pass add_eos=False or eos_id")
    p_ids = tokenizer.encode_lists(prompts, add_special_tokens=False)
    t_ids = tokenizer.encode_lists([" " + t for t in targets], add_special_tokens=False)
    end = [eos] if add_eos and eos is not None else []  # add_eos without an eos was refused above
    rows, plens = [], []
    for p, t in zip(p_ids, t_ids):
        head = p + ([sep_id] if sep_id is not None else [])
        row = (head + t + end)[:max_len]
        rows.append(row)
        plens.append(min(len(head), len(row)))
    longest = max((len(r) for r in rows), default=0)
    width = max_len if pad_to is None else longest if pad_to == "longest" else int(pad_to)
    if width < longest:
        raise ValueError(f"pad_to={pad_to} < longest row {longest}")
    b = len(rows)
    ids = np.full((b, width), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    labels = causal_lm_labels(ids, mask, None if train_on_prompt else plens)
    return ids, mask, labels


def tokenize_prompts(ds: PromptDataset, tokenizer: Tokenizer, max_len: int) -> TokenDataset:
    """Causal-LM rows `prompt <end> target <end>` with the loss on the target only, padded to max_len.

    <end> is the tokenizer's eos, or its [SEP] for BERT-style vocabularies without one (the MiniLM WordPiece
    tokenizer). Every row must keep at least one target token within max_len: a batch of rows without any
    would have no loss at all (NaN), so that is refused here, on the server, before training starts.
    """
    end = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if end is None:
        raise ValueError("tokenizer has neither an eos nor a sep token to end causal-LM rows with")
    ids, mask, labels = encode_prompt_target(
        tokenizer, ds.prompts, ds.targets, max_len, pad_to=None, sep_id=end, eos_id=end
    )
    empty = int(((labels != IGNORE_INDEX).sum(axis=1) == 0).sum())
    if empty:
        raise ValueError(
            f"max_seq_len {max_len} leaves {empty} of {len(ds)} {ds.name} rows without a target "
            f"token (their prompts fill the row): raise data.max_seq_len"
        )
    return TokenDataset(ds.name, ids, mask, labels, tokenizer.vocab_size)
