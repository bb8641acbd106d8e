"""im2col rows times the flattened kernel equal onnxruntime's Conv, for every geometry ONNX allows."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.kernels.im2col import Patches


def _ort_conv(x, w, **attrs):
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("attrs", [
    {}, {"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [1, 0, 2, 1]}, {"dilations": [2, 1], "pads": [2, 1, 2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {"auto_pad": "SAME_LOWER", "strides": [2, 3]},
    {"auto_pad": "VALID", "strides": [3, 2]},
])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (5, 3)])
def test_rows_times_kernel_is_the_convolution(attrs, kernel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 11, 9)).astype(np.float32)
    w = rng.normal(size=(4, 3, *kernel)).astype(np.float32)
    expected = _ort_conv(x, w, kernel_shape=list(kernel), **attrs)
    patches = Patches(kernel, tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("pads", (0, 0, 0, 0))),
                      tuple(attrs.get("dilations", (1, 1))), attrs.get("auto_pad", "NOTSET"))
    rows = patches.rows(x)
    n, o, h, wd = expected.shape
    got = (rows @ w.reshape(4, -1).T).reshape(n, h, wd, o).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
