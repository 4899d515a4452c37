"""Admin commands over the RoutingAdmin API: ``routes``, ``canary set|promote|rollback|status``, ``audit``.

The connection options (``--gateway``, ``--token``, ``--json``, TLS files, ``--timeout-s``) are
declared once, in ``_connection_options``; every admin command is an ``AdminCommand``, which adds
them after its own parameters and hands the command one ``Connection``. Each command talks to
one gateway (``--gateway HOST:PORT`` or ``INFERGATE_GATEWAY``), sends ``authorization: Bearer
<token>`` when ``--token``/``INFERGATE_TOKEN`` is given, prints a table by default and JSON with
``--json``, and on a gRPC error prints ``infergate: <STATUS>: <message>`` and
exits 1 (2 for bad arguments). Any replica will do: the change is stored in Redis and every replica
applies it.
"""

from __future__ import annotations

import datetime
import inspect
import json
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import grpc
import typer
from typer.core import TyperCommand
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as pb
from infergate.gateway._proto.infergate.admin.v1 import admin_pb2_grpc as pb_grpc

from infergate.gateway.cli.common import EXIT_ERROR, EXIT_USAGE

DEFAULT_GATEWAY = "127.0.0.1:8001"

GatewayOption = Annotated[
    str, typer.Option("--gateway", envvar="INFERGATE_GATEWAY", help="Gateway address HOST:PORT (any replica).")
]
TokenOption = Annotated[
    str, typer.Option("--token", envvar="INFERGATE_TOKEN", help="Bearer token with the admin:routes scope.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
CaFileOption = Annotated[
    Optional[Path], typer.Option("--ca-file", envvar="INFERGATE_CA_FILE", help="CA of the gateway's TLS certificate (turns TLS on).")
]
CertFileOption = Annotated[
    Optional[Path], typer.Option("--cert-file", envvar="INFERGATE_CERT_FILE", help="Client certificate (mutual TLS; with --key-file).")
]
KeyFileOption = Annotated[
    Optional[Path], typer.Option("--key-file", envvar="INFERGATE_KEY_FILE", help="Client private key (mutual TLS; with --cert-file).")
]
TimeoutOption = Annotated[float, typer.Option("--timeout-s", help="Deadline of each call.")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; recorded in the audit log.")]


def _connection_options(
    gateway: GatewayOption = DEFAULT_GATEWAY,
    token: TokenOption = "",
    as_json: JsonOption = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
    timeout_s: TimeoutOption = 10.0,
) -> None:
    """The options every admin command takes, declared once; ``AdminCommand`` adds them to each."""


def connection_options() -> list:
    """``_connection_options``' parameters as typer makes them (help, env vars, defaults, types)."""
    options = typer.Typer(add_completion=False)
    options.command()(_connection_options)
    names = set(inspect.signature(_connection_options).parameters)
    return [param for param in typer.main.get_command(options).params if param.name in names]


class AdminCommand(TyperCommand):
    """An admin command: its own parameters plus the connection options, which it takes out of the
    parsed values and hands to the command as one ``Connection`` (``connection(ctx)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(connection_options())

    def invoke(self, ctx: typer.Context) -> Any:
        values = {name: ctx.params.pop(name) for name in inspect.signature(_connection_options).parameters}
        for name in ("ca_file", "cert_file", "key_file"):
            values[name] = Path(values[name]) if values[name] is not None else None
        ctx.meta[_CONNECTION] = Connection(**values)
        return super().invoke(ctx)


_CONNECTION = "infergate.admin.connection"


def connection(ctx: typer.Context) -> Connection:
    """The connection options of the admin command being run."""
    return ctx.meta[_CONNECTION]


commands = typer.Typer()
canary_app = typer.Typer(no_args_is_help=True, help="Change a model's variant weights: by hand, or see the automated canary.")
commands.add_typer(canary_app, name="canary")


# -- the connection ------------------------------------------------------------------------------


RETRY_OPTIONS = [
    ("grpc.enable_retries", 1),
    (
        "grpc.service_config",
        json.dumps({"methodConfig": [{
            "name": [{"service": "infergate.admin.v1.RoutingAdmin"}],
            "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }]}),
    ),
]
"""A call that meets UNAVAILABLE is tried again; safe for changes, which carry an idempotency key."""


class AdminClient:
    """A blocking RoutingAdmin client; gRPC errors surface as ``grpc.RpcError``."""

    def __init__(
        self,
        gateway: str,
        token: str = "",
        ca_file: Path | None = None,
        timeout_s: float = 10.0,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        if ca_file is not None or cert_file is not None or key_file is not None:
            from infergate.gateway.tls import TlsOptionsError, client_tls

            try:
                tls = client_tls(ca_file, cert_file, key_file)
                assert tls is not None
                self._channel = grpc.secure_channel(gateway, tls.channel_credentials(), options=RETRY_OPTIONS)
            except TlsOptionsError as exc:
                _fail_usage(str(exc))
        else:
            self._channel = grpc.insecure_channel(gateway, options=RETRY_OPTIONS)
        self.stub = pb_grpc.RoutingAdminStub(self._channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout_s = timeout_s

    def call(self, method: str, request: Message) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout_s)

    def watch(self, model: str) -> Iterator[pb.RouteEvent]:
        return self.stub.WatchRoutes(pb.WatchRoutesRequest(model=model), metadata=self.metadata)

    def close(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class Connection:
    """The options every admin command takes: where the gateway is, how to talk to it, how to print."""

    gateway: str
    token: str
    as_json: bool
    ca_file: Path | None
    timeout_s: float
    cert_file: Path | None = None
    key_file: Path | None = None

    def client(self) -> AdminClient:
        return AdminClient(self.gateway, self.token, self.ca_file, self.timeout_s, self.cert_file, self.key_file)

    def call(self, method: str, request: Message) -> Any:
        """One unary call; a gRPC error prints its status and exits 1."""
        client = self.client()
        try:
            return client.call(method, request)
        except grpc.RpcError as exc:
            _fail_rpc(exc)
        finally:
            client.close()


def _fail_rpc(exc: grpc.RpcError) -> None:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    typer.echo(f"infergate: {code.name}: {details}", err=True)
    raise typer.Exit(EXIT_ERROR)


def _fail_usage(message: str) -> None:
    typer.echo(f"infergate: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


# -- commands ------------------------------------------------------------------------------------


@commands.command("routes", cls=AdminCommand)
def routes(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="One model (default: every model).")] = "",
    watch: Annotated[bool, typer.Option("--watch", help="Keep printing route changes as they happen.")] = False,
) -> None:
    """Show models with their variants, weights, revision and health (--watch: follow changes)."""
    conn = connection(ctx)
    if watch:
        _watch(model, conn)
        return
    if model:
        found = [conn.call("GetRoute", pb.GetRouteRequest(model=model)).route]
    else:
        found = list(conn.call("ListRoutes", pb.ListRoutesRequest()).routes)
    if conn.as_json:
        _print_json({"routes": [_to_dict(route) for route in found]})
    else:
        _print_routes(found)


@canary_app.command("set", cls=AdminCommand)
def canary_set(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name.")],
    weights: Annotated[list[str], typer.Argument(help="VARIANT=WEIGHT pairs, e.g. v1=90 v2=10 (others go to 0).")],
    reason: ReasonOption = "",
    expect_revision: Annotated[
        int, typer.Option("--expect-revision", help="Refuse (ABORTED) unless the route is at this revision; 0 skips.")
    ] = 0,
) -> None:
    """Set a model's weights atomically (rejected whole when any part is wrong)."""
    conn = connection(ctx)
    request = pb.SetWeightsRequest(
        model=model, weights=parse_weights(weights), expected_revision=expect_revision, reason=reason,
        request_id=uuid.uuid4().hex,
    )
    _print_change(conn.call("SetWeights", request), conn.as_json)


@canary_app.command("promote", cls=AdminCommand)
def canary_promote(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name.")],
    variant: Annotated[str, typer.Argument(help="Variant to give all traffic.")],
    reason: ReasonOption = "",
) -> None:
    """VARIANT to 100, every other variant to 0."""
    conn = connection(ctx)
    request = pb.PromoteRequest(model=model, variant=variant, reason=reason, request_id=uuid.uuid4().hex)
    _print_change(conn.call("Promote", request), conn.as_json)


@canary_app.command("rollback", cls=AdminCommand)
def canary_rollback(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name.")],
    reason: ReasonOption = "",
) -> None:
    """Back to the baseline (the model's first variant in config) at 100."""
    conn = connection(ctx)
    request = pb.RollbackRequest(model=model, reason=reason, request_id=uuid.uuid4().hex)
    _print_change(conn.call("Rollback", request), conn.as_json)


@canary_app.command("status", cls=AdminCommand)
def canary_status(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name.")],
) -> None:
    """The route and the automated canary's progress (state, step, last reason, leading replica)."""
    conn = connection(ctx)
    route = conn.call("GetRoute", pb.GetRouteRequest(model=model)).route
    if conn.as_json:
        _print_json(_to_dict(route))
        return
    _print_routes([route])
    canary = route.canary
    console = _console()
    if not canary.enabled:
        console.print(_literal(f"{model}: no automated canary (no canary block, or no Redis)"))
        return
    leader = "unknown (route store unreachable)" if route.stale else canary.leader or "none"
    step = f"step {canary.step}/{canary.steps}" if canary.step else f"not started ({canary.steps} steps)"
    console.print(_literal(f"canary of {canary.candidate}: {canary.state}, {step}, {canary.current_percent}% | leader: {leader}"))
    if canary.HasField("last_window"):
        _print_window(canary)
    if canary.last_reason:
        console.print(_literal(f"last: {canary.last_reason}"))


@commands.command("audit", cls=AdminCommand)
def audit(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="One model (default: every model).")] = "",
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Newest entries to show.")] = 20,
) -> None:
    """Who changed which route, when, from which weights to which, and why (newest first)."""
    conn = connection(ctx)
    response = conn.call("GetAuditLog", pb.GetAuditLogRequest(model=model, limit=limit))
    if conn.as_json:
        _print_json({"entries": [_to_dict(entry) for entry in response.entries]})
        return
    table = Table(title="route changes, newest first")
    for column in ("time (UTC)", "model", "rev", "subject", "action", "from", "to", "reason"):
        table.add_column(column, overflow="fold")
    for entry in response.entries:
        table.add_row(*map(_literal, (
            _time(entry.time_unix_s), entry.model, str(entry.revision), entry.subject, entry.action,
            _weights_text(entry.old_weights), _weights_text(entry.new_weights), entry.reason,
        )))
    _print_table(table)


# -- helpers -------------------------------------------------------------------------------------


def parse_weights(pairs: Sequence[str]) -> dict[str, int]:
    """``["v1=90", "v2=10"]`` as a dict; bad syntax exits 2 naming the pair."""
    weights: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value.strip().isdigit():
            _fail_usage(f"weights: expected VARIANT=WEIGHT with a whole number, got {pair!r}")
        if name in weights:
            _fail_usage(f"weights: variant {name!r} given twice")
        weights[name] = int(value)
    return weights


def _watch(model: str, conn: Connection) -> None:
    client = conn.client()
    try:
        for event in client.watch(model):
            if conn.as_json:
                print(json.dumps(_to_dict(event)), flush=True)
            else:
                _print_routes([event.route])
                if event.HasField("change"):
                    change = event.change
                    _console().print(_literal(
                        f"{_time(change.time_unix_s)} {change.subject} {change.action}: "
                        f"{_weights_text(change.old_weights)} -> {_weights_text(change.new_weights)} {change.reason}"
                    ))
                sys.stdout.flush()
    except grpc.RpcError as exc:
        _fail_rpc(exc)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def _print_window(canary: pb.CanaryStatus) -> None:
    """The last judged window: baseline beside candidate, and the limits they were judged against."""
    window, limits = canary.last_window, canary.limits
    end = window.start_unix_s + window.length_s
    table = Table(title=f"last judged window {_time(window.start_unix_s)} to {_time(end)[11:]} UTC: {window.verdict}")
    for column in ("variant", "role", "calls", "errors", "error ratio", "p99", "accuracy"):
        table.add_column(column, overflow="fold")
    for role, stats in (("baseline", window.baseline), ("candidate", window.candidate)):
        table.add_row(*map(_literal, (
            stats.variant, role, str(stats.requests), str(stats.errors), f"{stats.error_ratio:.3f}",
            f"{stats.p99_ms:.1f} ms" if stats.p99_ms else "n/a",
            f"{stats.accuracy:.3f} ({stats.labelled} labels)" if stats.labelled else "no labels",
        )))
    _print_table(table)
    _console().print(_literal(
        f"judged when the candidate has {limits.min_requests} calls: error ratio <= baseline + "
        f"{limits.max_error_rate_increase:g}, p99 <= {limits.max_p99_latency_ratio:g} x baseline, accuracy >= "
        f"baseline - {limits.max_accuracy_decrease:g} (with {limits.min_labels} labels each)"
    ))


def _print_change(response: pb.RouteChangeResponse, as_json: bool) -> None:
    if as_json:
        _print_json(_to_dict(response.route))
    else:
        _print_routes([response.route])


def _print_routes(found: Sequence[pb.Route]) -> None:
    stale = [route for route in found if route.stale]
    if stale:
        since = min(route.stale_since_unix_s for route in stale)
        _console().print(_literal(
            f"STALE: {stale[0].replica or 'this replica'} cannot reach the route store (Redis) since {_time(since)} UTC; "
            f"below are the routes it is serving from memory (other replicas may differ; changes fail until Redis is back)"
        ))
    table = Table(title="STALE routes (Redis unreachable)" if stale else None)
    for column in ("model", "rev", "variant", "weight", "share", "health", "backend", "fallback", "notes"):
        table.add_column(column, overflow="fold")
    for route in found:
        total = sum(v.weight for v in route.variants) or 1
        for index, variant in enumerate(route.variants):
            notes = []
            if variant.name == route.baseline:
                notes.append("baseline")
            if variant.name == route.shadow_variant:
                notes.append(f"shadow {route.shadow_percent}%")
            if route.canary.enabled and variant.name == route.canary.candidate:
                notes.append(f"canary {route.canary.state}")
            if route.stale:
                notes.append("stale")
            table.add_row(*map(_literal, (
                route.model if index == 0 else "",
                str(route.revision) if index == 0 else "",
                variant.name,
                str(variant.weight),
                f"{100 * variant.weight / total:.1f}%",
                variant.health,
                variant.backend,
                variant.fallback,
                ", ".join(notes),
            )))
        table.add_section()
    _print_table(table)


def _print_table(table: Table) -> None:
    """Never truncated: piped, the table takes the width it needs (rich would assume 80 columns);
    on a narrow terminal, long cells fold onto a second line instead of ending in an ellipsis.
    Stored text (reasons, subjects, names) comes from other people: it is never read as rich
    markup, emoji codes or highlighting."""
    if sys.stdout.isatty():
        _console().print(table)
    else:
        _console(width=100_000, soft_wrap=True).print(table)


def _console(**options) -> Console:
    return Console(markup=False, emoji=False, highlight=False, **options)


def _literal(value: str) -> Text:
    """``value`` as plain text, with control characters (terminal escapes) shown escaped."""
    return Text("".join(char if char.isprintable() else char.encode("unicode_escape").decode() for char in value))


def _to_dict(message: Message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _time(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _weights_text(weights) -> str:
    return " ".join(f"{name}={weights[name]}" for name in sorted(weights)) or "-"
