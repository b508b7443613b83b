from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaSettings(_message.Message):
    __slots__ = ("model", "dtype", "quantize", "device", "block_size", "kv_cache_memory", "tp", "pp", "collective_timeout_s", "compile", "compile_cache_dir", "compile_stats_dir")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    COMPILE_STATS_DIR_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    quantize: str
    device: str
    block_size: int
    kv_cache_memory: float
    tp: int
    pp: int
    collective_timeout_s: float
    compile: bool
    compile_cache_dir: str
    compile_stats_dir: str
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., quantize: _Optional[str] = ..., device: _Optional[str] = ..., block_size: _Optional[int] = ..., kv_cache_memory: _Optional[float] = ..., tp: _Optional[int] = ..., pp: _Optional[int] = ..., collective_timeout_s: _Optional[float] = ..., compile: _Optional[bool] = ..., compile_cache_dir: _Optional[str] = ..., compile_stats_dir: _Optional[str] = ...) -> None: ...

class BatchLimits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_num_seqs", "decode_steps")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_num_seqs: int
    decode_steps: int
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., decode_steps: _Optional[int] = ...) -> None: ...

class ShardConfig(_message.Message):
    __slots__ = ("replica", "limits", "listen", "parent_pid", "tls_cert", "tls_key", "tls_client_ca", "log_format", "listen_token_file", "insecure_listen")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    PARENT_PID_FIELD_NUMBER: _ClassVar[int]
    TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    TLS_KEY_FIELD_NUMBER: _ClassVar[int]
    TLS_CLIENT_CA_FIELD_NUMBER: _ClassVar[int]
    LOG_FORMAT_FIELD_NUMBER: _ClassVar[int]
    LISTEN_TOKEN_FILE_FIELD_NUMBER: _ClassVar[int]
    INSECURE_LISTEN_FIELD_NUMBER: _ClassVar[int]
    replica: ReplicaSettings
    limits: BatchLimits
    listen: str
    parent_pid: int
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    log_format: str
    listen_token_file: str
    insecure_listen: bool
    def __init__(self, replica: _Optional[_Union[ReplicaSettings, _Mapping]] = ..., limits: _Optional[_Union[BatchLimits, _Mapping]] = ..., listen: _Optional[str] = ..., parent_pid: _Optional[int] = ..., tls_cert: _Optional[str] = ..., tls_key: _Optional[str] = ..., tls_client_ca: _Optional[str] = ..., log_format: _Optional[str] = ..., listen_token_file: _Optional[str] = ..., insecure_listen: _Optional[bool] = ...) -> None: ...
