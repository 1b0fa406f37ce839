"""A client's training data, rebuilt from a small data spec so that no sample ever crosses the network.

The server sends a spec (dataset, split, sample limit, seed, sequence length) and the explicit indices of the
client's shard; the edge loads the data from its own disk and tokenizes it with the bundle's tokenizer. The
server and a centralized reference build the very same arrays with the same call, which is what makes split
training comparable to centralized training batch for batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from splitwave.common.batching import Batcher
from splitwave.common.datasets import PromptDataset, data_file, load_dataset
from splitwave.common.encoding import tokenize_dataset, tokenize_prompts
from splitwave.common.partition import partition_dirichlet, partition_iid
from splitwave.common.paths import find_data_file
from splitwave.common.synthetic import synthetic_causal_lm, synthetic_classification
from splitwave.common.tokens import TokenDataset

SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003


def check_data(spec: Mapping[str, Any], data_dir: str | Path | None = None) -> list[Path]:
    """The local files `spec` needs (none for synthetic data); DataNotFound names the missing one and every
    folder searched. Cheap, so an edge checks it right after Join, before a long bundle download."""
    if spec["dataset"] == "synthetic":
        return []
    return [find_data_file(data_file(spec["dataset"], spec.get("split", "train")), data_dir)]


def build_token_dataset(
    spec: Mapping[str, Any], tokenizer_dir: str | Path | None = None, data_dir: str | Path | None = None
) -> TokenDataset:
    """Token arrays for `spec`: {dataset, split, limit, seed, max_seq_len, task?, vocab_size?, num_labels?}.

    task "causal-lm" gives per-token labels: text data (e2e) as prompt/target rows with the loss on the
    target, `synthetic` as a learnable next-token task; otherwise one class label per row.
    """
    name = spec["dataset"]
    split = spec.get("split", "train")
    limit = spec.get("limit")
    seed = int(spec.get("seed", 0))
    max_len = int(spec["max_seq_len"])
    causal = spec.get("task", "seq-cls") == "causal-lm"
    if name == "synthetic":
        n = int(limit or 2000)
        data_seed = seed if split == "train" else seed + SYNTHETIC_EVAL_SEED_OFFSET
        if causal:  # the successor rule is seeded by the run's seed alone: train and eval share it
            return synthetic_causal_lm(n, max_len, int(spec["vocab_size"]), seed=data_seed, rule_seed=seed)
        return synthetic_classification(
            n, max_len, int(spec["vocab_size"]), int(spec.get("num_labels", 2)), seed=data_seed
        )
    if tokenizer_dir is None:
        raise ValueError(f"dataset {name!r} needs a tokenizer; the bundle has none (export with tokenizer files)")
    # lazy: `tokenizers` is an optional dependency (the [edge] extra) that only text datasets need; synthetic
    # data is built without it
    from splitwave.common.tokenizer import Tokenizer

    rows = load_dataset(name, split, limit=limit, seed=seed, data_dir=data_dir)
    is_prompts = isinstance(rows, PromptDataset)
    if is_prompts != causal:
        raise ValueError(
            f"dataset {name!r} is {'causal-LM' if is_prompts else 'classification'} data, but the "
            f"task is {spec.get('task', 'seq-cls')!r}"
        )
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if isinstance(rows, PromptDataset):
        return tokenize_prompts(rows, tokenizer, max_len)
    return tokenize_dataset(rows, tokenizer, max_len)


def partition(
    data: TokenDataset, num_clients: int, scheme: str, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Client shards as index arrays: IID, or Dirichlet(alpha) over the class labels (classification only)."""
    if scheme == "iid":
        return partition_iid(len(data), num_clients, seed)
    if scheme == "dirichlet":
        if data.per_token:
            raise ValueError("data.partition 'dirichlet' skews class labels; causal-LM data has none: use 'iid'")
        return partition_dirichlet(data.labels, num_clients, alpha, seed, min_size=min_size)
    raise ValueError(f"unknown partition {scheme!r}; use 'iid' or 'dirichlet'")


def round_batch(
    data: TokenDataset, batcher: Batcher, local_steps: int, round_idx: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch `step` of round `round_idx`: a pure function of (seed, shard, round, step), so a restarted edge,
    a centralized reference and the edge itself all train on exactly the same rows."""
    g = round_idx * local_steps + step
    n = len(batcher)
    return data.batch(batcher.epoch(g // n)[g % n])
