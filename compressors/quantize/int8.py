"""PLACEHOLDER — being written by the int8 helper."""
from modelpress.compressors.pipeline import Pass, PassConfig


class Int8Config(PassConfig):
    pass


class Int8Quantize(Pass):
    name = "int8"
    stage = "quantize"
    config_cls = Int8Config
    summary = "int8 quantization, placed per op where the CPU runs it faster"

    def call(self, model):
        raise NotImplementedError
