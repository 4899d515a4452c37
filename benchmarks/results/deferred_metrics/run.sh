#!/usr/bin/env bash
# Deferred metric updates, before and after, side by side: plain and full from BEFORE and AFTER, with
# the lean server as the baseline, pinned (servers CPU 0, load CPU 1), c=32, 5 rounds. stages.patch
# (the cold_stages marks without its metrics switch; measurement only) also prints each gateway's
# CPU per call inside its handler, stage by stage, at exit.
#
#   benchmarks/results/deferred_metrics/run.sh BEFORE AFTER      (from the repository root; needs .venv)
set -eu
ROOT=$(pwd)
BEFORE=$1 AFTER=$2
OUT=$ROOT/benchmarks/results/deferred_metrics
source "$ROOT/benchmarks/pinned/worktree.sh"
patched_worktree "$BEFORE" "$OUT/stages.patch"; B=$REPLY
patched_worktree "$AFTER" "$OUT/stages.patch"; A=$REPLY
PY=$A/.venv/bin/python; export PY
source "$ROOT/benchmarks/pinned/setup.sh" >/dev/null
sed "s/18013/18021/" plain-a.yaml > dm-plain-before.yaml; sed "s/18013/18022/" plain-a.yaml > dm-plain-after.yaml
sed "s/18011/18024/" full.yaml > dm-full-before.yaml; sed "s/18011/18025/" full.yaml > dm-full-after.yaml
taskset -c 0 $PY -m infergate.benchmarks.lean_server --model "$WORK/mlp.onnx" --port 18016 > /tmp/dm-lean.log 2>&1 & L=$!
(cd "$B" && INFERGATE_T=1 exec taskset -c 0 .venv/bin/python -m infergate serve --config "$WORK/dm-plain-before.yaml") > /tmp/dm-plain-before.log 2>&1 & PB=$!
(cd "$A" && INFERGATE_T=1 exec taskset -c 0 .venv/bin/python -m infergate serve --config "$WORK/dm-plain-after.yaml") > /tmp/dm-plain-after.log 2>&1 & PA=$!
(cd "$B" && INFERGATE_T=1 exec taskset -c 0 .venv/bin/python -m infergate serve --config "$WORK/dm-full-before.yaml") > /tmp/dm-full-before.log 2>&1 & FB=$!
(cd "$A" && INFERGATE_T=1 exec taskset -c 0 .venv/bin/python -m infergate serve --config "$WORK/dm-full-after.yaml") > /tmp/dm-full-after.log 2>&1 & FA=$!
sleep 12
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --baseline lean \
  --token "$(cat "$WORK/token.txt")" --concurrency 32 --rounds 5 --duration-s 3 --warmup-s 1 --out "$OUT" \
  --target lean=127.0.0.1:18016 --target-pid lean=$L \
  --target plain-before=127.0.0.1:18021 --target-pid plain-before=$PB \
  --target plain-after=127.0.0.1:18022 --target-pid plain-after=$PA \
  --target full-before=127.0.0.1:18024 --target-pid full-before=$FB \
  --target full-after=127.0.0.1:18025 --target-pid full-after=$FA
kill -INT $PB $PA $FB $FA; kill $L; wait 2>/dev/null || true
for name in plain-before plain-after full-before full-after; do echo "$name: $(grep -h '^stages' /tmp/dm-$name.log)"; done | tee "$OUT/stages.txt"
