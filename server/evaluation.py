"""Loss and accuracy of a split model on token data: the trainer's per-step figures, summed over a data set.

One definition for training and evaluation: a batch contributes the (correct, count) of the trainer's
`_accuracy` and its mean loss weighted by that count. Classification: accuracy over rows, mean loss per row.
Causal LM: next-token accuracy over the labelled positions and mean loss per labelled token, so
perplexity = exp(loss) and the figures do not depend on how the rows are batched.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from splitwave.server.trainer import _accuracy

#: floats of logits per evaluation batch (64 MiB): a causal LM's [rows, seq, vocab] logits grow fast
LOGITS_BUDGET = 1 << 24


def batch_rows(split, seq_len: int, max_rows: int) -> int:
    """Rows per evaluation batch: at most max_rows, fewer when per-token logits over the vocabulary are big."""
    if split.task != "causal-lm":
        return max_rows
    vocab = int(split.peft_model.config.vocab_size)
    return max(1, min(max_rows, LOGITS_BUDGET // max(1, seq_len * vocab)))


@torch.no_grad()
def evaluate(split, data, max_rows: int = 64) -> dict[str, float]:
    """{eval_accuracy, eval_loss, eval_count (rows or labelled tokens)[, eval_perplexity for causal LM]}."""
    rows = batch_rows(split, data.input_ids.shape[1], max_rows)
    n = len(data)
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, n, rows):
        ids, mask, labels = data.batch(np.arange(i, min(n, i + rows)))
        logits = split(torch.from_numpy(ids), torch.from_numpy(mask))
        lab = torch.from_numpy(labels)
        c, k = _accuracy(logits, lab, split.task)
        if k:  # a batch with nothing labelled has no loss (cross entropy over nothing is NaN)
            loss_sum += float(split.loss(logits, lab)) * k
        correct += c
        count += k
    loss = loss_sum / max(count, 1)
    out = {"eval_accuracy": correct / max(count, 1), "eval_loss": loss, "eval_count": count}
    if split.task == "causal-lm":
        out["eval_perplexity"] = math.exp(min(loss, 700.0))  # exp overflows a float above ~709
    return out
