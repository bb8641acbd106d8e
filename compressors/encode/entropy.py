"""Lossless entropy coding of the runnable model into the shipped artifact ``OUT.mpk``.

before: the final ONNX bytes (after prune and quantize).
after:  an ``.mpk`` artifact (format: docs/mpk-format.md). Every tensor payload of 512 bytes or
more is coded on its own under its own order-0 distribution (ANS): int8/uint8 as bytes, int4 as
nibbles, wider types as byte planes, mostly-zero tensors as a zero mask plus the nonzero values,
zlib or raw when that is smaller. The rest of the protobuf (graph, names, small tensors) is LZMA2
compressed. ``modelpress decode`` restores the ONNX bytes exactly; the pass checks that round
trip before returning, so a coder bug can never ship an artifact that decodes wrong.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from modelpress.compressors.encode.mpk import pack, unpack
from modelpress.compressors.pipeline import EncodePass, PassConfig


class EntropyConfig(PassConfig):
    level: int = Field(9, ge=0, le=9,
                       description="LZMA2 preset of the graph skeleton and zlib level of the zlib fallback: 0 fastest, 9 smallest")
    verify: bool = Field(True, description="decode the artifact once and compare bytes before shipping it")


class EntropyEncode(EncodePass):
    name = "entropy"
    config_cls = EntropyConfig
    summary = ("lossless ANS coding of every tensor (+ LZMA2 of the graph) into OUT.mpk; "
               "decode restores the .onnx byte for byte")

    def encode(self, onnx_bytes: bytes) -> tuple[bytes, dict[str, Any]]:
        artifact, stats = pack(onnx_bytes, level=self.config.level)
        if self.config.verify and unpack(artifact) != onnx_bytes:
            raise RuntimeError("the artifact does not decode to the model it was made from")
        stats["verified"] = self.config.verify
        return artifact, stats
