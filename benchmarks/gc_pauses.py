"""Run ``infergate`` with the garbage collector's pauses counted: on SIGUSR1 one line per signal is
appended to ``$GCOUT`` (default ``gc-pauses.txt``): collections and seconds spent per generation
since start, process CPU seconds, and how many objects the collector tracks.

    taskset -c 0 python -m infergate.benchmarks.gc_pauses serve --config gateway.yaml &
    kill -USR1 $!   # before the load, and again after it: the difference is the load's share

Used for the "Garbage collection" figures in BENCHMARKS.md (``gc.freeze()`` after start-up).
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import time

_counts = [0, 0, 0]
_seconds = [0.0, 0.0, 0.0]
_started: dict[int, float] = {}


def _on_gc(phase: str, info: dict) -> None:
    generation = info["generation"]
    if phase == "start":
        _started[generation] = time.perf_counter()
    elif generation in _started:
        _counts[generation] += 1
        _seconds[generation] += time.perf_counter() - _started.pop(generation)


def _dump(*_args) -> None:
    with open(os.environ.get("GCOUT", "gc-pauses.txt"), "a") as out:
        out.write(f"pid {os.getpid()} collections {_counts} seconds {[round(s, 4) for s in _seconds]} "
                  f"cpu_s {time.process_time():.2f} tracked {len(gc.get_objects())}\n")


if __name__ == "__main__":
    gc.callbacks.append(_on_gc)
    signal.signal(signal.SIGUSR1, _dump)
    sys.argv = ["infergate", *sys.argv[1:]]
    runpy.run_module("infergate", run_name="__main__", alter_sys=True)
