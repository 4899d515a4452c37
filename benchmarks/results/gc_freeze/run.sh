#!/usr/bin/env bash
# GC pauses of the plain gateway under 20 s of pinned c=32 load, before (BEFORE_PY: a venv with
# commit 3c6a890 installed) and after gc.freeze() at start-up (PY: this checkout).
# Usage: PY=.venv/bin/python BEFORE_PY=... bash benchmarks/results/gc_freeze/run.sh
set -u
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
source "$ROOT/benchmarks/pinned/setup.sh" >/dev/null
for v in before after; do
  if [ $v = before ]; then PYP=$BEFORE_PY; else PYP=$PY; fi
  GCOUT=/tmp/gc-$v.txt taskset -c 0 $PYP "$ROOT/benchmarks/gc_pauses.py" serve --config f-plain.yaml > /tmp/g-$v.log 2>&1 & D=$!
  sleep 7
  port=$(grep -oP 'listen: 127.0.0.1:\K\d+' f-plain.yaml | head -1)
  kill -USR1 $D
  $PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --no-plot \
    --target $v=127.0.0.1:$port --target-pid $v=$D --concurrency 32 --rounds 1 --duration-s 20 --warmup-s 1 --out /tmp/gcexp | grep "c=32  "
  kill -USR1 $D; sleep 0.5; kill $D; wait $D
  cat /tmp/gc-$v.txt
done
