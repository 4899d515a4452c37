#!/usr/bin/env bash
# uvloop re-measured pinned (BENCHMARKS.md, "Tried, and not kept"): the plain gateway with and without
# uvloop's event loop, side by side. uvloop is not a dependency of infergate: UVLOOP_PY is the python
# of a copy of the venv with `pip install uvloop` added (0.23.0 was used).
# Usage: PY=$PWD/.venv/bin/python UVLOOP_PY=/tmp/uvvenv/bin/python bash benchmarks/results/uvloop_pinned/run.sh
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
source "$ROOT/benchmarks/pinned/setup.sh" >/dev/null
sed 's/18021/18061/' f-plain.yaml > f-uvloop.yaml
taskset -c 0 $PY -m infergate serve --config f-plain.yaml > /tmp/u1.log 2>&1 & A=$!
taskset -c 0 $UVLOOP_PY -c 'import runpy, sys, uvloop; uvloop.install(); sys.argv = ["infergate", *sys.argv[1:]]; runpy.run_module("infergate", run_name="__main__", alter_sys=True)' \
  serve --config f-uvloop.yaml > /tmp/u2.log 2>&1 & B=$!
sleep 7
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --no-plot --baseline plain \
  --machine "2-core CPU sandbox (AMD EPYC), no GPU" \
  --target plain=127.0.0.1:18021 --target-pid plain=$A --target uvloop=127.0.0.1:18061 --target-pid uvloop=$B \
  --concurrency 1,32 --rounds 5 --duration-s 3 --warmup-s 1 --out "$ROOT/benchmarks/results/uvloop_pinned"
kill $A $B; wait
