#!/usr/bin/env python3
"""Write the example model repository the compose stack serves (deploy/models/ by default).

    python deploy/make_model_repo.py [OUT]        # OUT defaults to deploy/models

Two linear classifiers (FP32 INPUT [N, 16] -> SCORES, PROBS [N, 4]), built in code with
``onnx.helper`` (``infergate.gateway.demo_models.LinearClassifier``, seeds 1 and 2), laid out the way
Triton reads a repository and the gateway's ONNX fallback reads files:

    OUT/classifier_v1/config.pbtxt
    OUT/classifier_v1/1/model.onnx
    OUT/classifier_v2/...
    OUT/SHA256SUMS          # `sha256sum -c` format; put a digest in a variant's `sha256:` to pin it

The compose stack runs this script in a one-shot container (service ``model-repo``) into a named
volume, so nothing has to be installed on the host; running it by hand needs the package installed
(``pip install -e .``). The output is written whole each time.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from infergate.gateway.demo_models import LinearClassifier

FEATURES = 16
CLASSES = 4
MAX_BATCH_SIZE = 64
MODELS = {"classifier_v1": 1, "classifier_v2": 2}
"""Triton model name -> seed of its weights."""

TRITON_CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [{{ name: "INPUT", data_type: TYPE_FP32, dims: [{features}] }}]
output [
  {{ name: "SCORES", data_type: TYPE_FP32, dims: [{classes}] }},
  {{ name: "PROBS", data_type: TYPE_FP32, dims: [{classes}] }}
]
# No instance_group: Triton puts one instance on each GPU it sees, or on the CPU when it sees none.
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
"""


def write_repository(out: Path) -> dict[Path, str]:
    """Write every model and SHA256SUMS under ``out``; return the SHA-256 of each ONNX file."""
    for name in MODELS:
        shutil.rmtree(out / name, ignore_errors=True)
    digests: dict[Path, str] = {}
    for name, seed in MODELS.items():
        model = LinearClassifier.random(features=FEATURES, classes=CLASSES, seed=seed)
        path = model.save(out / name / "1" / "model.onnx")
        (out / name / "config.pbtxt").write_text(
            TRITON_CONFIG.format(name=name, max_batch_size=MAX_BATCH_SIZE, features=FEATURES, classes=CLASSES),
            encoding="utf-8",
        )
        digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    lines = [f"{digest}  {path.relative_to(out).as_posix()}\n" for path, digest in digests.items()]
    (out / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path(__file__).resolve().parent / "models")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, digest in write_repository(args.out).items():
        print(f"{digest}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
