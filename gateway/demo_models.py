"""Small ONNX models built in code (no downloads), with numpy references of the same weights.

The demo serves them and the tests and benchmarks compare the gateway's answers with
``LinearClassifier.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime this project supports


@dataclass(frozen=True)
class LinearClassifier:
    """``SCORES = INPUT @ weights + bias`` and ``PROBS = softmax(SCORES)``, batched along axis 0."""

    weights: np.ndarray
    bias: np.ndarray
    input_name: str = "INPUT"

    @classmethod
    def random(cls, features: int = 16, classes: int = 4, seed: int = 0, input_name: str = "INPUT") -> LinearClassifier:
        rng = np.random.default_rng(seed)
        weights = rng.normal(size=(features, classes)).astype(np.float32)
        bias = rng.normal(size=(classes,)).astype(np.float32)
        return cls(weights, bias, input_name)

    @property
    def features(self) -> int:
        return self.weights.shape[0]

    @property
    def classes(self) -> int:
        return self.weights.shape[1]

    def reference(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        scores = inputs.astype(np.float32) @ self.weights + self.bias
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return {"SCORES": scores, "PROBS": shifted / shifted.sum(axis=1, keepdims=True)}

    def to_onnx(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes=[
                helper.make_node("MatMul", [self.input_name, "W"], ["XW"]),
                helper.make_node("Add", ["XW", "B"], ["SCORES"]),
                helper.make_node("Softmax", ["SCORES"], ["PROBS"], axis=1),
            ],
            name="linear_classifier",
            inputs=[helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, ["N", self.features])],
            outputs=[
                helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["N", self.classes]),
                helper.make_tensor_value_info("PROBS", TensorProto.FLOAT, ["N", self.classes]),
            ],
            initializer=[numpy_helper.from_array(self.weights, "W"), numpy_helper.from_array(self.bias, "B")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="infergate")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(self.to_onnx(), str(path))
        return path


def build_echo_bytes(path: str | Path) -> Path:
    """A model with a BYTES (string) input echoed back: ``TEXT`` [N] -> ``ECHO`` [N]."""
    graph = helper.make_graph(
        nodes=[helper.make_node("Identity", ["TEXT"], ["ECHO"])],
        name="echo_bytes",
        inputs=[helper.make_tensor_value_info("TEXT", TensorProto.STRING, ["N"])],
        outputs=[helper.make_tensor_value_info("ECHO", TensorProto.STRING, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="infergate")
    model.ir_version = IR_VERSION
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
