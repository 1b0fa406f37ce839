"""Analytic FLOP counts of a split step: the edge part (embeddings + blocks below the cut, with LoRA) and the
server part (blocks above the cut + head + loss + AdamW), from the model's config.

Counted: 2 FLOP per multiply-add of every linear layer and of the attention products (QK^T, PV), the LoRA
products (x A^T then B), and a few FLOP per element for norms, softmax, activations and residuals. Backward
with frozen base weights needs only the input gradient of each linear layer (as much as its forward), twice
the attention products (gradients to both operands), and for LoRA the input gradient plus both factor
gradients.

Arithmetic alone makes small models look far faster than they run: with hidden size 32 most of a step is
the fixed cost of launching each operator. So the model also counts operators (the ONNX graphs' nodes for the
edge, the aten ops of the torch server's step, numpy calls for AdamW and aggregation), and splitwave.sim.costs
charges each a per-operator time calibrated on the host. What is still left out (memory
traffic, cache effects) is what splitwave.sim.costs' `measured` model captures.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from splitwave.common.config import ExperimentConfig
from splitwave.common.manifest import BundleManifest
from splitwave.server.models import TINY_VOCAB, tiny_config
from splitwave.server.pretrained import PRETRAINED
from splitwave.server.split import DEFAULT_TARGETS

ELEMENTWISE_PER_BLOCK = 30  # FLOP per token x hidden element for 2 norms, residuals, biases, scaling
ADAMW_FLOP_PER_PARAM = 14  # moments, bias corrections, sqrt, divide, decay, update
NUMPY_OPS_PER_ARRAY = 14  # numpy calls of edge.optim.AdamW per factor array
NUMPY_AGG_OPS_PER_ARRAY = 30  # per client and factor array: validation (finite, bound), clipping norm, weight, sum


@dataclass(frozen=True)
class ModelShape:
    family: str
    task: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    num_labels: int
    cut: int
    lora_r: int
    lora_targets: tuple[str, ...]

    @classmethod
    def from_hf(
        cls, hf: PretrainedConfig, task: str, cut: int, r: int, targets: list[str] | None, num_labels: int = 2
    ) -> ModelShape:
        family = {"bert": "bert", "gpt2": "gpt2", "llama": "llama"}[hf.model_type]
        hidden = hf.hidden_size if family != "gpt2" else hf.n_embd
        inter = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * hidden
        layers = hf.num_hidden_layers if family != "gpt2" else hf.n_layer
        heads = hf.num_attention_heads if family != "gpt2" else hf.n_head
        kv = getattr(hf, "num_key_value_heads", None) or heads
        return cls(
            family,
            task,
            int(hidden),
            int(inter),
            int(layers),
            int(heads),
            int(kv),
            int(hf.vocab_size),
            int(num_labels),
            int(cut),
            int(r),
            tuple(targets or DEFAULT_TARGETS[family]),
        )

    def linears(self) -> list[tuple[str, int, int]]:
        """(module name inside a block, d_in, d_out) of every linear layer of one block."""
        h, i, kv = self.hidden, self.inter, self.hidden * self.kv_heads // self.heads
        if self.family == "bert":
            return [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", h, i),
                ("output.dense", i, h),
            ]
        if self.family == "gpt2":
            return [("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, i), ("mlp.c_proj", i, h)]
        return [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", h, kv),
            ("self_attn.v_proj", h, kv),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", h, i),
            ("mlp.up_proj", h, i),
            ("mlp.down_proj", i, h),
        ]

    def lora_modules(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of the linear layers of one block that carry LoRA (peft's suffix match of targets)."""
        return [
            (di, do)
            for name, di, do in self.linears()
            if any(name == t or name.endswith("." + t) for t in self.lora_targets)
        ]

    def lora_params_per_block(self) -> int:
        return sum(self.lora_r * (di + do) for di, do in self.lora_modules())


def model_shape(cfg: ExperimentConfig, manifest: BundleManifest | None = None) -> ModelShape:
    """The shape of cfg's model; LoRA targets from the bundle's manifest when given (the resolved list)."""
    m = cfg.model
    if m.tiny:
        source = manifest.source if manifest is not None else None
        vocab = (source.vocab_size if source is not None else None) or m.vocab_size or TINY_VOCAB
        hf = tiny_config(m.family, m.task, m.num_labels, vocab, m.init_std)
    else:
        hf = AutoConfig.from_pretrained(PRETRAINED[m.family]())  # minilm, smollm2 (server/pretrained.py)
    targets = (manifest.lora.targets if manifest is not None else None) or cfg.lora.targets
    return ModelShape.from_hf(hf, m.task, m.cut, cfg.lora.r, targets, m.num_labels)


def block_forward(s: ModelShape, b: int, t: int, valid: float | None = None) -> float:
    """One block's forward on b sequences of t tokens; `valid`: the tokens computed, for a block that runs
    its token-wise work on the valid tokens only (the attention scores stay b x t x t)."""
    tokens = b * t if valid is None else min(valid, b * t)
    lin = sum(2.0 * tokens * di * do for _, di, do in s.linears())
    attn = 4.0 * b * t * t * s.hidden  # QK^T and PV over all heads
    softmax = 5.0 * b * s.heads * t * t
    act = 8.0 * tokens * s.inter
    elem = ELEMENTWISE_PER_BLOCK * tokens * s.hidden
    lora = sum(2.0 * tokens * s.lora_r * (di + do) + tokens * do for di, do in s.lora_modules())
    return lin + attn + softmax + act + elem + lora


def block_backward(s: ModelShape, b: int, t: int, valid: float | None = None) -> float:
    """One block's backward to its input and its LoRA factors (base weights frozen); `valid` as forward's."""
    tokens = b * t if valid is None else min(valid, b * t)
    lin = sum(2.0 * tokens * di * do for _, di, do in s.linears())  # input gradients only
    attn = 8.0 * b * t * t * s.hidden
    softmax = 8.0 * b * s.heads * t * t
    act = 10.0 * tokens * s.inter
    elem = 2 * ELEMENTWISE_PER_BLOCK * tokens * s.hidden
    lora = sum(3 * 2.0 * tokens * s.lora_r * (di + do) for di, do in s.lora_modules())
    return lin + attn + softmax + act + elem + lora


def embeddings(s: ModelShape, b: int, t: int) -> float:
    return 10.0 * b * t * s.hidden  # lookups are memory, the sums and the (BERT) LayerNorm are FLOPs


def head_forward(s: ModelShape, b: int, t: int) -> float:
    """Final norm / pooler, classifier or LM head, and the loss."""
    h = s.hidden
    if s.task == "causal-lm":
        return 2.0 * b * t * h * s.vocab + 5.0 * b * t * s.vocab + 10.0 * b * t * h
    if s.family == "bert":  # pooler (dense + tanh on the first token) + classifier
        return 2.0 * b * h * h + 2.0 * b * h * s.num_labels + 10.0 * b * h
    return 2.0 * b * t * h * s.num_labels + 10.0 * b * t * h  # the score layer runs on every token


def head_backward(s: ModelShape, b: int, t: int) -> float:
    return 2.0 * head_forward(s, b, t)  # input and weight gradients (the head is trained)


def edge_forward(s: ModelShape, b: int, t: int) -> float:
    return embeddings(s, b, t) + s.cut * block_forward(s, b, t)


def edge_backward(s: ModelShape, b: int, t: int, recompute: bool = True) -> float:
    """The edge VJP: in recompute mode it runs the forward again first."""
    return (edge_forward(s, b, t) if recompute else 0.0) + s.cut * block_backward(s, b, t)


def edge_params(s: ModelShape) -> int:
    return s.cut * s.lora_params_per_block()


def server_params(s: ModelShape) -> int:
    head = s.hidden * s.num_labels + (s.hidden * s.hidden if s.family == "bert" else 0) if s.task == "seq-cls" else 0
    return (s.layers - s.cut) * s.lora_params_per_block() + head


def edge_optimizer(s: ModelShape) -> float:
    return ADAMW_FLOP_PER_PARAM * edge_params(s)


def server_step(s: ModelShape, b: int, t: int, valid: float | None = None) -> float:
    """Forward, loss, backward down to grad_h, and the AdamW step of the top adapter (`valid`: the tokens a
    top that skips padding computes)."""
    top = s.layers - s.cut
    fwd = top * block_forward(s, b, t, valid) + head_forward(s, b, t)
    bwd = top * block_backward(s, b, t, valid) + head_backward(s, b, t)
    return fwd + bwd + ADAMW_FLOP_PER_PARAM * server_params(s)


def full_forward(s: ModelShape, b: int, t: int) -> float:
    """The whole model's forward (the server's evaluation of the global model)."""
    return embeddings(s, b, t) + s.layers * block_forward(s, b, t) + head_forward(s, b, t)


def aggregate(s: ModelShape, num_clients: int) -> float:
    """Aggregating num_clients edge adapters: a few FLOP per factor entry (validation, clipping norm, weighted
    mean) plus, per client and module, the dense product B @ A the strategies compare the rule against."""
    per_client = sum(6.0 * s.lora_r * (di + do) + 2.0 * s.lora_r * di * do for di, do in s.lora_modules())
    return num_clients * s.cut * per_client


# ---------------------------------------------------------------------------------------------- operators
def lora_tensors_per_block(s: ModelShape) -> int:
    return 2 * len(s.lora_modules())


def edge_optimizer_ops(s: ModelShape) -> float:
    return NUMPY_OPS_PER_ARRAY * s.cut * lora_tensors_per_block(s)


def aggregate_ops(s: ModelShape, num_clients: int) -> float:
    return NUMPY_AGG_OPS_PER_ARRAY * num_clients * s.cut * lora_tensors_per_block(s)
