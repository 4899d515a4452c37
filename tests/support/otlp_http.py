"""A real OTLP/HTTP trace receiver for the tests (what Triton's OpenTelemetry mode exports to).

``OtlpHttpReceiver`` listens on a free loopback port and accepts ``POST /v1/traces`` in both OTLP/HTTP
encodings: binary protobuf (``application/x-protobuf``) and JSON (``application/json``, which
Triton's exporter, opentelemetry-cpp, sends). Either is decoded into opentelemetry-proto's
``ExportTraceServiceRequest`` and every span is kept, so tests read the same ``Span`` messages as
from the OTLP/gRPC receiver. The JSON encoding writes trace and span ids as hex strings (the OTLP
spec's exception to protobuf's JSON mapping, which would use base64); they are turned back into
bytes before parsing.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

TRACES_PATH = "/v1/traces"
_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP JSON's hex ids in protobuf JSON's base64, everywhere in ``node`` (spans, links)."""
    if isinstance(node, dict):
        return {
            key: base64.b64encode(bytes.fromhex(value)).decode() if key in _HEX_ID_FIELDS and isinstance(value, str)
            else _hex_ids_to_base64(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_hex_ids_to_base64(item) for item in node]
    return node


def parse_export(body: bytes, content_type: str) -> trace_service_pb2.ExportTraceServiceRequest:
    """One OTLP/HTTP export body, protobuf or JSON; raises ValueError when it is neither."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    if content_type.startswith("application/json"):
        json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), request, ignore_unknown_fields=True)
    elif content_type.startswith("application/x-protobuf"):
        request.ParseFromString(body)
    else:
        raise ValueError(f"unsupported content type {content_type!r}")
    return request


class OtlpHttpReceiver:
    """Keeps every span exported to ``url`` as ``(resource attributes, Span)``; ``stop`` when done."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], Any]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                content_type = self.headers.get("Content-Type", "")
                try:
                    if self.path != TRACES_PATH:
                        raise ValueError(f"unexpected path {self.path}")
                    request = parse_export(body, content_type)
                except Exception as exc:  # a bad export is recorded for the test and refused
                    with receiver._lock:
                        receiver.errors.append(f"{type(exc).__name__}: {exc}")
                    self.send_error(400)
                    return
                receiver._keep(request)
                reply = trace_service_pb2.ExportTraceServiceResponse()
                payload = json_format.MessageToJson(reply).encode() if content_type.startswith("application/json") else reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", content_type.split(";")[0])
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{TRACES_PATH}"

    def start(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _keep(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)

    def spans_of(self, service: str) -> list[Any]:
        """The spans received so far from the exporter whose ``service.name`` is ``service``."""
        with self._lock:
            return [span for resource, span in self.spans if resource.get("service.name") == service]
