"""``infergate`` on uvloop's event loop, for the side-by-side measurement in BENCHMARKS.md
("Tried, and not kept"): ``python -m infergate.benchmarks.uvloop_serve serve --config ...`` in an
environment with ``uvloop`` installed (it is not a dependency of infergate)."""

from __future__ import annotations

import runpy
import sys

if __name__ == "__main__":
    import uvloop

    uvloop.install()  # asyncio.run() in `infergate serve` then runs on uvloop
    sys.argv = ["infergate", *sys.argv[1:]]
    runpy.run_module("infergate", run_name="__main__", alter_sys=True)
