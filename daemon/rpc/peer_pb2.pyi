from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Member(_message.Message):
    __slots__ = ("peer_id", "address", "client_only", "weight", "global_hash", "step", "joined_at")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ONLY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HASH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    client_only: bool
    weight: float
    global_hash: str
    step: int
    joined_at: float
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., client_only: _Optional[bool] = ..., weight: _Optional[float] = ..., global_hash: _Optional[str] = ..., step: _Optional[int] = ..., joined_at: _Optional[float] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("run", "sender")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    run: str
    sender: str
    def __init__(self, run: _Optional[str] = ..., sender: _Optional[str] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("peer_id", "run", "version", "protocol", "step", "config_hash", "dht_addrs")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    DHT_ADDRS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    run: str
    version: str
    protocol: int
    step: int
    config_hash: str
    dht_addrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[str] = ..., run: _Optional[str] = ..., version: _Optional[str] = ..., protocol: _Optional[int] = ..., step: _Optional[int] = ..., config_hash: _Optional[str] = ..., dht_addrs: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("run", "fragment", "round", "member", "protocol", "config_hash")
    RUN_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    run: str
    fragment: int
    round: int
    member: Member
    protocol: int
    config_hash: str
    def __init__(self, run: _Optional[str] = ..., fragment: _Optional[int] = ..., round: _Optional[int] = ..., member: _Optional[_Union[Member, _Mapping]] = ..., protocol: _Optional[int] = ..., config_hash: _Optional[str] = ...) -> None: ...

class GroupReply(_message.Message):
    __slots__ = ("status", "group_id", "members", "deadline_unix", "redirect_address", "message", "majority_hash", "run_step", "open_for_s", "closed_ago_s")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[GroupReply.Status]
        OK: _ClassVar[GroupReply.Status]
        REDIRECT: _ClassVar[GroupReply.Status]
        TOO_LATE: _ClassVar[GroupReply.Status]
        REFUSED: _ClassVar[GroupReply.Status]
    STATUS_UNSPECIFIED: GroupReply.Status
    OK: GroupReply.Status
    REDIRECT: GroupReply.Status
    TOO_LATE: GroupReply.Status
    REFUSED: GroupReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_HASH_FIELD_NUMBER: _ClassVar[int]
    RUN_STEP_FIELD_NUMBER: _ClassVar[int]
    OPEN_FOR_S_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AGO_S_FIELD_NUMBER: _ClassVar[int]
    status: GroupReply.Status
    group_id: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    deadline_unix: float
    redirect_address: str
    message: str
    majority_hash: str
    run_step: int
    open_for_s: float
    closed_ago_s: float
    def __init__(self, status: _Optional[_Union[GroupReply.Status, str]] = ..., group_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., deadline_unix: _Optional[float] = ..., redirect_address: _Optional[str] = ..., message: _Optional[str] = ..., majority_hash: _Optional[str] = ..., run_step: _Optional[int] = ..., open_for_s: _Optional[float] = ..., closed_ago_s: _Optional[float] = ...) -> None: ...

class ReduceHeader(_message.Message):
    __slots__ = ("run", "group_id", "fragment", "round", "part", "sender", "weight", "numel", "payload_bytes", "contributors", "fallback_for")
    RUN_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FOR_FIELD_NUMBER: _ClassVar[int]
    run: str
    group_id: str
    fragment: int
    round: int
    part: int
    sender: str
    weight: float
    numel: int
    payload_bytes: int
    contributors: int
    fallback_for: str
    def __init__(self, run: _Optional[str] = ..., group_id: _Optional[str] = ..., fragment: _Optional[int] = ..., round: _Optional[int] = ..., part: _Optional[int] = ..., sender: _Optional[str] = ..., weight: _Optional[float] = ..., numel: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., contributors: _Optional[int] = ..., fallback_for: _Optional[str] = ...) -> None: ...

class ReduceEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReduceError(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class ReduceMessage(_message.Message):
    __slots__ = ("header", "chunk", "end", "error")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    header: ReduceHeader
    chunk: bytes
    end: ReduceEnd
    error: ReduceError
    def __init__(self, header: _Optional[_Union[ReduceHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., end: _Optional[_Union[ReduceEnd, _Mapping]] = ..., error: _Optional[_Union[ReduceError, _Mapping]] = ...) -> None: ...

class StateManifestRequest(_message.Message):
    __slots__ = ("run", "sender", "fragments")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    run: str
    sender: str
    fragments: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, run: _Optional[str] = ..., sender: _Optional[str] = ..., fragments: _Optional[_Iterable[int]] = ...) -> None: ...

class StateTensor(_message.Message):
    __slots__ = ("name", "numel", "chunk_bytes", "chunk_hashes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_HASHES_FIELD_NUMBER: _ClassVar[int]
    name: str
    numel: int
    chunk_bytes: int
    chunk_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., numel: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., chunk_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class StateManifest(_message.Message):
    __slots__ = ("snapshot_id", "config_json", "step", "rounds", "tensors", "global_hashes", "busy")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HASHES_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    config_json: str
    step: int
    rounds: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.RepeatedCompositeFieldContainer[StateTensor]
    global_hashes: _containers.RepeatedScalarFieldContainer[str]
    busy: bool
    def __init__(self, snapshot_id: _Optional[str] = ..., config_json: _Optional[str] = ..., step: _Optional[int] = ..., rounds: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Iterable[_Union[StateTensor, _Mapping]]] = ..., global_hashes: _Optional[_Iterable[str]] = ..., busy: _Optional[bool] = ...) -> None: ...

class StateChunkRequest(_message.Message):
    __slots__ = ("run", "snapshot_id", "name", "index")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    run: str
    snapshot_id: str
    name: str
    index: int
    def __init__(self, run: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., name: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class LeaveNotice(_message.Message):
    __slots__ = ("run", "peer_id")
    RUN_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    run: str
    peer_id: str
    def __init__(self, run: _Optional[str] = ..., peer_id: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DialBackRequest(_message.Message):
    __slots__ = ("run", "address")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    run: str
    address: str
    def __init__(self, run: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class DialBackReply(_message.Message):
    __slots__ = ("reachable", "message")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    message: str
    def __init__(self, reachable: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
