from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ReportRequest(_message.Message):
    __slots__ = ("request_id", "label", "row")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: str
    row: int
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[str] = ..., row: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("model", "variant", "predicted", "correct")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    predicted: str
    correct: bool
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., predicted: _Optional[str] = ..., correct: _Optional[bool] = ...) -> None: ...
