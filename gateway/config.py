"""Typed, validated configuration: the YAML file (README, "Configuration reference") plus ``INFERGATE_...`` overrides.

``load_config(path)`` is the only way in. It reads the YAML, overlays environment variables
(``INFERGATE_SERVER__LISTEN=0.0.0.0:9000``: double underscore separates levels; a value is the
string it is, converted by its field's type, except a flow list or mapping such as
``[CPUExecutionProvider]``, read as YAML), validates everything once, and returns frozen models.
Problems raise ``ConfigError`` whose message names the key and what is wrong; the CLI prints it
and exits 2. The rest of the code receives these objects, never dicts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "INFERGATE_"
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"})
SUPPORTED_ALGORITHMS = ASYMMETRIC_ALGORITHMS | {"HS256"}


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


class _Model(BaseModel):
    # use_attribute_docstrings: the docstring under each field is its description (config_doc.py
    # renders the README's reference from it).
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TlsConfig(_Model):
    cert_file: Path
    """PEM certificate chain the server presents."""
    key_file: Path
    """PEM private key of that certificate."""
    client_ca_file: Path | None = None
    """When set, clients must present a certificate signed by this CA (mutual TLS)."""

    @model_validator(mode="after")
    def _files_exist(self) -> TlsConfig:
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return self


def cpus_available() -> int:
    """CPUs this process may run on (``server.workers: auto``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class ServerConfig(_Model):
    listen: str = "0.0.0.0:8001"
    """host:port the inference and admin services listen on."""
    metrics_listen: str = "0.0.0.0:9091"
    """host:port of the Prometheus HTTP endpoint; empty turns it off."""
    workers: int = Field(1, ge=1, le=256)
    """Processes sharing the listen port through SO_REUSEPORT; ``auto`` is one per CPU this process
    may run on (its affinity mask, so a container's CPU set counts, not the host's)."""
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request or response message accepted, in bytes (gRPC's own default); larger ones are
    refused RESOURCE_EXHAUSTED by grpc from their length prefix, before they are buffered. grpc
    buffers each message whole before the gateway sees it, so memory under a burst is about three
    times (concurrent calls) x (this): 48 concurrent calls at 4 MiB peaked at 0.6-1.1 GiB, at 16 MiB
    at 2 GiB (RELIABILITY.md). Raise it only with the memory to match."""
    max_concurrent_rpcs: int = Field(10000, ge=1)
    """Calls in progress at once; beyond it callers get RESOURCE_EXHAUSTED."""
    default_deadline_ms: int = Field(10000, ge=1)
    """Deadline applied to calls that carry none."""
    shutdown_grace_s: float = Field(10.0, ge=0)
    """On SIGTERM, how long in-flight calls get to finish before they are cancelled."""
    max_inflight_request_bytes: int = Field(256 * 1024 * 1024, ge=0)
    """Wire bytes of the requests being served at once (0: no limit); past it RESOURCE_EXHAUSTED.
    Decoding and batching copy a request about twice, so the default keeps a 2 GiB pod clear."""
    drain_notice_s: float = Field(1.0, ge=0)
    """On SIGTERM, once in-flight calls are done, how long new calls are still answered UNAVAILABLE
    (health says NOT_SERVING) so that load balancers notice before the port closes; it ends early
    once no call has come for 0.5 s, and never outlasts ``shutdown_grace_s``."""
    max_open_streams_without_auth: int = Field(256, ge=1)
    """Health Watch and reflection streams (they need no token) open at once, all callers together;
    never more than a quarter of ``max_concurrent_rpcs``. Beyond it: RESOURCE_EXHAUSTED."""
    max_open_streams_without_auth_per_connection: int = Field(8, ge=1)
    """The same, per client connection."""
    open_stream_without_auth_max_age_s: float = Field(600.0, gt=0)
    """Such a stream ends (OK) after this long; clients open it again."""
    tls: TlsConfig | None = None
    """Server TLS; absent means plaintext."""

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return cpus_available()
        return value

    @field_validator("listen")
    @classmethod
    def _has_port(cls, value: str) -> str:
        _split_host_port(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_has_port(cls, value: str) -> str:
        if value:
            _split_host_port(value)
        return value


class AuthConfig(_Model):
    mode: Literal["jwt", "none"] = "none"
    """``jwt`` verifies bearer tokens; ``none`` lets every call in (a warning is logged)."""
    issuer: str = ""
    """Required ``iss`` claim."""
    audience: str = ""
    """Required ``aud`` claim."""
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    """Accepted signature algorithms; never taken from the token."""
    jwks_file: Path | None = None
    """A JWKS document on disk, read again when it changes."""
    jwks_url: str | None = None
    """A JWKS document over HTTP(S), cached and refreshed."""
    hs256_secret_env: str | None = None
    """Name of the environment variable holding the HS256 secret."""
    leeway_s: float = Field(30, ge=0, le=300)
    """Clock skew tolerated on exp and nbf."""
    tenant_claim: str = "sub"
    """Claim naming the tenant for rate limits."""
    rate_limit_per_tenant_rps: float = Field(0, ge=0)
    """Token-bucket rate per tenant; 0 turns it off."""
    rate_limit_burst: int = Field(0, ge=0)
    """Bucket size per tenant; 0 means one second's worth of the rate."""
    jwks_cache_ttl_s: float = Field(300, gt=0)
    """How long a fetched JWKS URL document is trusted before it is fetched again."""
    jwks_refresh_cooldown_s: float = Field(30, ge=0)
    """Least time between two fetches caused by unknown key ids."""
    verified_cache_size: int = Field(10000, ge=0)
    """Verified tokens remembered until their expiry; 0 turns the cache off."""
    jwks_file_poll_s: float = Field(1.0, gt=0)
    """How often jwks_file is checked for changes (mtime, size, inode)."""

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        if self.mode == "none":
            return self
        unknown = [a for a in self.algorithms if a not in SUPPORTED_ALGORITHMS]
        if unknown:
            raise ValueError(f"algorithms: unsupported {unknown}; use some of {sorted(SUPPORTED_ALGORITHMS)}")
        if not self.algorithms:
            raise ValueError("algorithms: at least one is required")
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience are required when mode is jwt")
        sources = [s for s in (self.jwks_file, self.jwks_url, self.hs256_secret_env) if s]
        if len(sources) != 1:
            raise ValueError("exactly one of jwks_file, jwks_url, hs256_secret_env is required when mode is jwt")
        if "HS256" in self.algorithms:
            if len(self.algorithms) != 1:
                raise ValueError("algorithms: HS256 cannot be mixed with asymmetric algorithms (key confusion)")
            if not self.hs256_secret_env:
                raise ValueError("algorithms: HS256 needs hs256_secret_env")
        elif self.hs256_secret_env:
            raise ValueError("hs256_secret_env needs algorithms: [HS256]")
        return self


class RedisConfig(_Model):
    url: str = ""
    """Redis URL for route state, features and audit; empty runs without Redis."""
    socket_timeout_ms: int = Field(500, ge=1)
    """Timeout of one Redis command issued off the hot path (admin, route sync)."""


class TelemetryConfig(_Model):
    service_name: str = "infergate"
    """``service.name`` of exported spans."""
    otlp_endpoint: str = ""
    """OTLP/gRPC collector; empty means no export (OTEL_EXPORTER_OTLP_ENDPOINT also works)."""
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """Share of root traces sampled; a caller's sampled flag is honoured."""


class BreakerConfig(_Model):
    consecutive_failures: int = Field(5, ge=1)
    """Failures in a row that eject (open) the backend."""
    base_ejection_s: float = Field(2.0, gt=0)
    """First ejection time; each repeated ejection doubles it."""
    max_ejection_s: float = Field(60.0, gt=0)
    """Ceiling of the ejection time."""
    half_open_probes: int = Field(1, ge=1)
    """Calls let through when the ejection time is over; success closes the breaker."""


class TritonBackendConfig(_Model):
    kind: Literal["triton"]
    url: str
    """host:port of Triton's gRPC endpoint."""
    timeout_ms: int = Field(2000, ge=1)
    """Longest a single backend call may take (the caller's deadline may cut it shorter)."""
    max_inflight_batches: int = Field(16, ge=1)
    """Batches sent to this backend at once."""
    readiness_poll_s: float = Field(1.0, gt=0)
    """How often model readiness is polled."""
    max_retries: int = Field(2, ge=0, le=2)
    """Retries of a call that got no answer (UNAVAILABLE), only while the caller's deadline allows."""
    breaker: BreakerConfig = BreakerConfig()
    """Circuit breaker of this backend."""


class OnnxBackendConfig(_Model):
    kind: Literal["onnx"]
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    """ONNX Runtime execution providers in order of preference (CUDAExecutionProvider for GPU)."""
    intra_op_threads: int = Field(1, ge=0)
    """Threads ONNX Runtime uses inside one operator; 0 lets it choose."""
    pool_threads: int = Field(2, ge=1)
    """Size of the dedicated thread pool that runs sessions, off the event loop."""
    max_inflight_batches: int = Field(4, ge=1)
    """Batches run at once."""
    run_inline: Literal["auto", "always", "never"] = "auto"
    """Run sessions on the event loop instead of the thread pool. ``auto``: per model, while its
    measured run time stays under inline_max_us (measured at load, then on every run)."""
    inline_max_us: int = Field(300, ge=0)
    """With run_inline: auto, the run time (moving average) up to which a model runs inline."""
    breaker: BreakerConfig = BreakerConfig()
    """Circuit breaker of this backend."""


BackendConfig = Annotated[Union[TritonBackendConfig, OnnxBackendConfig], Field(discriminator="kind")]


class FeatureViewConfig(_Model):
    key_template: str
    """Redis key of one entity; ``{id}`` is replaced by the entity id."""
    encoding: Literal["float32", "hash"] = "float32"
    """``float32``: a packed little-endian vector; ``hash``: one hash field per feature."""
    fields: tuple[str, ...] = ()
    """Hash fields in order (encoding hash)."""
    dim: int = Field(ge=1)
    """Number of features per entity."""
    on_missing: Literal["zeros", "error"] = "zeros"
    """An entity without a row: zeros, or NOT_FOUND."""
    on_error: Literal["fail", "zeros"] = "fail"
    """Redis down or slow: UNAVAILABLE, or zeros."""
    timeout_ms: int = Field(20, ge=1)
    """Longest a feature fetch may take."""

    @model_validator(mode="after")
    def _fields_match(self) -> FeatureViewConfig:
        if self.key_template.count("{id}") != 1:
            raise ValueError("key_template must contain {id} exactly once")
        if self.encoding == "hash" and len(self.fields) != self.dim:
            raise ValueError("fields: encoding hash needs exactly dim field names")
        return self


class ModelFeaturesConfig(_Model):
    view: str
    """Feature view to read."""
    entity_input: str
    """Input holding entity ids (BYTES or INT64, shape [N] or [N, 1]); not sent to the backend."""
    feature_input: str
    """Backend input the fetched features are written to, shape [N, dim], FP32."""
    max_entities: int = Field(1024, ge=1)
    """Entity ids one call may carry (rows; each is one Redis read); beyond it INVALID_ARGUMENT."""


class BatchingConfig(_Model):
    max_batch_size: int = Field(64, ge=1)
    """Rows merged into one backend call at most."""
    dispatch: Literal["idle", "delay"] = "idle"
    """When a batch goes out. ``idle``: as soon as a backend slot is free, with whatever is queued;
    requests gather only while every slot is busy, so a lone caller never waits and batches grow
    with load. ``delay``: Triton's rule, wait up to max_delay_us for a full or preferred-size batch."""
    max_delay_us: int = Field(1000, ge=0)
    """With dispatch: delay, the longest the first request of a batch waits for company."""
    max_queue: int = Field(4096, ge=1)
    """Rows queued per variant; beyond it UNAVAILABLE at once."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """With dispatch: delay, sizes dispatched at once without waiting out max_delay_us."""


class RoutingConfig(_Model):
    sticky_key: str = ""
    """Request parameter (else metadata key) whose value pins a caller to a variant."""
    salt: str = ""
    """Mixed into the sticky hash; change it to reshuffle callers. Defaults to the model name."""


class VariantConfig(_Model):
    backend: str
    """Name of an entry in ``backends``."""
    model: str = ""
    """Model name on a Triton backend."""
    path: Path | None = None
    """ONNX file for an onnx backend."""
    sha256: str | None = None
    """Expected SHA-256 of the ONNX file, 64 hex digits (``sha256sum`` output); a file that differs is refused."""
    weight: int = Field(0, ge=0, le=100000)
    """Initial share of traffic (relative to the other variants)."""
    fallback: str = ""
    """Variant that serves when this one's backend is down."""

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digest = value.strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("must be 64 hex digits, the sha256sum of the file (without a 'sha256:' prefix)")
        return digest


class ShadowConfig(_Model):
    variant: str
    """Variant that receives copies of live requests."""
    percent: float = Field(ge=0, le=100)
    """Share of live calls copied."""
    max_pending: int = Field(256, ge=1)
    """Copies waiting at once; more are dropped and counted."""


class CanaryConfig(_Model):
    candidate: str
    """Variant being rolled out; the baseline is the route's first variant."""
    steps_percent: tuple[int, ...] = (5, 25, 50, 100)
    """Candidate weights, in order."""
    interval_s: float = Field(60, gt=0)
    """Length of one analysis interval."""
    min_requests: int = Field(200, ge=0)
    """Candidate calls needed in an interval to judge it."""
    max_error_rate_increase: float = Field(0.01, ge=0, le=1)
    """Tolerated candidate error rate above the baseline's."""
    max_p99_latency_ratio: float = Field(1.5, gt=0)
    """Tolerated candidate p99 / baseline p99."""
    min_labels: int = Field(50, ge=1)
    """Feedback labels each variant needs in an interval before accuracy is judged."""
    max_accuracy_decrease: float = Field(0.02, ge=0, le=1)
    """Tolerated candidate accuracy below the baseline's (when labels arrive through the feedback RPC)."""
    lease_ttl_s: float = Field(10.0, gt=0)
    """How long the replica driving this canary stays leader without renewing (a dead one is replaced after it)."""

    @field_validator("steps_percent")
    @classmethod
    def _steps(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(not 0 < s <= 100 for s in value) or list(value) != sorted(set(value)):
            raise ValueError("must be increasing percentages in (0, 100]")
        return value


class ModelRouteConfig(_Model):
    variants: dict[str, VariantConfig]
    """Variants in order; the first is the baseline."""
    features: ModelFeaturesConfig | None = None
    """Online features added to each request."""
    batching: BatchingConfig | None = None
    """Dynamic batching per variant; absent sends each request alone."""
    routing: RoutingConfig = RoutingConfig()
    """How a caller is assigned a variant."""
    shadow: ShadowConfig | None = None
    """Copies of live traffic to a variant whose answers are discarded."""
    canary: CanaryConfig | None = None
    """Automated canary analysis."""

    @property
    def baseline(self) -> str:
        return next(iter(self.variants))

    @model_validator(mode="after")
    def _consistent(self) -> ModelRouteConfig:
        if not self.variants:
            raise ValueError("variants: at least one is required")
        if sum(v.weight for v in self.variants.values()) == 0:
            raise ValueError("variants: the weights must not all be zero")
        for name, variant in self.variants.items():
            if variant.fallback and variant.fallback not in self.variants:
                raise ValueError(f"variants.{name}.fallback: unknown variant {variant.fallback!r}")
            if variant.fallback == name:
                raise ValueError(f"variants.{name}.fallback: a variant cannot fall back to itself")
        if self.shadow and self.shadow.variant not in self.variants:
            raise ValueError(f"shadow.variant: unknown variant {self.shadow.variant!r}")
        if self.canary:
            if self.canary.candidate not in self.variants:
                raise ValueError(f"canary.candidate: unknown variant {self.canary.candidate!r}")
            if self.canary.candidate == self.baseline:
                raise ValueError("canary.candidate: must differ from the baseline (the first variant)")
        return self


class LoggingConfig(_Model):
    format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line with ``trace_id`` and ``span_id`` when a span is current."""
    access_log_sample_ratio: float = Field(0.0, ge=0, le=1)
    """Share of successful inference calls logged by the access log (model, variant, status, duration, tenant); 0 = off."""
    log_failed_calls: bool = True
    """One access-log line per failed inference call (at most 20 a second)."""


class ModelMonitorConfig(_Model):
    profile: Path | None = None
    """Reference profile written by ``infergate monitor profile``; absent: captured from the first sampled rows."""
    class_output: str = ""
    """Output holding the prediction: argmax of a [N, C] score tensor, or a [N] / [N, 1] class index.
    Empty: no class shares and no feedback accuracy for this model."""
    class_names: tuple[str, ...] = ()
    """Class names by index, as feedback labels name them; empty: the index as a string ("0", "1"...)."""


class MonitoringConfig(_Model):
    """Model monitoring in the request path (gateway/monitor.py): drift, class shares, feedback accuracy."""

    enabled: bool = False
    """Watch every model's inputs and outputs (sampled) and accept feedback labels."""
    sample_ratio: float = Field(0.01, ge=0, le=1)
    """Share of calls whose rows go into the drift histograms and class shares."""
    bins: int = Field(10, ge=2, le=50)
    """Buckets per feature; their edges are the reference's quantiles."""
    max_indexes: int = Field(32, ge=1, le=1024)
    """Features watched per tensor (the first ones): bounds the drift series to tensors x this."""
    max_classes: int = Field(32, ge=2, le=1024)
    """Classes counted by index; higher indexes are counted as ``other``."""
    reference_rows: int = Field(1000, ge=10)
    """Sampled rows captured as a model's reference when it has no profile file."""
    window_rows: int = Field(1000, ge=10)
    """Sampled rows per drift window: PSI and class shares are recomputed each time one fills."""
    psi_warn_threshold: float = Field(0.2, gt=0)
    """A window whose PSI crosses this logs one warning per feature (alerts use their own threshold)."""
    prediction_store_size: int = Field(100_000, ge=1)
    """Predictions kept (by request id) for joining feedback labels; the oldest go first."""
    max_rows_per_prediction: int = Field(64, ge=1)
    """Rows of one request whose predictions are kept for feedback."""
    accuracy_window: int = Field(1000, ge=1)
    """Labelled predictions per variant that the live accuracy is computed over."""
    models: dict[str, ModelMonitorConfig] = {}
    """Per-model settings; a model not named here is watched with the defaults."""


class GatewayConfig(_Model):
    server: ServerConfig = ServerConfig()
    """Where the gateway listens, its limits and its TLS."""
    auth: AuthConfig = AuthConfig()
    """Who may call: JWT bearer tokens with scopes, and per-tenant rate limits."""
    redis: RedisConfig = RedisConfig()
    """Shared route state (weights, revisions, audit log, canary lease) and online features."""
    telemetry: TelemetryConfig = TelemetryConfig()
    """OpenTelemetry traces."""
    backends: dict[str, BackendConfig] = {}
    """Where variants run, by name: a Triton server, or ONNX Runtime in process."""
    feature_views: dict[str, FeatureViewConfig] = {}
    """Online feature views in Redis, by name, that models can fetch inputs from."""
    models: dict[str, ModelRouteConfig] = {}
    """The models callers ask for, by name, each with its variants and how calls are routed among them."""
    monitoring: MonitoringConfig = MonitoringConfig()
    """Model monitoring in the request path: drift against a reference profile, class shares, feedback accuracy."""
    logging: LoggingConfig = LoggingConfig()
    """Log format (text or JSON with trace ids) and the access log."""

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        for model_name in self.monitoring.models:
            if model_name not in self.models:
                raise ValueError(f"monitoring.models.{model_name}: unknown model {model_name!r}")
        digests: dict[tuple[str, Path], str] = {}
        for model_name, model in self.models.items():
            for name, variant in model.variants.items():
                where = f"models.{model_name}.variants.{name}"
                backend = self.backends.get(variant.backend)
                if backend is None:
                    raise ValueError(f"{where}.backend: unknown backend {variant.backend!r}")
                if backend.kind == "onnx" and variant.path is None:
                    raise ValueError(f"{where}.path: required for an onnx backend")
                if backend.kind != "onnx" and variant.sha256 is not None:
                    raise ValueError(f"{where}.sha256: only an onnx backend loads a file the gateway can check")
                if variant.sha256 is not None and variant.path is not None:
                    known = digests.setdefault((variant.backend, variant.path), variant.sha256)
                    if known != variant.sha256:
                        raise ValueError(f"{where}.sha256: another variant names a different digest for {variant.path}")
                if backend.kind == "triton" and not variant.model:
                    raise ValueError(f"{where}.model: required for a triton backend")
            if model.features and model.features.view not in self.feature_views:
                raise ValueError(f"models.{model_name}.features.view: unknown view {model.features.view!r}")
            if model.features and not self.redis.url:
                raise ValueError(f"models.{model_name}.features: online features need redis.url")
        return self

    def onnx_digests(self, backend: str) -> dict[str, str]:
        """Expected SHA-256 per ONNX file path for the variants that run on ``backend``."""
        return {
            str(variant.path): variant.sha256
            for model in self.models.values()
            for variant in model.variants.values()
            if variant.backend == backend and variant.path is not None and variant.sha256 is not None
        }


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, overlay and validate the configuration; raise ``ConfigError`` naming the bad key."""
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        base = Path(path).resolve().parent
    else:
        base = Path.cwd()
    _overlay_environment(raw, os.environ if environ is None else environ)
    _resolve_paths(raw, base)
    return parse_config(raw)


def missing_model_files(config: GatewayConfig) -> list[str]:
    """What ``serve`` would reject at start-up and the schema cannot see: ONNX variants whose model
    file is missing, one ``models.M.variants.V.path: model file not found: PATH`` line each.

    Not part of validation, so that a config can be checked and built where its models are not
    (tests, a build machine); ``infergate check-config`` asks for it.
    """
    missing = []
    for model_name, model in config.models.items():
        for name, variant in model.variants.items():
            backend = config.backends[variant.backend]
            if backend.kind == "onnx" and variant.path is not None and not variant.path.is_file():
                missing.append(f"models.{model_name}.variants.{name}.path: model file not found: {variant.path}")
    return missing


def parse_config(raw: dict[str, Any]) -> GatewayConfig:
    """Validate an already-loaded mapping (tests and the demo build configs in code)."""
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(str(error["loc"][-1]))
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        # Cross-field checks on the whole file already start their message with the key.
        raise ConfigError(f"{key}: {message}{more}" if key else f"{message}{more}") from exc


def _did_you_mean(key: str) -> str:
    """``"; did you mean 'max_delay_us'?"`` when a known key is close to ``key``, else ``""``."""
    import difflib

    known: set[str] = set()
    pending: list[type] = [_Model]
    while pending:
        for model in pending.pop().__subclasses__():
            known.update(model.model_fields)
            pending.append(model)
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_union_tag(part: object) -> bool:
    return part in ("triton", "onnx")


def _overlay_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Apply ``INFERGATE_A__B__C=value`` onto ``raw['a']['b']['c']`` (see ``_environment_value``)."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue  # INFERGATE_TOKEN, INFERGATE_GATEWAY and friends belong to the CLI
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if parts[0] not in GatewayConfig.model_fields:
            continue
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = _environment_value(value)


def _environment_value(value: str) -> Any:
    """A flow list or mapping (``[a, b]``, ``{k: v}``) is read as YAML; any other value stays the
    string it is and the field's type converts it (``"250"`` -> 250, ``"true"`` -> True).

    Reading every value as YAML would break ordinary strings: ``[::]:8001`` is not YAML,
    ``gw #1`` loses its ``#1`` as a comment, ``12345`` or ``on`` stop being strings, and
    ``10:30`` becomes the base-60 integer 630.
    """
    if value[:1] in ("[", "{"):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, (list, dict)):
            return parsed
    return value


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative file paths relative to the config file's folder, as users expect."""

    def fix(node: Any, key: str) -> None:
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            candidate = Path(node[key])
            if not candidate.is_absolute():
                node[key] = str(base / candidate)

    tls = (raw.get("server") or {}).get("tls") if isinstance(raw.get("server"), dict) else None
    for key in ("cert_file", "key_file", "client_ca_file"):
        fix(tls, key)
    fix(raw.get("auth"), "jwks_file")
    monitored = (raw.get("monitoring") or {}).get("models") if isinstance(raw.get("monitoring"), dict) else None
    if isinstance(monitored, dict):
        for model in monitored.values():
            fix(model, "profile")
    models = raw.get("models")
    if isinstance(models, dict):
        for model in models.values():
            variants = model.get("variants") if isinstance(model, dict) else None
            if isinstance(variants, dict):
                for variant in variants.values():
                    fix(variant, "path")


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) as a pair; raises ValueError."""
    return _split_host_port(value)
