"""PLACEHOLDER — being written by the entropy helper."""
from modelpress.compressors.pipeline import EncodePass, PassConfig


class EntropyConfig(PassConfig):
    pass


class EntropyEncode(EncodePass):
    name = "entropy"
    config_cls = EntropyConfig
    summary = "lossless entropy coding of the runnable ONNX into OUT.mpk"

    def encode(self, onnx_bytes):
        raise NotImplementedError
