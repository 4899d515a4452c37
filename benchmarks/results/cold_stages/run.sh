#!/usr/bin/env bash
# Where the CPU of one served call goes, stage by stage, while the servers run under load (cold caches),
# against what the in-process harness (benchmarks/handler_cost.py) sees with warm caches.
#
# stages.patch (measurement only, never merged) adds thread_time_ns marks at the stage boundaries of the
# plain path (gateway/_t.py prints the per-call means at exit), a CPU timer around the lean server's
# handler and its ONNX run, and INFERGATE_NOMETRICS=1, which turns every prometheus-client update into
# a no-op. Each mark costs about 1 µs (a clock_gettime system call): 13 marks add about 13 µs to the
# stage total. The patch goes on a temporary worktree of COMMIT with a copy of the checkout's venv.
# COMMIT defaults to 0efe0f3, where these figures were taken: the patch's metrics switch predates the
# deferred metric updates (f71139c); for later commits, benchmarks/results/deferred_metrics/ has the
# same marks without the switch.
#
#   benchmarks/results/cold_stages/run.sh [COMMIT]      (from the repository root; needs .venv)
set -eu
ROOT=$(pwd)
COMMIT=${1:-0efe0f3}
source "$ROOT/benchmarks/pinned/worktree.sh"
patched_worktree "$COMMIT" "$ROOT/benchmarks/results/cold_stages/stages.patch"; WT=$REPLY
PY=$WT/.venv/bin/python; export PY
source "$ROOT/benchmarks/pinned/setup.sh" >/dev/null
for p in 18021 18022; do sed "s/18013/$p/" plain-a.yaml > stages-$p.yaml; done
sed "s/18011/18024/" full.yaml > stages-18024.yaml
cd "$WT"
taskset -c 0 $PY -m infergate.benchmarks.lean_server --model "$WORK/mlp.onnx" --port 18016 > /tmp/stages-lean.log 2>&1 & L=$!
INFERGATE_T=1 taskset -c 0 $PY -m infergate serve --config "$WORK/stages-18021.yaml" > /tmp/stages-plain.log 2>&1 & G1=$!
INFERGATE_T=1 INFERGATE_NOMETRICS=1 taskset -c 0 $PY -m infergate serve --config "$WORK/stages-18022.yaml" > /tmp/stages-nometrics.log 2>&1 & G2=$!
INFERGATE_T=1 taskset -c 0 $PY -m infergate serve --config "$WORK/stages-18024.yaml" > /tmp/stages-full.log 2>&1 & G4=$!
sleep 10
$PY -m infergate bench --load raw --model mlp --features 64 --client-cpus 1 --server-cpus 0 --baseline lean \
  --token "$(cat "$WORK/token.txt")" --concurrency 32 --rounds 3 --duration-s 3 --warmup-s 1 \
  --out "$ROOT/benchmarks/results/cold_stages" \
  --target lean=127.0.0.1:18016 --target-pid lean=$L \
  --target plain=127.0.0.1:18021 --target-pid plain=$G1 \
  --target plain-nometrics=127.0.0.1:18022 --target-pid plain-nometrics=$G2 \
  --target full=127.0.0.1:18024 --target-pid full=$G4
kill -INT $G1 $G2 $G4; kill $L; wait 2>/dev/null || true
for name in lean plain nometrics full; do echo "$name: $(grep -hE '^(calls|stages)' /tmp/stages-$name.log | tr '\n' ' ')"; done \
  | tee "$ROOT/benchmarks/results/cold_stages/stages.txt"
