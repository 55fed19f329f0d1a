from tokenpool.protos.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "sampling", "timeout_seconds", "table_slot", "kv_destination", "seed_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TABLE_SLOT_FIELD_NUMBER: _ClassVar[int]
    KV_DESTINATION_FIELD_NUMBER: _ClassVar[int]
    SEED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    timeout_seconds: float
    table_slot: int
    kv_destination: str
    seed_offset: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., timeout_seconds: _Optional[float] = ..., table_slot: _Optional[int] = ..., kv_destination: _Optional[str] = ..., seed_offset: _Optional[int] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("handle_id", "block_offsets", "block_dims", "dtype", "num_tokens", "ready", "agent")
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_DIMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    handle_id: str
    block_offsets: _containers.RepeatedScalarFieldContainer[int]
    block_dims: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    num_tokens: int
    ready: bool
    agent: str
    def __init__(self, handle_id: _Optional[str] = ..., block_offsets: _Optional[_Iterable[int]] = ..., block_dims: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., num_tokens: _Optional[int] = ..., ready: _Optional[bool] = ..., agent: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "kv", "seed", "first_text", "finish_reason", "first_logprobs")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIRST_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    kv: KVHandle
    seed: int
    first_text: str
    finish_reason: _inference_pb2.FinishReason
    first_logprobs: _inference_pb2.TokenLogprobs
    def __init__(self, first_token_id: _Optional[int] = ..., kv: _Optional[_Union[KVHandle, _Mapping]] = ..., seed: _Optional[int] = ..., first_text: _Optional[str] = ..., finish_reason: _Optional[_Union[_inference_pb2.FinishReason, str]] = ..., first_logprobs: _Optional[_Union[_inference_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "first_token_id", "sampling", "seed", "kv", "timeout_seconds", "table_slot", "seed_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TABLE_SLOT_FIELD_NUMBER: _ClassVar[int]
    SEED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    sampling: _inference_pb2.SamplingParams
    seed: int
    kv: KVHandle
    timeout_seconds: float
    table_slot: int
    seed_offset: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., kv: _Optional[_Union[KVHandle, _Mapping]] = ..., timeout_seconds: _Optional[float] = ..., table_slot: _Optional[int] = ..., seed_offset: _Optional[int] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "text", "num_output_tokens", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _inference_pb2.FinishReason
    text: str
    num_output_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.TokenLogprobs]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_inference_pb2.FinishReason, str]] = ..., text: _Optional[str] = ..., num_output_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_inference_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("block_dims", "dtype", "num_blocks", "request_id", "destination", "source")
    BLOCK_DIMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    block_dims: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    num_blocks: int
    request_id: str
    destination: str
    source: str
    def __init__(self, block_dims: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., num_blocks: _Optional[int] = ..., request_id: _Optional[str] = ..., destination: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("name", "nixl_metadata", "pool_address", "pool_nbytes", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NIXL_METADATA_FIELD_NUMBER: _ClassVar[int]
    POOL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POOL_NBYTES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    nixl_metadata: bytes
    pool_address: int
    pool_nbytes: int
    address: str
    def __init__(self, name: _Optional[str] = ..., nixl_metadata: _Optional[bytes] = ..., pool_address: _Optional[int] = ..., pool_nbytes: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("handle_id", "layer_start", "layer_end", "block_start", "block_end")
    HANDLE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    BLOCK_END_FIELD_NUMBER: _ClassVar[int]
    handle_id: str
    layer_start: int
    layer_end: int
    block_start: int
    block_end: int
    def __init__(self, handle_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., block_start: _Optional[int] = ..., block_end: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("bytes", "seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class RequestRef(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolInfo(_message.Message):
    __slots__ = ("path", "nbytes", "slab_bytes", "address")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SLAB_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    path: str
    nbytes: int
    slab_bytes: int
    address: str
    def __init__(self, path: _Optional[str] = ..., nbytes: _Optional[int] = ..., slab_bytes: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("capacity_bytes", "used_bytes", "handles", "blocks")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    used_bytes: int
    handles: int
    blocks: int
    def __init__(self, capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., handles: _Optional[int] = ..., blocks: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("num_blocks",)
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("handle_ids",)
    HANDLE_IDS_FIELD_NUMBER: _ClassVar[int]
    handle_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, handle_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("unknown_handle_ids", "lease_s")
    UNKNOWN_HANDLE_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    unknown_handle_ids: _containers.RepeatedScalarFieldContainer[str]
    lease_s: float
    def __init__(self, unknown_handle_ids: _Optional[_Iterable[str]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("name", "role", "active_model", "models", "queued", "running", "kv_blocks_used", "host_kv_used_bytes", "switches", "requests_by_model", "policy", "alpha", "quotas_s", "groups", "tbt_target_s", "timings", "host_cached", "kv_usage", "loads", "cold_loads", "round_switch_s", "kv_swap_correction")
    class RequestsByModelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class QuotasSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_S_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TBT_TARGET_S_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHED_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    COLD_LOADS_FIELD_NUMBER: _ClassVar[int]
    ROUND_SWITCH_S_FIELD_NUMBER: _ClassVar[int]
    KV_SWAP_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    active_model: str
    models: _containers.RepeatedScalarFieldContainer[str]
    queued: int
    running: int
    kv_blocks_used: int
    host_kv_used_bytes: int
    switches: int
    requests_by_model: _containers.ScalarMap[str, int]
    policy: str
    alpha: float
    quotas_s: _containers.ScalarMap[str, float]
    groups: _containers.RepeatedScalarFieldContainer[str]
    tbt_target_s: float
    timings: _containers.RepeatedCompositeFieldContainer[ModelTiming]
    host_cached: _containers.RepeatedScalarFieldContainer[str]
    kv_usage: float
    loads: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    cold_loads: int
    round_switch_s: float
    kv_swap_correction: float
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., active_model: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., host_kv_used_bytes: _Optional[int] = ..., switches: _Optional[int] = ..., requests_by_model: _Optional[_Mapping[str, int]] = ..., policy: _Optional[str] = ..., alpha: _Optional[float] = ..., quotas_s: _Optional[_Mapping[str, float]] = ..., groups: _Optional[_Iterable[str]] = ..., tbt_target_s: _Optional[float] = ..., timings: _Optional[_Iterable[_Union[ModelTiming, _Mapping]]] = ..., host_cached: _Optional[_Iterable[str]] = ..., kv_usage: _Optional[float] = ..., loads: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ..., cold_loads: _Optional[int] = ..., round_switch_s: _Optional[float] = ..., kv_swap_correction: _Optional[float] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("model", "loaded_bytes", "total_bytes", "waiting_for_room")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_ROOM_FIELD_NUMBER: _ClassVar[int]
    model: str
    loaded_bytes: int
    total_bytes: int
    waiting_for_room: bool
    def __init__(self, model: _Optional[str] = ..., loaded_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., waiting_for_room: _Optional[bool] = ...) -> None: ...

class CatalogueRequest(_message.Message):
    __slots__ = ("action", "model", "folder")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    action: str
    model: str
    folder: str
    def __init__(self, action: _Optional[str] = ..., model: _Optional[str] = ..., folder: _Optional[str] = ...) -> None: ...

class CatalogueModel(_message.Message):
    __slots__ = ("id", "folder", "tier", "weight_bytes", "requests", "loaded_bytes", "loading", "waiting_for_room", "added_at_run_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_ROOM_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_RUN_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    folder: str
    tier: str
    weight_bytes: int
    requests: int
    loaded_bytes: int
    loading: bool
    waiting_for_room: bool
    added_at_run_time: bool
    def __init__(self, id: _Optional[str] = ..., folder: _Optional[str] = ..., tier: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., requests: _Optional[int] = ..., loaded_bytes: _Optional[int] = ..., loading: _Optional[bool] = ..., waiting_for_room: _Optional[bool] = ..., added_at_run_time: _Optional[bool] = ...) -> None: ...

class CatalogueReply(_message.Message):
    __slots__ = ("models", "timing")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[CatalogueModel]
    timing: ModelTiming
    def __init__(self, models: _Optional[_Iterable[_Union[CatalogueModel, _Mapping]]] = ..., timing: _Optional[_Union[ModelTiming, _Mapping]] = ...) -> None: ...

class ModelTiming(_message.Message):
    __slots__ = ("model", "prefill_a", "prefill_b", "step_a", "step_b", "step_c", "switch_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREFILL_A_FIELD_NUMBER: _ClassVar[int]
    PREFILL_B_FIELD_NUMBER: _ClassVar[int]
    STEP_A_FIELD_NUMBER: _ClassVar[int]
    STEP_B_FIELD_NUMBER: _ClassVar[int]
    STEP_C_FIELD_NUMBER: _ClassVar[int]
    SWITCH_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    prefill_a: float
    prefill_b: float
    step_a: float
    step_b: float
    step_c: float
    switch_s: float
    def __init__(self, model: _Optional[str] = ..., prefill_a: _Optional[float] = ..., prefill_b: _Optional[float] = ..., step_a: _Optional[float] = ..., step_b: _Optional[float] = ..., step_c: _Optional[float] = ..., switch_s: _Optional[float] = ...) -> None: ...
