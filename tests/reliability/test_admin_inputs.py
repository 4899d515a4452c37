"""Admin inputs and the admin CLI (issue 9, items 9 and 13), on a real gateway and a real Redis.

Item 9, classes of defect: unbounded admin input went into Redis, its pubsub and the audit log (a
40 MB reason overflowed Redis output buffers); a retried write ran again (3 calls, 5 revisions);
one oversized entry made ``GetAuditLog`` unreadable. Now every input is bounded, every change
carries an idempotency key (the client's ``request_id``, else one per call, so the Redis client's
own retry cannot apply it twice either), and audit reads cut fields inside Redis.

Item 13: the CLI printed stored text (reasons, subjects) as rich markup; ``[/]`` crashed it and
escape sequences reached the terminal. Now stored text is printed literally.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
import redis

from infergate.gateway._proto.infergate.admin.v1 import admin_pb2 as pb
from infergate.gateway._proto.infergate.admin.v1.admin_pb2_grpc import RoutingAdminStub
from infergate.router.audit import MAX_FIELD_CHARS, audit_key
from infergate.router.state import MAX_REASON_CHARS

pytestmark = pytest.mark.reliability

HOSTILE_REASON = "[/] [bold]x[/bold] :smile: [link=http://evil]y[/link] \x1b[2J\x1b]0;title\x07 end"
CLI_TIMEOUT_S = 60


@pytest.fixture
def admin(channel) -> RoutingAdminStub:
    return RoutingAdminStub(channel)


def revision(admin: RoutingAdminStub, model: str = "ab") -> int:
    return admin.GetRoute(pb.GetRouteRequest(model=model), timeout=10).route.revision


def test_a_retried_change_is_made_once(admin):
    before = revision(admin)
    request = pb.SetWeightsRequest(model="ab", weights={"v1": 70, "v2": 30}, reason="retried", request_id=uuid.uuid4().hex)
    answers = [admin.SetWeights(request, timeout=10).route.revision for _ in range(3)]
    assert answers == [before + 1] * 3
    assert revision(admin) == before + 1
    entries = admin.GetAuditLog(pb.GetAuditLogRequest(model="ab", limit=10), timeout=10).entries
    assert sum(1 for entry in entries if entry.reason == "retried") == 1
    # A new key is a new change.
    other = pb.PromoteRequest(model="ab", variant="v1", reason="again", request_id=uuid.uuid4().hex)
    assert admin.Promote(other, timeout=10).route.revision == before + 2


@pytest.mark.parametrize("request_message", [
    pb.SetWeightsRequest(model="ab", weights={"v1": 1}, reason="r" * (MAX_REASON_CHARS + 1)),
    pb.SetWeightsRequest(model="ab", weights={f"v{i}": 1 for i in range(5000)}),
    pb.SetWeightsRequest(model="ab", weights={"v1": 1}, request_id="k" * 129),
    pb.PromoteRequest(model="ab", variant="v1", reason="r" * 100_000),
    pb.RollbackRequest(model="ab", reason="r" * 100_000),
], ids=["reason", "weights", "request_id", "promote reason", "rollback reason"])
def test_admin_inputs_over_their_bounds_are_refused_and_change_nothing(admin, request_message):
    before = revision(admin)
    method = {pb.SetWeightsRequest: admin.SetWeights, pb.PromoteRequest: admin.Promote, pb.RollbackRequest: admin.Rollback}
    with pytest.raises(grpc.RpcError) as err:
        method[type(request_message)](request_message, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert revision(admin) == before


def test_the_audit_log_stays_readable_whatever_was_stored(admin, redis_server):
    """Entries as an older version or another writer left them: 3 MB reasons, fields that are not JSON."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        for _ in range(3):
            client.xadd(audit_key("ab"), {"model": "ab", "time": "x", "subject": "s" * 3_000_000, "action": "set_weights",
                                          "old": "{not json", "new": "[1,2]", "reason": "é" * 3_000_000, "revision": "NaN"})
    finally:
        client.close()
    entries = admin.GetAuditLog(pb.GetAuditLogRequest(model="ab", limit=50), timeout=10).entries
    assert len(entries) >= 3
    newest = entries[0]
    assert 0 < len(newest.reason.encode()) <= MAX_FIELD_CHARS and set(newest.reason) == {"é"}
    assert len(newest.subject) <= MAX_FIELD_CHARS
    assert dict(newest.old_weights) == {} and newest.revision == 0


def cli(gateway_url: str, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infergate", *args, "--gateway", gateway_url],
                          capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "COLUMNS": "400"})


def test_the_cli_prints_stored_text_literally(admin, hostile_gateway):
    admin.SetWeights(pb.SetWeightsRequest(model="ab", weights={"v1": 60, "v2": 40}, reason=HOSTILE_REASON), timeout=10)
    result = cli(hostile_gateway.url, "audit", "ab", "--limit", "3")
    assert result.returncode == 0, result.stderr
    assert "[/] [bold]x[/bold] :smile: [link=http://evil]y[/link]" in result.stdout
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2J" in result.stdout


def test_routes_watch_prints_stored_text_literally(admin, hostile_gateway):
    watcher = subprocess.Popen([sys.executable, "-m", "infergate", "routes", "ab", "--watch", "--gateway", hostile_gateway.url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "400"})
    try:
        time.sleep(3)  # the watcher prints the current route first, then changes
        admin.SetWeights(pb.SetWeightsRequest(model="ab", weights={"v1": 55, "v2": 45}, reason=HOSTILE_REASON), timeout=10)
        time.sleep(3)
        assert watcher.poll() is None, watcher.stderr.read()  # still watching: it did not crash on the markup
    finally:
        watcher.terminate()
        out, err = watcher.communicate(timeout=30)
    assert "MarkupError" not in err and "Traceback" not in err
    assert "[/] [bold]x[/bold]" in out and "\x1b" not in out
