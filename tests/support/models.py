"""ONNX model files for the tests, built in code, and configs that serve them."""

from __future__ import annotations

from pathlib import Path

from infergate.gateway.demo_models import LinearClassifier, build_echo_bytes

FEATURES = 16
CLASSES = 4


def classifier(seed: int) -> LinearClassifier:
    """The classifier every test uses for seed ``seed`` (Triton's linear_vN uses seed N)."""
    return LinearClassifier.random(features=FEATURES, classes=CLASSES, seed=seed)


def write_models(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "linear_v1": classifier(1).save(directory / "linear_v1.onnx"),
        "linear_v2": classifier(2).save(directory / "linear_v2.onnx"),
        "echo_bytes": build_echo_bytes(directory / "echo_bytes.onnx"),
    }


def onnx_config(model_paths: dict[str, Path], **model_overrides) -> dict:
    """A gateway config with ``linear`` (v1=100 on ONNX), ``ab`` (v1/v2 50/50) and ``echo``."""
    linear = {"variants": {"v1": {"backend": "onnx_cpu", "path": str(model_paths["linear_v1"]), "weight": 100}}}
    linear.update(model_overrides)
    return {
        "backends": {"onnx_cpu": {"kind": "onnx", "intra_op_threads": 1, "pool_threads": 2}},
        "models": {
            "linear": linear,
            "ab": {
                "variants": {
                    "v1": {"backend": "onnx_cpu", "path": str(model_paths["linear_v1"]), "weight": 50},
                    "v2": {"backend": "onnx_cpu", "path": str(model_paths["linear_v2"]), "weight": 50},
                }
            },
            "echo": {"variants": {"v1": {"backend": "onnx_cpu", "path": str(model_paths["echo_bytes"]), "weight": 1}}},
        },
    }
