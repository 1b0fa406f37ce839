from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("session_token", "run_id", "round", "step")
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_token: str
    run_id: str
    round: int
    step: int
    def __init__(self, session_token: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class TensorFrame(_message.Message):
    __slots__ = ("name", "dtype", "shape", "codec", "frame_index", "frame_count", "payload", "scales", "indices", "topk_k")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    TOPK_K_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    frame_index: int
    frame_count: int
    payload: bytes
    scales: bytes
    indices: bytes
    topk_k: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., frame_index: _Optional[int] = ..., frame_count: _Optional[int] = ..., payload: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., indices: _Optional[bytes] = ..., topk_k: _Optional[int] = ...) -> None: ...

class CodecSpec(_message.Message):
    __slots__ = ("codec", "topk_fraction", "topk_k")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TOPK_K_FIELD_NUMBER: _ClassVar[int]
    codec: str
    topk_fraction: float
    topk_k: int
    def __init__(self, codec: _Optional[str] = ..., topk_fraction: _Optional[float] = ..., topk_k: _Optional[int] = ...) -> None: ...

class StepEnd(_message.Message):
    __slots__ = ("batch_size", "metrics", "codec_down")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CODEC_DOWN_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    metrics: _containers.ScalarMap[str, float]
    codec_down: str
    def __init__(self, batch_size: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., codec_down: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("loss", "correct", "count", "metrics", "stop_local_work")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STOP_LOCAL_WORK_FIELD_NUMBER: _ClassVar[int]
    loss: float
    correct: int
    count: int
    metrics: _containers.ScalarMap[str, float]
    stop_local_work: bool
    def __init__(self, loss: _Optional[float] = ..., correct: _Optional[int] = ..., count: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., stop_local_work: _Optional[bool] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("protocol_version", "backend", "codecs", "max_lora_rank", "training_modes", "cached_bundle_hashes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    TRAINING_MODES_FIELD_NUMBER: _ClassVar[int]
    CACHED_BUNDLE_HASHES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    backend: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    max_lora_rank: int
    training_modes: _containers.RepeatedScalarFieldContainer[str]
    cached_bundle_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., backend: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., max_lora_rank: _Optional[int] = ..., training_modes: _Optional[_Iterable[str]] = ..., cached_bundle_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class DataInfo(_message.Message):
    __slots__ = ("num_samples",)
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    num_samples: int
    def __init__(self, num_samples: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_name", "enrollment_secret", "capabilities", "data", "resume_secret")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RESUME_SECRET_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    enrollment_secret: str
    capabilities: Capabilities
    data: DataInfo
    resume_secret: str
    def __init__(self, client_name: _Optional[str] = ..., enrollment_secret: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., data: _Optional[_Union[DataInfo, _Mapping]] = ..., resume_secret: _Optional[str] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    max_grad_norm: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ...) -> None: ...

class DataShard(_message.Message):
    __slots__ = ("dataset", "split", "shard_index", "num_shards", "partition", "dirichlet_alpha", "seed", "indices", "num_samples", "spec_json")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    DIRICHLET_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    split: str
    shard_index: int
    num_shards: int
    partition: str
    dirichlet_alpha: float
    seed: int
    indices: _containers.RepeatedScalarFieldContainer[int]
    num_samples: int
    spec_json: str
    def __init__(self, dataset: _Optional[str] = ..., split: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., partition: _Optional[str] = ..., dirichlet_alpha: _Optional[float] = ..., seed: _Optional[int] = ..., indices: _Optional[_Iterable[int]] = ..., num_samples: _Optional[int] = ..., spec_json: _Optional[str] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("learning_mode", "codec_up", "codec_down", "batch_size", "local_steps", "optimizer", "seed", "max_seq_len", "shard", "training_mode", "lora_rank", "num_rounds", "packed_steps", "codec_adapter_up", "codec_adapter_down", "error_feedback", "codec_policy")
    LEARNING_MODE_FIELD_NUMBER: _ClassVar[int]
    CODEC_UP_FIELD_NUMBER: _ClassVar[int]
    CODEC_DOWN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TRAINING_MODE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_STEPS_FIELD_NUMBER: _ClassVar[int]
    CODEC_ADAPTER_UP_FIELD_NUMBER: _ClassVar[int]
    CODEC_ADAPTER_DOWN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    CODEC_POLICY_FIELD_NUMBER: _ClassVar[int]
    learning_mode: str
    codec_up: CodecSpec
    codec_down: CodecSpec
    batch_size: int
    local_steps: int
    optimizer: OptimizerConfig
    seed: int
    max_seq_len: int
    shard: DataShard
    training_mode: str
    lora_rank: int
    num_rounds: int
    packed_steps: bool
    codec_adapter_up: CodecSpec
    codec_adapter_down: CodecSpec
    error_feedback: _containers.RepeatedScalarFieldContainer[str]
    codec_policy: CodecPolicy
    def __init__(self, learning_mode: _Optional[str] = ..., codec_up: _Optional[_Union[CodecSpec, _Mapping]] = ..., codec_down: _Optional[_Union[CodecSpec, _Mapping]] = ..., batch_size: _Optional[int] = ..., local_steps: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., seed: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., shard: _Optional[_Union[DataShard, _Mapping]] = ..., training_mode: _Optional[str] = ..., lora_rank: _Optional[int] = ..., num_rounds: _Optional[int] = ..., packed_steps: _Optional[bool] = ..., codec_adapter_up: _Optional[_Union[CodecSpec, _Mapping]] = ..., codec_adapter_down: _Optional[_Union[CodecSpec, _Mapping]] = ..., error_feedback: _Optional[_Iterable[str]] = ..., codec_policy: _Optional[_Union[CodecPolicy, _Mapping]] = ...) -> None: ...

class CodecPolicy(_message.Message):
    __slots__ = ("kind", "ladder", "budget_s", "directions")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LADDER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    ladder: _containers.RepeatedScalarFieldContainer[str]
    budget_s: float
    directions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., ladder: _Optional[_Iterable[str]] = ..., budget_s: _Optional[float] = ..., directions: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "session_token", "run_id", "config", "manifest_json", "bundle_hash", "current_round", "resume_secret", "limits")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESUME_SECRET_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    run_id: str
    config: RunConfig
    manifest_json: str
    bundle_hash: str
    current_round: int
    resume_secret: str
    limits: Limits
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., run_id: _Optional[str] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., manifest_json: _Optional[str] = ..., bundle_hash: _Optional[str] = ..., current_round: _Optional[int] = ..., resume_secret: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_frame_bytes", "min_frame_bytes", "max_tensor_bytes", "max_message_bytes", "max_metrics_entries", "max_abs_value")
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_METRICS_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_VALUE_FIELD_NUMBER: _ClassVar[int]
    max_frame_bytes: int
    min_frame_bytes: int
    max_tensor_bytes: int
    max_message_bytes: int
    max_metrics_entries: int
    max_abs_value: float
    def __init__(self, max_frame_bytes: _Optional[int] = ..., min_frame_bytes: _Optional[int] = ..., max_tensor_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_metrics_entries: _Optional[int] = ..., max_abs_value: _Optional[float] = ...) -> None: ...

class BundleRequest(_message.Message):
    __slots__ = ("header", "bundle_hash", "files", "have_sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    HAVE_SHA256_FIELD_NUMBER: _ClassVar[int]
    header: Header
    bundle_hash: str
    files: _containers.RepeatedScalarFieldContainer[str]
    have_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., bundle_hash: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., have_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("file_name", "offset", "total_size", "sha256", "data", "file_index", "file_count")
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    file_name: str
    offset: int
    total_size: int
    sha256: str
    data: bytes
    file_index: int
    file_count: int
    def __init__(self, file_name: _Optional[str] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ..., file_index: _Optional[int] = ..., file_count: _Optional[int] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("header", "frame", "end_step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    frame: TensorFrame
    end_step: StepEnd
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., frame: _Optional[_Union[TensorFrame, _Mapping]] = ..., end_step: _Optional[_Union[StepEnd, _Mapping]] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("header", "frame", "end_step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    frame: TensorFrame
    end_step: StepResult
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., frame: _Optional[_Union[TensorFrame, _Mapping]] = ..., end_step: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class EvalRequest(_message.Message):
    __slots__ = ("header", "frame", "end_step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    frame: TensorFrame
    end_step: StepEnd
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., frame: _Optional[_Union[TensorFrame, _Mapping]] = ..., end_step: _Optional[_Union[StepEnd, _Mapping]] = ...) -> None: ...

class EvalReply(_message.Message):
    __slots__ = ("header", "frame", "end_step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    frame: TensorFrame
    end_step: StepResult
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., frame: _Optional[_Union[TensorFrame, _Mapping]] = ..., end_step: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class AdapterEnd(_message.Message):
    __slots__ = ("num_samples", "local_steps", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    num_samples: int
    local_steps: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, num_samples: _Optional[int] = ..., local_steps: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AdapterRequest(_message.Message):
    __slots__ = ("header", "frame", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: Header
    frame: TensorFrame
    end: AdapterEnd
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., frame: _Optional[_Union[TensorFrame, _Mapping]] = ..., end: _Optional[_Union[AdapterEnd, _Mapping]] = ...) -> None: ...

class AdapterReply(_message.Message):
    __slots__ = ("header", "accepted", "clients_reported", "clients_expected", "message")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_REPORTED_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    header: Header
    accepted: bool
    clients_reported: int
    clients_expected: int
    message: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., accepted: _Optional[bool] = ..., clients_reported: _Optional[int] = ..., clients_expected: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RoundRequest(_message.Message):
    __slots__ = ("header", "no_wait")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    header: Header
    no_wait: bool
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., no_wait: _Optional[bool] = ...) -> None: ...

class RoundDirectives(_message.Message):
    __slots__ = ("closed_round", "next_round", "trainable_factors", "reinit", "rank", "stop", "stop_reason", "personal", "metrics", "upload_factors")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLOSED_ROUND_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FACTORS_FIELD_NUMBER: _ClassVar[int]
    REINIT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FACTORS_FIELD_NUMBER: _ClassVar[int]
    closed_round: int
    next_round: int
    trainable_factors: _containers.RepeatedScalarFieldContainer[str]
    reinit: bool
    rank: int
    stop: bool
    stop_reason: str
    personal: bool
    metrics: _containers.ScalarMap[str, float]
    upload_factors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, closed_round: _Optional[int] = ..., next_round: _Optional[int] = ..., trainable_factors: _Optional[_Iterable[str]] = ..., reinit: _Optional[bool] = ..., rank: _Optional[int] = ..., stop: _Optional[bool] = ..., stop_reason: _Optional[str] = ..., personal: _Optional[bool] = ..., metrics: _Optional[_Mapping[str, float]] = ..., upload_factors: _Optional[_Iterable[str]] = ...) -> None: ...

class RoundReply(_message.Message):
    __slots__ = ("header", "factor", "base_delta", "directives")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    BASE_DELTA_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVES_FIELD_NUMBER: _ClassVar[int]
    header: Header
    factor: TensorFrame
    base_delta: TensorFrame
    directives: RoundDirectives
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., factor: _Optional[_Union[TensorFrame, _Mapping]] = ..., base_delta: _Optional[_Union[TensorFrame, _Mapping]] = ..., directives: _Optional[_Union[RoundDirectives, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("header", "reason")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    header: Header
    reason: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...
