from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VariantState(_message.Message):
    __slots__ = ("name", "weight", "backend", "health", "fallback")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: int
    backend: str
    health: str
    fallback: str
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[int] = ..., backend: _Optional[str] = ..., health: _Optional[str] = ..., fallback: _Optional[str] = ...) -> None: ...

class CanaryStatus(_message.Message):
    __slots__ = ("enabled", "candidate", "state", "current_percent", "last_reason", "leader", "step", "steps", "last_window", "limits")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_WINDOW_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    candidate: str
    state: str
    current_percent: int
    last_reason: str
    leader: str
    step: int
    steps: int
    last_window: CanaryWindow
    limits: CanaryLimits
    def __init__(self, enabled: _Optional[bool] = ..., candidate: _Optional[str] = ..., state: _Optional[str] = ..., current_percent: _Optional[int] = ..., last_reason: _Optional[str] = ..., leader: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., last_window: _Optional[_Union[CanaryWindow, _Mapping]] = ..., limits: _Optional[_Union[CanaryLimits, _Mapping]] = ...) -> None: ...

class CanaryVariantStats(_message.Message):
    __slots__ = ("variant", "requests", "errors", "error_ratio", "p99_ms", "labelled", "accuracy")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATIO_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    variant: str
    requests: int
    errors: int
    error_ratio: float
    p99_ms: float
    labelled: int
    accuracy: float
    def __init__(self, variant: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., error_ratio: _Optional[float] = ..., p99_ms: _Optional[float] = ..., labelled: _Optional[int] = ..., accuracy: _Optional[float] = ...) -> None: ...

class CanaryWindow(_message.Message):
    __slots__ = ("start_unix_s", "length_s", "baseline", "candidate", "verdict")
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LENGTH_S_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    start_unix_s: float
    length_s: float
    baseline: CanaryVariantStats
    candidate: CanaryVariantStats
    verdict: str
    def __init__(self, start_unix_s: _Optional[float] = ..., length_s: _Optional[float] = ..., baseline: _Optional[_Union[CanaryVariantStats, _Mapping]] = ..., candidate: _Optional[_Union[CanaryVariantStats, _Mapping]] = ..., verdict: _Optional[str] = ...) -> None: ...

class CanaryLimits(_message.Message):
    __slots__ = ("min_requests", "max_error_rate_increase", "max_p99_latency_ratio", "min_labels", "max_accuracy_decrease")
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_INCREASE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DECREASE_FIELD_NUMBER: _ClassVar[int]
    min_requests: int
    max_error_rate_increase: float
    max_p99_latency_ratio: float
    min_labels: int
    max_accuracy_decrease: float
    def __init__(self, min_requests: _Optional[int] = ..., max_error_rate_increase: _Optional[float] = ..., max_p99_latency_ratio: _Optional[float] = ..., min_labels: _Optional[int] = ..., max_accuracy_decrease: _Optional[float] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("model", "variants", "revision", "baseline", "shadow_variant", "shadow_percent", "canary", "updated_at_unix_s", "updated_by", "stale", "stale_since_unix_s", "replica")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VARIANT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BY_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    STALE_SINCE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    model: str
    variants: _containers.RepeatedCompositeFieldContainer[VariantState]
    revision: int
    baseline: str
    shadow_variant: str
    shadow_percent: int
    canary: CanaryStatus
    updated_at_unix_s: float
    updated_by: str
    stale: bool
    stale_since_unix_s: float
    replica: str
    def __init__(self, model: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[VariantState, _Mapping]]] = ..., revision: _Optional[int] = ..., baseline: _Optional[str] = ..., shadow_variant: _Optional[str] = ..., shadow_percent: _Optional[int] = ..., canary: _Optional[_Union[CanaryStatus, _Mapping]] = ..., updated_at_unix_s: _Optional[float] = ..., updated_by: _Optional[str] = ..., stale: _Optional[bool] = ..., stale_since_unix_s: _Optional[float] = ..., replica: _Optional[str] = ...) -> None: ...

class ListRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class GetRouteRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetRouteResponse(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: Route
    def __init__(self, route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

class SetWeightsRequest(_message.Message):
    __slots__ = ("model", "weights", "expected_revision", "reason", "request_id")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.ScalarMap[str, int]
    expected_revision: int
    reason: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Mapping[str, int]] = ..., expected_revision: _Optional[int] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("model", "variant", "reason", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    reason: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "reason", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RouteChangeResponse(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: Route
    def __init__(self, route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "time_unix_s", "subject", "action", "old_weights", "new_weights", "reason", "revision", "model")
    class OldWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class NewWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OLD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NEW_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    time_unix_s: float
    subject: str
    action: str
    old_weights: _containers.ScalarMap[str, int]
    new_weights: _containers.ScalarMap[str, int]
    reason: str
    revision: int
    model: str
    def __init__(self, id: _Optional[str] = ..., time_unix_s: _Optional[float] = ..., subject: _Optional[str] = ..., action: _Optional[str] = ..., old_weights: _Optional[_Mapping[str, int]] = ..., new_weights: _Optional[_Mapping[str, int]] = ..., reason: _Optional[str] = ..., revision: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class GetAuditLogRequest(_message.Message):
    __slots__ = ("model", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class GetAuditLogResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RouteEvent(_message.Message):
    __slots__ = ("route", "change")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    route: Route
    change: AuditEntry
    def __init__(self, route: _Optional[_Union[Route, _Mapping]] = ..., change: _Optional[_Union[AuditEntry, _Mapping]] = ...) -> None: ...
