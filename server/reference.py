"""In-process references for split training: the numbers split learning over gRPC must reproduce.

`centralized_train`: the unsplit peft model trained by one torch AdamW on the batches client 0 sees (what
`sfl-v2`/`sl` with one client and the raw codec must equal). `federated_train`: the same rounds as `sfl-v1`
(each client a full copy of the LoRA model and its own AdamW, FedAvg of edge and top adapters weighted by
sample counts) computed in one process with torch only.
"""

from __future__ import annotations

import numpy as np
import torch

from splitwave.common.batching import Batcher
from splitwave.common.config import ExperimentConfig
from splitwave.common.shard import build_token_dataset, round_batch
from splitwave.common.tokens import TokenDataset
from splitwave.server.datasets import client_shards, data_spec
from splitwave.server.setup import build_split, tokenizer_source
from splitwave.server.split import SplitModel
from splitwave.server.trainer import trainable_parameters


def train_data(cfg: ExperimentConfig, split: SplitModel) -> tuple[TokenDataset, list[np.ndarray]]:
    """The run's training set and its client shards, as the server cuts them."""
    spec = data_spec(cfg, "train", int(split.peft_model.config.vocab_size))
    data = build_token_dataset(spec, tokenizer_source(cfg))
    return data, client_shards(cfg, data)


def make_optimizer(cfg: ExperimentConfig, params) -> torch.optim.AdamW:
    """The AdamW of `training.optim`, as edges and server build it."""
    o = cfg.training.optim
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)


def unsplit_step(split: SplitModel, opt: torch.optim.Optimizer, batch) -> float:
    """One step of the unsplit peft model on `batch` (ids, mask, labels); returns the loss."""
    ids, mask, labels = (torch.from_numpy(x) for x in batch)
    opt.zero_grad(set_to_none=True)
    logits = split.peft_model(input_ids=ids, attention_mask=mask).logits
    loss = split.loss(logits, labels)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def dev_accuracy(split: SplitModel, dev: TokenDataset, batch_size: int = 128) -> float:
    """Accuracy of the unsplit classifier (peft model) on a tokenized dev set: the centralized reference's
    score, beside which the tables put the split runs' own evaluations."""
    correct = 0
    for i in range(0, len(dev), batch_size):
        ids, mask, labels = dev.batch(np.arange(i, min(len(dev), i + batch_size)))
        logits = split.peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        correct += int((logits.argmax(-1).numpy() == labels).sum())
    return correct / len(dev)


def centralized_train(cfg, client: int = 0, split=None):
    """Returns (split model after training, losses)."""
    split = split or build_split(cfg)
    split.peft_model.eval()
    data, shards = train_data(cfg, split)
    params = trainable_parameters(split.peft_model)
    opt = make_optimizer(cfg, list(params.values()))
    batcher = Batcher(shards[client], cfg.training.batch_size, cfg.seed, client_id=client)
    losses = []
    for r in range(cfg.rounds.num_rounds):
        for s in range(cfg.training.local_steps):
            losses.append(unsplit_step(split, opt, round_batch(data, batcher, cfg.training.local_steps, r, s)))
    return split, losses


def federated_train(cfg) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """sfl-v1 with FedAvg (fedit) of edge and top adapters; returns (edge factors, top factors)."""
    split = build_split(cfg)
    split.peft_model.eval()
    data, shards = train_data(cfg, split)
    params = trainable_parameters(split.peft_model)
    edge_keys = set(split.edge_factor_names())
    glob = {k: p.detach().clone() for k, p in params.items()}
    states = {}
    for r in range(cfg.rounds.num_rounds):
        results = []
        for c in range(cfg.num_clients):
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(glob[k])
            opt = make_optimizer(cfg, list(params.values()))
            if c in states:
                opt.load_state_dict(states[c])
            batcher = Batcher(shards[c], cfg.training.batch_size, cfg.seed, client_id=c)
            for s in range(cfg.training.local_steps):
                unsplit_step(split, opt, round_batch(data, batcher, cfg.training.local_steps, r, s))
            states[c] = opt.state_dict()
            results.append(({k: p.detach().clone().double() for k, p in params.items()}, len(shards[c])))
        total = sum(n for _, n in results)
        glob = {k: sum(f[k] * (n / total) for f, n in results).float() for k in params}
    edge = {k: v.numpy() for k, v in glob.items() if k in edge_keys}
    top = {k: v.numpy() for k, v in glob.items() if k not in edge_keys}
    return edge, top
