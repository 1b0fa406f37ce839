"""Token arrays: the pre-tokenized, right-padded form every dataset takes before an edge feeds its ONNX bottom.

Also the causal-LM label convention (IGNORE_INDEX where no loss is taken), shared by text encoding, the
synthetic tasks and the server's loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # transformers' CrossEntropyLoss ignore_index for causal-LM labels


@dataclass(frozen=True)
class TokenDataset:
    """Pre-tokenized, right-padded data: what an edge feeds its ONNX bottom.

    Classification: one label per row. Causal LM: one label per token (IGNORE_INDEX where no loss is taken:
    padding, prompts), not shifted, so labels travel and are trimmed together with the ids.
    """

    name: str
    input_ids: np.ndarray  # int64 [n, s]
    attention_mask: np.ndarray  # int64 [n, s]
    labels: np.ndarray  # int64 [n] (classification) or [n, s] (causal LM)
    num_labels: int  # classes, or the vocabulary size for causal LM

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def per_token(self) -> bool:
        """Causal-LM data: labels per token, so no class label to partition by."""
        return self.labels.ndim == 2

    def batch(
        self, indices: Sequence[int] | np.ndarray, trim: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, labels) for `indices`; `trim` drops all-padding columns (of per-token
        labels too), which gives exactly the ids a tokenizer with padding="longest" would give for these rows."""
        idx = np.asarray(indices, dtype=np.int64)
        ids, mask, labels = self.input_ids[idx], self.attention_mask[idx], self.labels[idx]
        if trim and len(idx):
            width = max(int(mask.sum(axis=1).max()), 1)
            ids, mask = ids[:, :width], mask[:, :width]
            if self.per_token:
                labels = labels[:, :width]
        return ids, mask, labels


def causal_lm_labels(
    input_ids: np.ndarray, attention_mask: np.ndarray, prompt_lengths: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """labels = input_ids with IGNORE_INDEX on padding (and on the first prompt_lengths[i] tokens).

    Not shifted: like transformers' `labels=`, the server shifts logits/labels by one.
    """
    labels = np.where(np.asarray(attention_mask) > 0, input_ids, IGNORE_INDEX).astype(np.int64)
    if prompt_lengths is not None:
        pl = np.asarray(prompt_lengths, dtype=np.int64)[:, None]
        labels[np.arange(labels.shape[1])[None, :] < pl] = IGNORE_INDEX
    return labels
