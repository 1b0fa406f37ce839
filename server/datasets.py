"""What data a run trains and evaluates on: the spec an edge rebuilds its data from, and the client shards.

Its own module because the server, the in-process references (server/reference.py) and the experiment tools
must cut the same dataset into the same shards: one function each, or split and centralized runs drift apart.
"""

from __future__ import annotations

import numpy as np

from splitwave.common.config import ExperimentConfig
from splitwave.common.shard import partition

EVAL_SPLITS = {"sst2": "dev", "ag_news": "test", "e2e": "valid", "synthetic": "eval"}  # split "eval" of each


def data_spec(cfg: ExperimentConfig, split: str, vocab_size: int) -> dict:
    """What an edge rebuilds its data from (sent as JSON at Join); split: "train" or "eval"."""
    limit = cfg.data.num_train if split == "train" else cfg.data.num_eval
    return {
        "dataset": cfg.data.dataset,
        "split": split if split == "train" else EVAL_SPLITS[cfg.data.dataset],
        "limit": limit,
        "seed": cfg.seed,
        "max_seq_len": cfg.data.max_seq_len,
        "vocab_size": vocab_size,
        "num_labels": cfg.model.num_labels,
        "task": cfg.model.task,
    }


def client_shards(cfg: ExperimentConfig, train) -> list[np.ndarray]:
    """The training set's sample indices of each client (`data.partition`), every shard at least one batch."""
    return partition(
        train,
        cfg.num_clients,
        cfg.data.partition,
        cfg.data.dirichlet_alpha,
        cfg.seed,
        min_size=cfg.training.batch_size,
    )
