#!/usr/bin/env bash
# Does the gateway's server set-up (grpc options, maximum_concurrent_rpcs, services, DecodingRegistry's
# wrapper) cost anything per call? const.patch (measurement only, never merged) makes the gateway's
# ModelInfer wrapper answer a fixed response: INFERGATE_X=const-unary at once, const-opened after the
# auth check, the memory budget and the request parse. Compared with the ceiling server (a fixed
# answer from a bare grpc.aio server), the lean server and the plain gateway, in the same rounds.
#
#   benchmarks/results/cold_stages/const.sh [COMMIT]      (from the repository root; needs .venv)
set -eu
ROOT=$(pwd)
COMMIT=${1:-HEAD}
source "$ROOT/benchmarks/pinned/worktree.sh"
patched_worktree "$COMMIT" "$ROOT/benchmarks/results/cold_stages/const.patch"; WT=$REPLY
PY=$WT/.venv/bin/python; export PY
source "$ROOT/benchmarks/pinned/setup.sh" >/dev/null
for p in 18021 18022 18023; do sed "s/18013/$p/" plain-a.yaml > const-$p.yaml; done
cd "$WT"
taskset -c 0 $PY -m infergate.benchmarks.ceiling_server --port 18015 > /tmp/const-ceiling.log 2>&1 & C=$!
taskset -c 0 $PY -m infergate.benchmarks.lean_server --model "$WORK/mlp.onnx" --port 18016 > /tmp/const-lean.log 2>&1 & L=$!
INFERGATE_X=const-unary taskset -c 0 $PY -m infergate serve --config "$WORK/const-18021.yaml" > /tmp/const-1.log 2>&1 & G1=$!
INFERGATE_X=const-opened taskset -c 0 $PY -m infergate serve --config "$WORK/const-18022.yaml" > /tmp/const-2.log 2>&1 & G2=$!
taskset -c 0 $PY -m infergate serve --config "$WORK/const-18023.yaml" > /tmp/const-3.log 2>&1 & G3=$!
sleep 10
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --baseline ceiling \
  --concurrency 32 --rounds 3 --duration-s 3 --warmup-s 1 --out "$ROOT/benchmarks/results/cold_stages/const" \
  --target ceiling=127.0.0.1:18015 --target-pid ceiling=$C \
  --target gateway-fixed=127.0.0.1:18021 --target-pid gateway-fixed=$G1 \
  --target gateway-fixed-after-parse=127.0.0.1:18022 --target-pid gateway-fixed-after-parse=$G2 \
  --target lean=127.0.0.1:18016 --target-pid lean=$L \
  --target plain=127.0.0.1:18023 --target-pid plain=$G3
kill $C $L $G1 $G2 $G3; wait 2>/dev/null || true
