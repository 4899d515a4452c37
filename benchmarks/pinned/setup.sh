#!/usr/bin/env bash
# Shared set-up of the pinned hot-path benchmarks: WORK gets the MLP models (64-256-256-2, built
# with onnx.helper), a development RSA key with its JWKS and a token, and the gateway configs with
# their paths pointing into WORK. Sourced by hotpath.sh and feature_cost.sh.
set -eu
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${WORK:-/tmp/infergate-pinned}
PY=${PY:-python}
mkdir -p "$WORK"
"$PY" "$HERE/mlp.py" "$WORK/mlp.onnx" && cp "$WORK/mlp.onnx" "$WORK/mlp_v2.onnx"
[ -f "$WORK/key.pem" ] || openssl genrsa -out "$WORK/key.pem" 2048 2>/dev/null
"$PY" -m infergate jwks "$WORK/key.pem" --kid k1 > "$WORK/jwks.json"
"$PY" -m infergate token --key "$WORK/key.pem" --kid k1 --scope "infer:*" --issuer https://auth.bench \
  --audience infergate --ttl-s 7200 2>/dev/null > "$WORK/token.txt"
for f in "$HERE"/*.yaml; do sed "s#/work/bench#$WORK#g" "$f" > "$WORK/$(basename "$f")"; done
cd "$WORK"
