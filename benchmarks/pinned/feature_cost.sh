#!/usr/bin/env bash
# Usage: PY=.venv/bin/python [BEFORE_PY=...] benchmarks/pinned/feature_cost.sh --concurrency 1,32 --rounds 3 --duration-s 3 --out DIR
source "$(dirname "$0")/setup.sh"
# Feature cost, side by side: each gateway differs from f-plain by one feature. Servers on CPU 0, load on CPU 1.

taskset -c 0 $PY -m infergate.benchmarks.otlp_sink --port 18019 > /tmp/f-sink.log 2>&1 & S=$!
args=(); pids=()
for f in plain auth 2var trace batch; do
  taskset -c 0 $PY -m infergate serve --config f-$f.yaml > /tmp/f-$f.log 2>&1 & p=$!; pids+=($p)
  port=$(grep -oP 'listen: 127.0.0.1:\K\d+' f-$f.yaml | head -1); args+=(--target $f=127.0.0.1:$port --target-pid $f=$p)
done
sleep 8
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --token "$(cat "$WORK/token.txt")" --baseline plain "${args[@]}" "$@"
rc=$?; kill $S "${pids[@]}" 2>/dev/null; wait 2>/dev/null; exit $rc
