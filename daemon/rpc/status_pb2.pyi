from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KnownPeer(_message.Message):
    __slots__ = ("peer_id", "address", "client_only", "step", "tokens_per_s")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ONLY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    client_only: bool
    step: int
    tokens_per_s: float
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., client_only: _Optional[bool] = ..., step: _Optional[int] = ..., tokens_per_s: _Optional[float] = ...) -> None: ...

class FragmentStatus(_message.Message):
    __slots__ = ("index", "round", "global_hash", "group_size", "duration_s", "outcome", "numel")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HASH_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    index: int
    round: int
    global_hash: str
    group_size: int
    duration_s: float
    outcome: str
    numel: int
    def __init__(self, index: _Optional[int] = ..., round: _Optional[int] = ..., global_hash: _Optional[str] = ..., group_size: _Optional[int] = ..., duration_s: _Optional[float] = ..., outcome: _Optional[str] = ..., numel: _Optional[int] = ...) -> None: ...

class EvalPoint(_message.Message):
    __slots__ = ("step", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("fragment", "round", "group_size", "duration_s", "outcome")
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    fragment: int
    round: int
    group_size: int
    duration_s: float
    outcome: str
    def __init__(self, fragment: _Optional[int] = ..., round: _Optional[int] = ..., group_size: _Optional[int] = ..., duration_s: _Optional[float] = ..., outcome: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("peer_id", "run", "step", "tokens", "listen", "dht_addrs", "peers", "bytes_sent", "bytes_received", "wait_fraction", "fragments", "tokens_per_s", "train_loss", "eval_loss", "rounds_applied", "rounds_failed", "waited_s", "uptime_s", "client_only", "repairs", "state", "version", "config_hash", "rounds_skipped", "download_done", "download_total", "join_command", "evals", "note", "rounds", "state_bytes_sent", "state_bytes_received")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    DHT_ADDRS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WAIT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FAILED_FIELD_NUMBER: _ClassVar[int]
    WAITED_S_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ONLY_FIELD_NUMBER: _ClassVar[int]
    REPAIRS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_DONE_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_TOTAL_FIELD_NUMBER: _ClassVar[int]
    JOIN_COMMAND_FIELD_NUMBER: _ClassVar[int]
    EVALS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    run: str
    step: int
    tokens: int
    listen: str
    dht_addrs: _containers.RepeatedScalarFieldContainer[str]
    peers: _containers.RepeatedCompositeFieldContainer[KnownPeer]
    bytes_sent: int
    bytes_received: int
    wait_fraction: float
    fragments: _containers.RepeatedCompositeFieldContainer[FragmentStatus]
    tokens_per_s: float
    train_loss: float
    eval_loss: float
    rounds_applied: int
    rounds_failed: int
    waited_s: float
    uptime_s: float
    client_only: bool
    repairs: int
    state: str
    version: str
    config_hash: str
    rounds_skipped: int
    download_done: int
    download_total: int
    join_command: str
    evals: _containers.RepeatedCompositeFieldContainer[EvalPoint]
    note: str
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    state_bytes_sent: int
    state_bytes_received: int
    def __init__(self, peer_id: _Optional[str] = ..., run: _Optional[str] = ..., step: _Optional[int] = ..., tokens: _Optional[int] = ..., listen: _Optional[str] = ..., dht_addrs: _Optional[_Iterable[str]] = ..., peers: _Optional[_Iterable[_Union[KnownPeer, _Mapping]]] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., wait_fraction: _Optional[float] = ..., fragments: _Optional[_Iterable[_Union[FragmentStatus, _Mapping]]] = ..., tokens_per_s: _Optional[float] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., rounds_applied: _Optional[int] = ..., rounds_failed: _Optional[int] = ..., waited_s: _Optional[float] = ..., uptime_s: _Optional[float] = ..., client_only: _Optional[bool] = ..., repairs: _Optional[int] = ..., state: _Optional[str] = ..., version: _Optional[str] = ..., config_hash: _Optional[str] = ..., rounds_skipped: _Optional[int] = ..., download_done: _Optional[int] = ..., download_total: _Optional[int] = ..., join_command: _Optional[str] = ..., evals: _Optional[_Iterable[_Union[EvalPoint, _Mapping]]] = ..., note: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., state_bytes_sent: _Optional[int] = ..., state_bytes_received: _Optional[int] = ...) -> None: ...
