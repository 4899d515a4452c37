#!/usr/bin/env bash
# The full gateway beside plain and each one-feature gateway, in one pinned run (BENCHMARKS.md, third pass).
# Usage: PY=$PWD/.venv/bin/python bash benchmarks/results/full_vs_features/run.sh
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
source "$ROOT/benchmarks/pinned/setup.sh" >/dev/null

taskset -c 0 $PY -m infergate.benchmarks.otlp_sink --port 18019 > /tmp/c-sink.log 2>&1 & S=$!
args=(); pids=()
for f in f-plain f-auth f-2var f-trace f-batch full; do
  taskset -c 0 $PY -m infergate serve --config $f.yaml > /tmp/$f.log 2>&1 & p=$!; pids+=($p)
  port=$(grep -oP 'listen: "?127.0.0.1:\K\d+' $f.yaml | head -1); args+=(--target $f=127.0.0.1:$port --target-pid $f=$p)
done
sleep 9
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --no-plot --token "$(cat token.txt)" --baseline f-plain "${args[@]}" \
  --concurrency 32 --rounds 5 --duration-s 3 --warmup-s 1 --out "$ROOT/benchmarks/results/full_vs_features" 2>&1 | tail -1
kill $S "${pids[@]}"; wait
