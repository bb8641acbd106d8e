"""modelpress: compress ONNX models (prune -> quantize -> encode) and measure the result.

The code lives in three top-level folders installed under this namespace:
``modelpress.cli`` (the only place that prints or exits), ``modelpress.compressors``
(passes, pipeline, recipes, benchmark) and ``modelpress.kernels`` (array math, no ONNX).
"""

__version__ = "0.1.0"
