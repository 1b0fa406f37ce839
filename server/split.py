"""Split a Hugging Face model with LoRA into an edge bottom and a server top at any block boundary.

peft is applied ONCE to the whole unsplit model, and the edge/server parts hold references to the same
modules, so LoRA tensor names are exactly those of the unsplit PeftModel (the project-wide naming
convention) and centralized training on `peft_model` is the exact reference for split training.
We own the loop over blocks and build the 4-D additive attention masks ourselves, because
transformers' internal mask helpers change between versions.

A BERT server top computes only the valid tokens of a padded batch (`ServerPart.unpads`): every module of a
block but the attention scores works token by token, so the linears, GELU and LayerNorms run on the
[valid tokens, hidden] rows alone and only the scores see the padded layout. Padding never reaches a valid
token (its keys are masked) nor the loss (the head reads [CLS]), so the logits, grad_h (exactly 0 on padding)
and adapter gradients are those of the padded forward; on SST-2, where 39 % of a batch of 16 is real text,
it is benchmarks/server_unpadded.py's speed-up.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict
from torch import nn

from splitwave.common.lora import is_factor_param, saved_key
from splitwave.server.models import family_of

log = logging.getLogger(__name__)

DEFAULT_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@dataclass
class LoraSpec:
    """LoRA hyper-parameters shared by edge and server (targets None = family default)."""

    r: int = 8
    alpha: float = 16.0
    targets: list[str] | None = None
    dropout: float = 0.0
    rslora: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# family adapters: where the embeddings / blocks / head live, and how a block is called


def _base(model: nn.Module, family: str) -> nn.Module:
    return {"bert": lambda m: m.bert, "gpt2": lambda m: m.transformer, "llama": lambda m: m.model}[family](model)


def _blocks(base: nn.Module, family: str) -> nn.ModuleList:
    return {"bert": lambda b: b.encoder.layer, "gpt2": lambda b: b.h, "llama": lambda b: b.layers}[family](base)


def additive_mask(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """[B,1,S,S] additive mask (0 = attend, finfo.min = masked), as HF's eager attention expects."""
    keep = attention_mask[:, None, None, :].bool()
    if causal:
        s = attention_mask.shape[-1]
        idx = torch.arange(s, device=attention_mask.device)
        keep = keep & (idx[None, :] <= idx[:, None])[None, None]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, neg)


class _Trunk(nn.Module):
    """Blocks [start, stop) of one family, with the shared mask/position logic."""

    def __init__(self, family: str, base: nn.Module, start: int, stop: int):
        super().__init__()
        self.family = family
        self.blocks = nn.ModuleList(list(_blocks(base, family))[start:stop])
        self.rotary = base.rotary_emb if family == "llama" else None

    def run(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = additive_mask(attention_mask, causal=self.family != "bert", dtype=h.dtype)
        if self.family == "bert":
            for blk in self.blocks:
                h = blk(h, mask)
        elif self.family == "gpt2":
            for blk in self.blocks:
                h = blk(h, attention_mask=mask)
        else:
            pos = torch.arange(h.shape[1], device=h.device)[None, :]
            pe = self.rotary(h, pos)
            for blk in self.blocks:
                h = blk(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        return h


def _bert_valid_tokens(blocks: nn.ModuleList, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """BERT blocks over the valid tokens of h [B, S, H] (keep: [B, S] bool); returns their outputs [T, H] in
    row-major order of keep. Each block is HF's BertLayer, called module by module."""
    b, s, hidden = h.shape
    idx = keep.reshape(-1).nonzero().squeeze(1)
    x = h.reshape(b * s, hidden).index_select(0, idx)
    mask = additive_mask(keep, causal=False, dtype=h.dtype)
    nh, d = blocks[0].attention.self.num_attention_heads, blocks[0].attention.self.attention_head_size

    def heads(t: torch.Tensor) -> torch.Tensor:  # [T, nh*d] -> [B, nh, S, d], zeros on padding
        return t.new_zeros(b * s, nh * d).index_copy(0, idx, t).view(b, s, nh, d).transpose(1, 2)

    for blk in blocks:
        att = blk.attention.self
        q, k, v = heads(att.query(x)), heads(att.key(x)), heads(att.value(x))
        w = att.dropout(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * att.scaling + mask, dim=-1))
        ctx = torch.matmul(w, v).transpose(1, 2).reshape(b * s, nh * d).index_select(0, idx)
        a = blk.attention.output(ctx, x)
        x = blk.output(blk.intermediate(a), a)
    return x


class EdgePart(nn.Module):
    """Embeddings + blocks [0, cut): forward(input_ids, attention_mask) -> h."""

    def __init__(self, family: str, base: nn.Module, cut: int):
        super().__init__()
        self.family = family
        if family == "bert":
            self.embeddings = base.embeddings
        elif family == "gpt2":
            self.wte, self.wpe, self.drop = base.wte, base.wpe, base.drop
        else:
            self.embed_tokens = base.embed_tokens
        self.trunk = _Trunk(family, base, 0, cut)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "bert":
            h = self.embeddings(input_ids=input_ids)
        elif self.family == "gpt2":
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            h = self.drop(self.wte(input_ids) + self.wpe(pos))
        else:
            h = self.embed_tokens(input_ids)
        return self.trunk.run(h, attention_mask)


class ServerPart(nn.Module):
    """Blocks [cut, n) + final norm + head: forward(h, attention_mask) -> logits."""

    def __init__(self, family: str, model: nn.Module, base: nn.Module, cut: int, n: int, task: str):
        super().__init__()
        self.family, self.task = family, task
        self.trunk = _Trunk(family, base, cut, n)
        if family == "bert":
            self.pooler, self.dropout, self.head = base.pooler, model.dropout, model.classifier
        else:
            self.norm = base.ln_f if family == "gpt2" else base.norm
            if task == "causal-lm":
                self.head = model.lm_head
            else:
                self.head = model.score

    def unpads(self, attention_mask) -> bool:
        """Whether forward computes only the valid tokens (module docstring): a BERT top, a batch with padding,
        every row's [CLS] (position 0, what the pooler reads) valid."""
        return self._unpads(attention_mask != 0)

    def _unpads(self, keep) -> bool:
        return self.family == "bert" and bool(keep[:, 0].all()) and not bool(keep.all())

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask != 0
        if self._unpads(keep):
            x = _bert_valid_tokens(self.trunk.blocks, h, keep)
            starts = torch.cumsum(keep.sum(1), 0) - keep.sum(1)  # each row's [CLS] among the valid tokens
            return self.head(self.dropout(self.pooler(x.index_select(0, starts)[:, None, :])))
        return self.forward_padded(h, attention_mask)

    def forward_padded(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every position of the padded batch through the blocks (what forward does when it does not unpad)."""
        h = self.trunk.run(h, attention_mask)
        if self.family == "bert":
            return self.head(self.dropout(self.pooler(h)))
        h = self.norm(h)
        if self.task == "causal-lm":
            return self.head(h)
        # last non-pad token from the mask (HF uses input_ids != pad id: equal for right padding)
        idx = torch.arange(attention_mask.shape[1], device=h.device)
        last = (idx[None, :] * attention_mask.to(idx.dtype)).argmax(-1)
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return self.head(pooled)


@dataclass
class SplitModel:
    """An unsplit PeftModel plus edge/server views sharing its modules."""

    peft_model: nn.Module
    edge: EdgePart
    server: ServerPart
    family: str
    task: str
    cut: int
    n_blocks: int
    lora: LoraSpec
    _edge_params: dict = field(default_factory=dict, repr=False)  # saved key -> Parameter
    _server_params: dict = field(default_factory=dict, repr=False)
    _edge_local: dict = field(default_factory=dict, repr=False)  # saved key -> edge-module param name

    def edge_factor_names(self) -> list[str]:
        return list(self._edge_params)

    def server_factor_names(self) -> list[str]:
        return list(self._server_params)

    def edge_param_name(self, key: str) -> str:
        """Name of the factor `key` inside `self.edge` (for torch.func.functional_call)."""
        return self._edge_local[key]

    def edge_factor_params(self) -> dict[str, nn.Parameter]:
        return dict(self._edge_params)

    def server_factor_params(self) -> dict[str, nn.Parameter]:
        return dict(self._server_params)

    def edge_factors(self) -> dict[str, np.ndarray]:
        return {k: p.detach().cpu().numpy().astype(np.float32, copy=True) for k, p in self._edge_params.items()}

    def server_factors(self) -> dict[str, np.ndarray]:
        return {k: p.detach().cpu().numpy().astype(np.float32, copy=True) for k, p in self._server_params.items()}

    def _set(self, params: dict, values: dict) -> None:
        unknown = set(values) - set(params)
        if unknown:
            raise KeyError(f"unknown factor names: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for k, v in values.items():
                t = torch.as_tensor(np.asarray(v), dtype=params[k].dtype)
                if tuple(t.shape) != tuple(params[k].shape):
                    raise ValueError(f"{k}: shape {tuple(t.shape)} != {tuple(params[k].shape)}")
                params[k].copy_(t)

    def set_edge_factors(self, values: dict) -> None:
        self._set(self._edge_params, values)

    def set_server_factors(self, values: dict) -> None:
        self._set(self._server_params, values)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Edge then server: equals peft_model(input_ids, attention_mask).logits."""
        return self.server(self.edge(input_ids, attention_mask), attention_mask)

    __call__ = forward

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, task: str | None = None) -> torch.Tensor:
        return split_loss(logits, labels, task or self.task)


def split_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross entropy; causal LM is shifted by one with -100 ignored (as HF computes it)."""
    if task == "seq-cls":
        return F.cross_entropy(logits.float(), labels)
    if task == "causal-lm":
        lg = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(lg, labels[:, 1:].reshape(-1), ignore_index=-100)
    raise ValueError(f"unknown task {task!r}")


def split_model(
    model: nn.Module, cut: int, lora: LoraSpec, task: str = "seq-cls", adapter: str = "default"
) -> SplitModel:
    """Apply LoRA to the whole model once, then expose edge (blocks < cut) and server (blocks >= cut) views."""
    family = family_of(model.config)
    n = len(_blocks(_base(model, family), family))
    if not isinstance(cut, int) or not 1 <= cut < n:
        raise ValueError(f"cut must be an int with 1 <= cut < {n} (number of blocks) for this model, got {cut!r}")
    if task == "causal-lm" and family == "bert":
        raise ValueError("bert supports task 'seq-cls' only")
    targets = list(lora.targets) if lora.targets else list(DEFAULT_TARGETS[family])
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=targets,
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        task_type=TaskType.SEQ_CLS if task == "seq-cls" else TaskType.CAUSAL_LM,
        fan_in_fan_out=family == "gpt2",
    )
    peft_model = get_peft_model(model, cfg, adapter_name=adapter)
    peft_model.eval()
    inner = peft_model.base_model.model
    base = _base(inner, family)
    edge = EdgePart(family, base, cut)
    server = ServerPart(family, inner, base, cut, n, task)

    saved_keys = set(get_peft_model_state_dict(peft_model, adapter_name=adapter))
    by_id = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad and is_factor_param(name):
            key = saved_key(name, adapter)
            if key not in saved_keys:
                raise RuntimeError(f"LoRA parameter {name} -> {key} not among peft's saved keys")
            by_id[id(p)] = (key, p)
    edge_params, edge_local = {}, {}
    for local, p in edge.named_parameters():
        if id(p) in by_id:
            key, _ = by_id[id(p)]
            edge_params[key], edge_local[key] = p, local
    server_params = {key: p for key, p in by_id.values() if key not in edge_params}
    if not edge_params:
        raise ValueError(f"no LoRA target {targets} found below cut {cut}")
    log.debug(
        "split %s at %d/%d: %d edge factors, %d server factors", family, cut, n, len(edge_params), len(server_params)
    )
    return SplitModel(peft_model, edge, server, family, task, cut, n, lora, edge_params, server_params, edge_local)
