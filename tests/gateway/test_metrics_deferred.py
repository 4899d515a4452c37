"""Call-path metric updates are deferred (``metrics.record``) and applied in bulk: a collection of
the registry (a scrape) sees every update made before it, the queue stays bounded, and updates
queued and applied from different threads are each applied once."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import REGISTRY, Counter, Histogram

from infergate.gateway import metrics

COUNTER = Counter("infergate_test_deferred", "test only", ["case"])
HISTOGRAM = Histogram("infergate_test_deferred_seconds", "test only", ["case"], buckets=(0.1, 1.0))


def _count(case: str) -> float:
    return REGISTRY.get_sample_value("infergate_test_deferred_total", {"case": case}) or 0.0


def test_a_recorded_update_waits_for_the_next_collection_which_sees_it():
    child = COUNTER.labels("collect")
    metrics.flush()
    before = child._value.get()
    metrics.record(child.inc, 1)
    metrics.record(child.inc, 2)
    assert child._value.get() == before  # queued, not applied: nothing on the call path but an append
    assert _count("collect") == before + 3  # the registry flushes before it collects
    histogram, labels = HISTOGRAM.labels("collect"), {"case": "collect"}
    count, low = (REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in (
        ("infergate_test_deferred_seconds_count", labels), ("infergate_test_deferred_seconds_bucket", {**labels, "le": "0.1"})))
    metrics.record(histogram.observe, 0.05)
    metrics.record(histogram.observe, 0.5)
    assert REGISTRY.get_sample_value("infergate_test_deferred_seconds_count", labels) == count + 2
    assert REGISTRY.get_sample_value("infergate_test_deferred_seconds_bucket", {**labels, "le": "0.1"}) == low + 1


def test_the_queue_is_applied_once_it_holds_flush_at_updates():
    child = COUNTER.labels("bounded")
    metrics.flush()
    before = child._value.get()
    for _ in range(metrics.FLUSH_AT - 1):
        metrics.record(child.inc, 1)
    assert child._value.get() == before
    metrics.record(child.inc, 1)  # the FLUSH_AT-th: applied with the rest, by the call that queued it
    assert child._value.get() == before + metrics.FLUSH_AT


def test_updates_queued_while_another_thread_flushes_are_each_applied_once():
    """The scrape's thread flushes while the loop's thread queues (and flushes at FLUSH_AT)."""
    child = COUNTER.labels("threads")
    before = _count("threads")
    per_thread, stop = 20_000, threading.Event()

    def queue_updates() -> None:
        for _ in range(per_thread):
            metrics.record(child.inc, 1)

    def scrape_meanwhile() -> None:
        while not stop.is_set():
            metrics.flush()

    scraper = threading.Thread(target=scrape_meanwhile)
    writers = [threading.Thread(target=queue_updates) for _ in range(2)]
    scraper.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    scraper.join()
    assert _count("threads") == before + 2 * per_thread


async def test_a_worker_of_several_applies_its_updates_on_a_timer_and_once_more_when_stopped():
    """With several workers the supervisor reads files, not this queue: the timer writes them."""
    child = COUNTER.labels("timer")
    metrics.flush()
    before = child._value.get()
    flusher = asyncio.create_task(metrics.flush_periodically(0.01))
    metrics.record(child.inc, 1)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if child._value.get() == before + 1:
            break
    assert child._value.get() == before + 1
    metrics.record(child.inc, 1)
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    assert child._value.get() == before + 2


def test_an_update_that_raises_is_skipped_and_the_rest_still_apply(caplog):
    """A bad update (a counter asked to go down) must fail neither the call that queues it nor a scrape."""
    child = COUNTER.labels("bad")
    metrics.flush()
    before = child._value.get()
    metrics.record(child.inc, 1)
    metrics.record(child.inc, -1)  # prometheus-client refuses a negative counter increment
    metrics.record(child.inc, 1)
    assert _count("bad") == before + 2
    assert "metric update" in caplog.text and "failed; skipped" in caplog.text
