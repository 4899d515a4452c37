"""The dynamic batcher against a recording backend, with time under the test's control.

The clock is a ``FakeClock`` that never moves unless a test moves it, so "max_delay_us has not
passed yet" holds for as long as a test needs, and nothing here sleeps on wall-clock time.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from infergate.gateway.config import BatchingConfig
from infergate.gateway.errors import BackendUnavailable, DeadlineExceeded, GatewayError, Unavailable
from infergate.router.batcher import Batcher, group_key
from tests.router.fakes import FakeClock, RecordingBackend

pytestmark = pytest.mark.usefixtures("no_task_leaks")

FOREVER_US = 3_600_000_000
"""A max_delay_us the fake clock never reaches unless a test advances it."""
DEADLINE_S = 30.0


@pytest.fixture
async def make_batcher(backend: RecordingBackend, clock: FakeClock):
    """``make_batcher(**batching)`` builds and starts a batcher; all are stopped after the test."""
    started: list[Batcher] = []

    async def make(
        max_rows: int = 8, max_delay_us: int = FOREVER_US, max_queue: int = 64, preferred=(), max_inflight: int = 4,
        dispatch: str = "delay",
    ):
        config = BatchingConfig(
            max_batch_size=max_rows,
            max_delay_us=max_delay_us,
            max_queue=max_queue,
            preferred_batch_sizes=preferred,
            dispatch=dispatch,
        )
        batcher = Batcher(
            backend, "model", config, max_rows=max_rows, max_inflight=max_inflight, model="m", variant="v", clock=clock
        )
        await batcher.start()
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        await batcher.close()


def rows(first: int, count: int = 1, width: int = 4) -> dict[str, np.ndarray]:
    """``count`` distinct rows of ``width`` values, as the converters would hand them over."""
    values = np.arange(first * 100, first * 100 + count * width, dtype=np.float32).reshape(count, width)
    return {"INPUT": np.frombuffer(values.tobytes(), dtype="<f4").reshape(count, width)}


async def settle() -> None:
    """Let every ready task run until the loop is quiet."""
    for _ in range(20):
        await asyncio.sleep(0)


def submit(batcher: Batcher, clock: FakeClock, inputs, outputs=("DOUBLE",), deadline_s: float = DEADLINE_S) -> asyncio.Task:
    return asyncio.create_task(batcher.infer("model", inputs, list(outputs), clock() + deadline_s))


async def code_of(task: asyncio.Task) -> grpc.StatusCode:
    with pytest.raises(GatewayError) as err:
        await task
    return err.value.code


async def test_concurrent_requests_become_one_backend_call_and_each_gets_its_own_rows(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=8)
    inputs = [rows(i) for i in range(8)]
    answers = await asyncio.gather(*(batcher.infer("model", x, ["DOUBLE"], clock() + DEADLINE_S) for x in inputs))
    assert [call.rows for call in backend.calls] == [8]
    for x, answer in zip(inputs, answers):
        np.testing.assert_array_equal(answer["DOUBLE"], x["INPUT"] * 2)
        assert answer["DOUBLE"].shape == (1, 4)


async def test_batch_inputs_are_the_callers_rows_in_order(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=3)
    inputs = [rows(1), rows(2, count=2)]
    await asyncio.gather(*(batcher.infer("model", x, ["DOUBLE"], clock() + DEADLINE_S) for x in inputs))
    np.testing.assert_array_equal(backend.calls[0].inputs["INPUT"], np.concatenate([x["INPUT"] for x in inputs]))


async def test_a_partial_batch_waits_until_max_delay_has_passed(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=8, max_delay_us=500_000)
    first = submit(batcher, clock, rows(1))
    await settle()
    assert backend.calls == [] and batcher.depth == 1
    clock.advance(0.6)
    # Any arrival wakes the dispatcher; one with another shape goes to its own group.
    other = submit(batcher, clock, rows(2, width=3))
    answer = await first
    assert [call.rows for call in backend.calls] == [1]
    np.testing.assert_array_equal(answer["DOUBLE"], rows(1)["INPUT"] * 2)
    assert batcher.depth == 1  # the other group is still within its own delay
    await batcher.close()
    assert await code_of(other) == grpc.StatusCode.UNAVAILABLE


async def test_zero_delay_sends_a_lone_request_at_once(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=8, max_delay_us=0)
    answer = await batcher.infer("model", rows(1), ["DOUBLE"], clock() + DEADLINE_S)
    np.testing.assert_array_equal(answer["DOUBLE"], rows(1)["INPUT"] * 2)
    assert [call.rows for call in backend.calls] == [1]


async def test_a_preferred_size_is_sent_without_waiting(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=16, preferred=(4,))
    answers = await asyncio.gather(*(batcher.infer("model", rows(i), ["DOUBLE"], clock() + DEADLINE_S) for i in range(4)))
    assert [call.rows for call in backend.calls] == [4]
    assert len(answers) == 4


async def test_multi_row_requests_never_make_a_batch_over_max_rows(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=4)
    inputs = [rows(1, count=3), rows(2, count=1), rows(3, count=2), rows(4, count=2)]
    answers = await asyncio.gather(*(batcher.infer("model", x, ["DOUBLE"], clock() + DEADLINE_S) for x in inputs))
    assert [call.rows for call in backend.calls] == [4, 4]
    for x, answer in zip(inputs, answers):
        np.testing.assert_array_equal(answer["DOUBLE"], x["INPUT"] * 2)


async def test_different_trailing_shapes_or_dtypes_are_never_mixed(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=2)
    wide = [rows(1, width=4), rows(2, width=4)]
    narrow = [rows(3, width=2), rows(4, width=2)]
    answers = await asyncio.gather(
        *(batcher.infer("model", x, ["DOUBLE"], clock() + DEADLINE_S) for pair in zip(wide, narrow) for x in pair)
    )
    assert sorted(call.inputs["INPUT"].shape for call in backend.calls) == [(2, 2), (2, 4)]
    for x, answer in zip([x for pair in zip(wide, narrow) for x in pair], answers):
        np.testing.assert_array_equal(answer["DOUBLE"], x["INPUT"] * 2)
    as_float64 = {"INPUT": rows(1)["INPUT"].astype(np.float64)}
    assert group_key(as_float64) != group_key(rows(1))


async def test_each_caller_gets_only_the_outputs_it_asked_for(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=2)
    doubled, summed = await asyncio.gather(
        batcher.infer("model", rows(1), ["DOUBLE"], clock() + DEADLINE_S),
        batcher.infer("model", rows(2), ["ROWSUM"], clock() + DEADLINE_S),
    )
    assert backend.calls[0].outputs == ["DOUBLE", "ROWSUM"]
    assert set(doubled) == {"DOUBLE"} and set(summed) == {"ROWSUM"}
    np.testing.assert_array_equal(summed["ROWSUM"], rows(2)["INPUT"].sum(axis=1))


async def test_a_backend_failure_reaches_every_waiter_of_the_batch(make_batcher, backend, clock):
    backend.error = BackendUnavailable("model server gone")
    batcher = await make_batcher(max_rows=4)
    tasks = [submit(batcher, clock, rows(i)) for i in range(4)]
    codes = [await code_of(task) for task in tasks]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4
    assert len(backend.calls) == 1


async def test_an_answer_with_the_wrong_row_count_is_internal_for_every_waiter(make_batcher, backend, clock):
    backend.wrong_rows = True
    batcher = await make_batcher(max_rows=2)
    tasks = [submit(batcher, clock, rows(i)) for i in range(2)]
    assert [await code_of(task) for task in tasks] == [grpc.StatusCode.INTERNAL] * 2


async def test_queue_full_is_refused_at_once_with_unavailable(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=100, max_queue=3)
    queued = [submit(batcher, clock, rows(i)) for i in range(2)]
    await settle()
    with pytest.raises(Unavailable) as err:
        await batcher.infer("model", rows(9, count=2), ["DOUBLE"], clock() + DEADLINE_S)  # 2 + 2 > 3 rows
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "queue full" in err.value.message
    queued.append(submit(batcher, clock, rows(3)))  # one more row still fits
    await settle()
    assert batcher.depth == 3
    with pytest.raises(Unavailable):
        await batcher.infer("model", rows(10), ["DOUBLE"], clock() + DEADLINE_S)
    assert backend.calls == []
    await batcher.close()
    assert [await code_of(task) for task in queued] == [grpc.StatusCode.UNAVAILABLE] * 3


async def test_a_request_whose_deadline_passed_in_the_queue_never_reaches_the_backend(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=2)
    late = submit(batcher, clock, rows(1), deadline_s=5)
    await settle()
    clock.advance(6)  # past the first request's deadline (its own timer, in real time, is far off)
    on_time = submit(batcher, clock, rows(2))
    # Two rows queued make a full batch; the expired one is dropped from it, not sent.
    assert await code_of(late) == grpc.StatusCode.DEADLINE_EXCEEDED
    answer = await on_time
    np.testing.assert_array_equal(answer["DOUBLE"], rows(2)["INPUT"] * 2)
    assert [call.rows for call in backend.calls] == [1]
    np.testing.assert_array_equal(backend.calls[0].inputs["INPUT"], rows(2)["INPUT"])


async def test_a_deadline_already_past_is_refused_before_queueing(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=1)
    with pytest.raises(DeadlineExceeded) as err:
        await batcher.infer("model", rows(1), ["DOUBLE"], clock() - 0.001)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await settle()
    assert backend.calls == [] and batcher.depth == 0


async def test_a_caller_that_waits_past_its_deadline_gets_deadline_exceeded_and_frees_its_place(make_batcher, backend):
    batcher = await make_batcher(max_rows=8, max_queue=1)
    # The fake clock is frozen, so only the waiter's own timer (0.05 s of loop time) can fire.
    with pytest.raises(DeadlineExceeded) as err:
        await batcher.infer("model", rows(1), ["DOUBLE"], backend._clock() + 0.05)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert batcher.depth == 0
    assert backend.calls == []


async def test_the_backend_gets_the_latest_deadline_of_the_callers_in_the_batch(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=3)
    now = clock()
    await asyncio.gather(*(batcher.infer("model", rows(i), ["DOUBLE"], now + d) for i, d in enumerate((50, 20, 40))))
    assert backend.calls[0].deadline == now + 50


async def test_a_short_deadline_ends_only_its_own_call_not_its_batch_mates(make_batcher, backend, clock):
    backend.hold = asyncio.Event()
    batcher = await make_batcher(max_rows=2, dispatch="idle", max_inflight=1)
    blocker = submit(batcher, clock, rows(0))
    await settle()  # the backend is busy: the next two gather into one batch
    short = asyncio.create_task(batcher.infer("model", rows(1), ["DOUBLE"], backend._clock() + 0.05))
    long = submit(batcher, clock, rows(2))
    await settle()
    release_first, backend.hold = backend.hold, asyncio.Event()  # the next batch waits on a new event
    release_first.set()
    await blocker
    await settle()  # the batch [short, long] is at the backend now, held past the short caller's deadline
    assert await code_of(short) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not long.done()
    backend.hold.set()
    answer = await long
    np.testing.assert_array_equal(answer["DOUBLE"], rows(2)["INPUT"] * 2)
    assert [call.rows for call in backend.calls] == [1, 2]


async def test_idle_dispatch_sends_a_lone_request_at_once(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=8, dispatch="idle")
    # The fake clock never moves: with delay dispatch this request would wait forever.
    answer = await batcher.infer("model", rows(3), ["DOUBLE"], clock() + DEADLINE_S)
    np.testing.assert_array_equal(answer["DOUBLE"], rows(3)["INPUT"] * 2)
    assert [call.rows for call in backend.calls] == [1]


async def test_idle_dispatch_gathers_requests_while_the_backend_is_busy(make_batcher, backend, clock):
    backend.hold = asyncio.Event()
    batcher = await make_batcher(max_rows=4, dispatch="idle", max_inflight=1)
    first = submit(batcher, clock, rows(0))
    await settle()
    later = [submit(batcher, clock, rows(i)) for i in range(1, 7)]
    await settle()
    assert batcher.depth == 6
    backend.hold.set()
    answers = await asyncio.gather(first, *later)
    # One row alone, then everything that gathered, in batches of at most max_rows.
    assert [call.rows for call in backend.calls] == [1, 4, 2]
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(answer["DOUBLE"], rows(i)["INPUT"] * 2)


async def test_idle_dispatch_sends_a_lone_request_from_the_callers_task_without_queueing(make_batcher, backend, clock):
    backend.hold = asyncio.Event()
    batcher = await make_batcher(max_rows=8, dispatch="idle", max_inflight=2)
    now = clock()
    first = asyncio.create_task(batcher.infer("model", rows(0), ["DOUBLE"], now + 7))
    second = asyncio.create_task(batcher.infer("model", rows(1), ["DOUBLE"], now + 9))
    await settle()
    # Both slots taken by callers sent at once, each alone and on its own deadline; nothing queued.
    assert batcher.inflight == 2 and batcher.depth == 0
    assert [(call.rows, call.deadline) for call in backend.calls] == [(1, now + 7), (1, now + 9)]
    third = [submit(batcher, clock, rows(i)) for i in (2, 3)]
    await settle()
    assert batcher.depth == 2  # every slot busy: these gather
    backend.hold.set()
    answers = await asyncio.gather(first, second, *third)
    assert [call.rows for call in backend.calls] == [1, 1, 2]
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(answer["DOUBLE"], rows(i)["INPUT"] * 2)
    assert batcher.inflight == 0


async def test_a_request_sent_alone_gets_its_errors_and_frees_its_slot(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=4, dispatch="idle", max_inflight=1)
    backend.script = [BackendUnavailable("model server gone")]
    assert await code_of(submit(batcher, clock, rows(1))) == grpc.StatusCode.UNAVAILABLE
    backend.wrong_rows = True
    assert await code_of(submit(batcher, clock, rows(2))) == grpc.StatusCode.INTERNAL
    backend.wrong_rows = False
    answer = await batcher.infer("model", rows(3), ["DOUBLE"], clock() + DEADLINE_S)
    np.testing.assert_array_equal(answer["DOUBLE"], rows(3)["INPUT"] * 2)
    assert batcher.inflight == 0 and batcher.depth == 0


async def test_a_cancelled_request_sent_alone_frees_its_slot_for_the_queue(make_batcher, backend, clock):
    backend.hold = asyncio.Event()
    batcher = await make_batcher(max_rows=4, dispatch="idle", max_inflight=1)
    alone = submit(batcher, clock, rows(0))
    await settle()
    queued = submit(batcher, clock, rows(1))
    await settle()
    assert batcher.inflight == 1 and batcher.depth == 1
    alone.cancel()
    await settle()
    # The queued request goes out on the slot the cancelled one left (it waits at the held backend).
    assert batcher.depth == 0 and batcher.inflight == 1
    backend.hold.set()
    np.testing.assert_array_equal((await queued)["DOUBLE"], rows(1)["INPUT"] * 2)
    assert alone.cancelled()


async def test_a_cancelled_caller_frees_its_place_and_is_skipped(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=4, max_queue=4, preferred=(2,))
    gone = submit(batcher, clock, rows(1, count=3))
    stays = submit(batcher, clock, rows(2, width=2))  # another group; neither group is ready
    await settle()
    assert batcher.depth == 4
    gone.cancel()
    await settle()
    assert gone.cancelled()
    assert batcher.depth == 1
    # Two more rows fit only because the cancelled rows left the queue; they make a preferred size.
    arrived = await asyncio.gather(*(batcher.infer("model", rows(i), ["DOUBLE"], clock() + DEADLINE_S) for i in (3, 4)))
    assert [call.inputs["INPUT"].shape for call in backend.calls] == [(2, 4)]
    np.testing.assert_array_equal(backend.calls[0].inputs["INPUT"], np.concatenate([rows(3)["INPUT"], rows(4)["INPUT"]]))
    np.testing.assert_array_equal(arrived[1]["DOUBLE"], rows(4)["INPUT"] * 2)
    await batcher.close()
    assert await code_of(stays) == grpc.StatusCode.UNAVAILABLE


async def test_requests_gather_while_every_backend_slot_is_busy(make_batcher, backend, clock):
    backend.hold = asyncio.Event()
    batcher = await make_batcher(max_rows=8, max_delay_us=0, max_inflight=1)
    first = submit(batcher, clock, rows(0))
    await settle()
    assert batcher.inflight == 1
    waiting = [submit(batcher, clock, rows(i)) for i in range(1, 6)]
    await settle()
    assert batcher.depth == 5
    backend.hold.set()
    await asyncio.gather(first, *waiting)
    assert [call.rows for call in backend.calls] == [1, 5]


async def test_stop_fails_queued_requests_with_unavailable_and_refuses_new_ones(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=8)
    queued = submit(batcher, clock, rows(1))
    await settle()
    await batcher.close()
    assert await code_of(queued) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(Unavailable):
        await batcher.infer("model", rows(2), ["DOUBLE"], clock() + DEADLINE_S)
    assert batcher.depth == 0
    assert backend.calls == []


async def test_batch_size_and_queue_wait_are_recorded(make_batcher, backend, clock):
    labels = {"model": "m", "variant": "v"}
    before = REGISTRY.get_sample_value("infergate_batch_size_sum", labels) or 0.0
    count_before = REGISTRY.get_sample_value("infergate_queue_wait_seconds_count", labels) or 0.0
    batcher = await make_batcher(max_rows=4)
    await asyncio.gather(*(batcher.infer("model", rows(i), ["DOUBLE"], clock() + DEADLINE_S) for i in range(4)))
    assert REGISTRY.get_sample_value("infergate_batch_size_sum", labels) - before == 4
    assert REGISTRY.get_sample_value("infergate_queue_wait_seconds_count", labels) - count_before == 4
    assert REGISTRY.get_sample_value("infergate_queue_depth", labels) == 0


async def test_a_full_group_goes_out_while_an_older_group_waits_out_its_delay(make_batcher, backend, clock):
    batcher = await make_batcher(max_rows=2)
    older = submit(batcher, clock, rows(1, width=2))
    await settle()
    full = await asyncio.gather(*(batcher.infer("model", rows(i), ["DOUBLE"], clock() + DEADLINE_S) for i in (2, 3)))
    assert [call.inputs["INPUT"].shape for call in backend.calls] == [(2, 4)]
    assert len(full) == 2 and not older.done()
    await batcher.close()
    assert await code_of(older) == grpc.StatusCode.UNAVAILABLE
