"""The gateway's log lines: text or JSON format, the access log, the start-up line.

``configure_logging`` installs one stderr handler. ``logging.format: text`` is the readable
``time level logger [subject]: message``; ``json`` writes one object per line with ``time``,
``level``, ``logger``, ``message``, ``subject`` and, when a span is current (the call being
served, with tracing on), its ``trace_id`` and ``span_id``, so a line can be found from a trace
and the other way round. Structured fields a line carries (``extra={"fields": {...}}``) become
top-level keys in JSON and ``key=value`` pairs in text.

``AccessLog`` is a pipeline call observer: one line per failed call (``logging.log_failed_calls``,
at most ``ERROR_LINES_PER_S`` a second, then a count of the lines left out) and, with
``logging.access_log_sample_ratio``, a sampled share of successful calls. A line holds the model,
the variant that answered, the status, the duration, the tenant and the request id; never
metadata, so never a token.

``RefusedCalls`` records the inference calls refused before a variant serves them (a token the
auth interceptor refuses, an unknown model, a missing scope, bad tensors, a bad pin, a passed
deadline, a replica shutting down, a stream message over its rate or the memory budget): each is
counted in ``infergate_requests_total`` with ``variant=""`` and, with the access log on, gets a
failed-call line (without ``duration_ms``: timing every call to give a refusal its few
microseconds would add a clock read to the successful ones). Only the refusal branches call it.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timezone
from typing import Any

from opentelemetry import trace

from infergate.gateway import metrics
from infergate.gateway.auth.logfilter import SubjectLogFilter
from infergate.gateway.identity import Identity
from infergate.gateway.pipeline import CallRecord
from infergate.gateway.redaction import redact

ACCESS_LOGGER = "infergate.access"
INFERENCE_CALLS = frozenset({"/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelStreamInfer"})
"""The gRPC methods whose refusals by the auth interceptor count as refused inference calls."""
REFUSED_TEXT_MAX = 128
"""Characters of a refused call's model name and request id kept in its line (the caller chose them)."""
ERROR_LINES_PER_S = 20
"""Failed calls logged per second at most: an outage must not turn into a log flood."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(subject)s]: %(message)s"


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current span's ``trace_id`` and ``span_id``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "subject": getattr(record, "subject", "-"),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    """The readable format, with a line's structured fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{key}={_text(value)}" for key, value in fields.items())
        return redact(line)  # no secret in any line, tracebacks included: URL passwords, tokens, keys


def _text(value: Any) -> str:
    return value if isinstance(value, str) and value and " " not in value else json.dumps(value, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr in ``log_format`` (``text`` or ``json``) at ``level``; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SubjectLogFilter())  # [subject]: who the call being served is for, "-" outside calls
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


class AccessLog:
    """Call observer writing the access log (see the module docstring)."""

    def __init__(
        self,
        sample_ratio: float,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        errors_per_s: int = ERROR_LINES_PER_S,
        log_failed: bool = True,
    ) -> None:
        """``log_failed``: whether failed and refused calls get a line (``logging.log_failed_calls``)."""
        self._ratio = sample_ratio
        self._log_failed = log_failed
        self._random = (rng or random.Random()).random
        self._clock = clock
        self._errors_per_s = errors_per_s
        self._second = -1
        self._errors = 0
        self._suppressed = 0
        self._log = logging.getLogger(ACCESS_LOGGER)

    def observe(self, record: CallRecord) -> None:
        ok = record.code == "OK"
        if ok:
            if self._ratio <= 0 or self._random() >= self._ratio:
                return
        elif not self._log_failed or not self._error_budget():
            return
        context = record.context
        fields = {
            "model": record.endpoint.name,
            "variant": record.result.variant if record.result is not None else record.chosen,
            "status": record.code,
            "duration_ms": round(record.duration_s * 1000, 3),
            "tenant": (context.identity.tenant or context.identity.subject) if context is not None else "",
            "request_id": context.request_id if context is not None else "",
        }
        self._log.log(
            logging.INFO if ok else logging.WARNING,
            "call %s %s %s", fields["model"], fields["variant"], record.code,
            extra={"fields": fields},
        )

    def refused(self, model: str, code: str, identity: Identity | None, request_id: str) -> None:
        """A line for a call refused before routing (see ``RefusedCalls``), within the failed-call rate."""
        if not self._log_failed or not self._error_budget():
            return
        fields = {
            "model": model,
            "variant": "",
            "status": code,
            "tenant": (identity.tenant or identity.subject) if identity is not None else "",
            "request_id": request_id,
            "refused": True,
        }
        self._log.warning("refused %s %s", model or "-", code, extra={"fields": fields})

    def _error_budget(self) -> bool:
        second = int(self._clock())
        if second != self._second:
            if self._suppressed:
                self._log.warning("%d failed-call lines left out (more than %d a second)", self._suppressed,
                                  self._errors_per_s, extra={"fields": {"suppressed": self._suppressed}})
            self._second, self._errors, self._suppressed = second, 0, 0
        if self._errors >= self._errors_per_s:
            self._suppressed += 1
            return False
        self._errors += 1
        return True


class RefusedCalls:
    """Counts, and with an access log logs, inference calls refused before routing (module docstring).

    The ``model`` label is the model's name when the gateway serves one of that name, else ``""``:
    names a caller makes up must not become series. The access line keeps the name asked for.
    """

    def __init__(self, models: Collection[str], access_log: AccessLog | None = None) -> None:
        self._models = frozenset(models)
        self._access_log = access_log

    def record(self, model: str, code: str, identity: Identity | None = None, request_id: str = "") -> None:
        """One refused call: ``model`` as the caller named it, ``code`` the status name it gets."""
        metrics.REQUESTS.labels(model if model in self._models else "", "", code).inc()
        if self._access_log is not None:
            self._access_log.refused(model[:REFUSED_TEXT_MAX], code, identity, request_id[:REFUSED_TEXT_MAX])

    def auth_refused(self, method: str, code: str, identity: Identity | None) -> None:
        """A call refused before its request was decoded (by the auth check, or at the decoding edge
        for a message that does not parse or a request over the memory budget); counted only for the
        inference calls (``INFERENCE_CALLS``).

        The model is unknown (``""``); ``identity`` is the caller when the token was good (a tenant
        over its rate), else None."""
        if method in INFERENCE_CALLS:
            self.record("", code, identity)
