from shardgate.proto import config_pb2 as _config_pb2
from shardgate.proto import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_LAST: _ClassVar[Pooling]
POOLING_MEAN: Pooling
POOLING_LAST: Pooling

class AttachRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("session_id", "stopping")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    stopping: bool
    def __init__(self, session_id: _Optional[str] = ..., stopping: _Optional[bool] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model", "max_position_embeddings", "tokenizer_json", "num_kv_blocks", "block_size", "chat_template", "bos_token", "eos_token", "limits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model: _inference_pb2.ModelInfoResponse
    max_position_embeddings: int
    tokenizer_json: str
    num_kv_blocks: int
    block_size: int
    chat_template: str
    bos_token: str
    eos_token: str
    limits: _config_pb2.BatchLimits
    def __init__(self, model: _Optional[_Union[_inference_pb2.ModelInfoResponse, _Mapping]] = ..., max_position_embeddings: _Optional[int] = ..., tokenizer_json: _Optional[str] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., chat_template: _Optional[str] = ..., bos_token: _Optional[str] = ..., eos_token: _Optional[str] = ..., limits: _Optional[_Union[_config_pb2.BatchLimits, _Mapping]] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    logprobs: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class SeqChunk(_message.Message):
    __slots__ = ("seq_id", "token_ids", "start_pos", "new_block_ids", "sample", "output_index", "sampling", "last_sampled_input")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LAST_SAMPLED_INPUT_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start_pos: int
    new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    output_index: int
    sampling: Sampling
    last_sampled_input: bool
    def __init__(self, seq_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., start_pos: _Optional[int] = ..., new_block_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., output_index: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., last_sampled_input: _Optional[bool] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "free_seq_ids", "chunks", "traceparent", "report_timings", "num_steps", "after_step_id")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    FREE_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    AFTER_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    free_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    chunks: _containers.RepeatedCompositeFieldContainer[SeqChunk]
    traceparent: str
    report_timings: bool
    num_steps: int
    after_step_id: int
    def __init__(self, step_id: _Optional[int] = ..., free_seq_ids: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Iterable[_Union[SeqChunk, _Mapping]]] = ..., traceparent: _Optional[str] = ..., report_timings: _Optional[bool] = ..., num_steps: _Optional[int] = ..., after_step_id: _Optional[int] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprob")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_id: int
    logprob: float
    def __init__(self, seq_id: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("tokens", "rank_timings")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RANK_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    rank_timings: _containers.RepeatedCompositeFieldContainer[RankTiming]
    def __init__(self, tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., rank_timings: _Optional[_Iterable[_Union[RankTiming, _Mapping]]] = ...) -> None: ...

class RankTiming(_message.Message):
    __slots__ = ("rank", "forward_s", "all_reduce_s", "all_gather_s", "pp_send_s", "pp_recv_s", "weights_bytes", "kv_cache_bytes", "activation_peak_bytes", "device_memory_free_bytes", "device_memory_total_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    ALL_REDUCE_S_FIELD_NUMBER: _ClassVar[int]
    ALL_GATHER_S_FIELD_NUMBER: _ClassVar[int]
    PP_SEND_S_FIELD_NUMBER: _ClassVar[int]
    PP_RECV_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    forward_s: float
    all_reduce_s: float
    all_gather_s: float
    pp_send_s: float
    pp_recv_s: float
    weights_bytes: int
    kv_cache_bytes: int
    activation_peak_bytes: int
    device_memory_free_bytes: int
    device_memory_total_bytes: int
    def __init__(self, rank: _Optional[int] = ..., forward_s: _Optional[float] = ..., all_reduce_s: _Optional[float] = ..., all_gather_s: _Optional[float] = ..., pp_send_s: _Optional[float] = ..., pp_recv_s: _Optional[float] = ..., weights_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., activation_peak_bytes: _Optional[int] = ..., device_memory_free_bytes: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ...) -> None: ...

class EmbedInput(_message.Message):
    __slots__ = ("token_ids", "block_ids", "pooling", "normalize")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    pooling: Pooling
    normalize: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., block_ids: _Optional[_Iterable[int]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class EmbedStepRequest(_message.Message):
    __slots__ = ("step_id", "inputs")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    inputs: _containers.RepeatedCompositeFieldContainer[EmbedInput]
    def __init__(self, step_id: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[EmbedInput, _Mapping]]] = ...) -> None: ...

class EmbedStepResponse(_message.Message):
    __slots__ = ("vectors", "hidden_size")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    vectors: bytes
    hidden_size: int
    def __init__(self, vectors: _Optional[bytes] = ..., hidden_size: _Optional[int] = ...) -> None: ...

class ForgetSequences(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("ranks",)
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ranks: int
    def __init__(self, ranks: _Optional[int] = ...) -> None: ...

class RankCommand(_message.Message):
    __slots__ = ("step", "embed", "forget", "heartbeat")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    step: StepRequest
    embed: EmbedStepRequest
    forget: ForgetSequences
    heartbeat: HeartbeatRequest
    def __init__(self, step: _Optional[_Union[StepRequest, _Mapping]] = ..., embed: _Optional[_Union[EmbedStepRequest, _Mapping]] = ..., forget: _Optional[_Union[ForgetSequences, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ...) -> None: ...
