from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddModelRequest(_message.Message):
    __slots__ = ("id", "folder")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    id: str
    folder: str
    def __init__(self, id: _Optional[str] = ..., folder: _Optional[str] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CatalogueEntry(_message.Message):
    __slots__ = ("id", "folder", "tier", "weight_bytes", "requests", "loaded_bytes", "loading", "resident_on", "waiting_for_room")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ON_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_ROOM_FIELD_NUMBER: _ClassVar[int]
    id: str
    folder: str
    tier: str
    weight_bytes: int
    requests: int
    loaded_bytes: int
    loading: bool
    resident_on: _containers.RepeatedScalarFieldContainer[str]
    waiting_for_room: bool
    def __init__(self, id: _Optional[str] = ..., folder: _Optional[str] = ..., tier: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., requests: _Optional[int] = ..., loaded_bytes: _Optional[int] = ..., loading: _Optional[bool] = ..., resident_on: _Optional[_Iterable[str]] = ..., waiting_for_room: _Optional[bool] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("message", "model")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    message: str
    model: CatalogueEntry
    def __init__(self, message: _Optional[str] = ..., model: _Optional[_Union[CatalogueEntry, _Mapping]] = ...) -> None: ...

class ListCatalogueRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCatalogueResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[CatalogueEntry]
    def __init__(self, models: _Optional[_Iterable[_Union[CatalogueEntry, _Mapping]]] = ...) -> None: ...
