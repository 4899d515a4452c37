#!/usr/bin/env bash
# Usage: PY=.venv/bin/python [BEFORE_PY=...] benchmarks/pinned/hotpath.sh --concurrency 1,32 --rounds 3 --duration-s 3 --out DIR
source "$(dirname "$0")/setup.sh"
# Servers pinned to CPU 0, load (infergate bench, raw mode) pinned to CPU 1. before = commit 794d4ca (pre-hot-path), after = main.
BPY=${BEFORE_PY:?set BEFORE_PY to the python of a venv with the before commit installed}
taskset -c 0 $PY -m infergate.benchmarks.ceiling_server --port 18015 > /tmp/b-ceiling.log 2>&1 & C=$!
taskset -c 0 $PY -m infergate.benchmarks.lean_server --model "$WORK/mlp.onnx" --port 18016 > /tmp/b-lean.log 2>&1 & L=$!
taskset -c 0 $PY -m infergate.benchmarks.otlp_sink --port 18019 > /tmp/b-sink.log 2>&1 & S=$!
taskset -c 0 $BPY -m infergate serve --config plain-b.yaml > /tmp/b-pb.log 2>&1 & PB=$!
taskset -c 0 $PY -m infergate serve --config plain-a.yaml > /tmp/b-pa.log 2>&1 & PA=$!
taskset -c 0 $BPY -m infergate serve --config full-b.yaml > /tmp/b-fb.log 2>&1 & FB=$!
taskset -c 0 $PY -m infergate serve --config full.yaml > /tmp/b-fa.log 2>&1 & FA=$!
sleep 8
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 \
  --token "$(cat "$WORK/token.txt")" --baseline lean \
  --target ceiling=127.0.0.1:18015 --target-pid ceiling=$C \
  --target lean=127.0.0.1:18016 --target-pid lean=$L \
  --target plain-before=127.0.0.1:18014 --target-pid plain-before=$PB \
  --target plain-after=127.0.0.1:18013 --target-pid plain-after=$PA \
  --target full-before=127.0.0.1:18012 --target-pid full-before=$FB \
  --target full-after=127.0.0.1:18011 --target-pid full-after=$FA \
  "$@"
rc=$?
kill $C $L $S $PB $PA $FB $FA 2>/dev/null; wait 2>/dev/null
exit $rc
