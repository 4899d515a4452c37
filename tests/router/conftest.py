"""Fixtures for the router tests: a clock that moves only when told to and a recording backend."""

from __future__ import annotations

import pytest

from tests.router.fakes import FakeClock, RecordingBackend


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend(clock) -> RecordingBackend:
    return RecordingBackend(clock)
