"""The MLP of the pinned hot-path benchmarks: FP32 [N, 64] -> 256 -> 256 -> 2 (Gemm + Relu), built with onnx.helper."""
import numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
def mlp(path, sizes=(64, 256, 256, 2), seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "INPUT"
    for i in range(len(sizes) - 1):
        w = numpy_helper.from_array((rng.standard_normal((sizes[i], sizes[i+1])) * 0.1).astype(np.float32), f"W{i}")
        b = numpy_helper.from_array(np.zeros(sizes[i+1], np.float32), f"B{i}")
        inits += [w, b]
        out = "OUTPUT" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [out if i == len(sizes)-2 else f"g{i}"]))
        if i != len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
    onnx.save(m, path)
if __name__ == "__main__":
    import sys

    mlp(sys.argv[1] if len(sys.argv) > 1 else "mlp.onnx")
