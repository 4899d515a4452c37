#!/usr/bin/env bash
# Tried and not kept: the full gateway with its ONNX runs in the thread pool (run_inline: never), so that
# batches could form while a run is out, against the same gateway running inline (run_inline: auto).
# Pinned: servers CPU 0, load CPU 1; c=32; 3 rounds. Run from the repository root with .venv built.
set -u
cd "$(git rev-parse --show-toplevel)"; ROOT=$PWD
PY=$PWD/.venv/bin/python; export PY
source benchmarks/pinned/setup.sh >/dev/null
sed "s/18011/18031/; s/intra_op_threads: 1}/intra_op_threads: 1, run_inline: never, pool_threads: 1}/" full.yaml > full-pool.yaml
sed "s/18011/18032/; s/intra_op_threads: 1}/intra_op_threads: 1, run_inline: never, pool_threads: 1, max_inflight_batches: 1}/" full.yaml > full-pool1.yaml
taskset -c 0 $PY -m infergate.benchmarks.lean_server --model "$WORK/mlp.onnx" --port 18016 > /tmp/x-lean.log 2>&1 & L=$!
taskset -c 0 $PY -m infergate.benchmarks.otlp_sink --port 18019 > /tmp/x-sink.log 2>&1 & S=$!
taskset -c 0 $PY -m infergate serve --config full.yaml > /tmp/x-f.log 2>&1 & F=$!
taskset -c 0 $PY -m infergate serve --config full-pool.yaml > /tmp/x-fp.log 2>&1 & FP=$!
taskset -c 0 $PY -m infergate serve --config full-pool1.yaml > /tmp/x-fp1.log 2>&1 & FP1=$!
sleep 10
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --baseline lean \
  --token "$(cat "$WORK/token.txt")" --concurrency 32 --rounds 3 --duration-s 3 --warmup-s 1 --out "$ROOT/benchmarks/results/tried_pool_batching" \
  --target lean=127.0.0.1:18016 --target-pid lean=$L \
  --target full=127.0.0.1:18011 --target-pid full=$F \
  --target full-pool=127.0.0.1:18031 --target-pid full-pool=$FP \
  --target full-pool1=127.0.0.1:18032 --target-pid full-pool1=$FP1 2>&1 | grep -E "c=32 |error" | tail -14
kill $L $S $F $FP $FP1; wait 2>/dev/null
grep -i "error\|invalid" /tmp/x-fp1.log | head -3
