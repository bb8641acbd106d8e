"""The machine the numbers were measured on: runtime versions, CPU model and the CPU features
(ISA flags) that decide which kernels ONNX Runtime can use, for the report's ``environment``; and
whether this CPU's int8 kernels saturate (the int8 pass's ``reduce_range: auto``)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np

# CPU features that decide which kernels ONNX Runtime can use (int8 dot products above all).
RELEVANT_ISA = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",  # x86
    "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2",  # Arm
)


def environment(threads: int) -> dict[str, Any]:
    """What the numbers depend on: runtime versions, CPU model and features, threads."""
    import onnx
    import onnxruntime as ort

    cpu, flags = _cpuinfo()
    return {
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "isa": [flag for flag in RELEVANT_ISA if flag in flags],
        "threads": threads,
        "platform": sys.platform,
    }


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if not name and key in ("model name", "Hardware", "Model", "cpu model"):
                    name = value
                elif not flags and key in ("flags", "Features"):
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown", flags


def int8_pairs_saturate() -> bool:
    """Does this CPU run ORT's u8 x s8 int8 kernels with AVX2's VPMADDUBSW, whose int16 sums of
    product pairs saturate for large weights? True on x86 with AVX2 and no VNNI (avx512_vnni,
    avx_vnni) or AMX int8 dot products; ORT's documentation advises reduced-range weights there."""
    _, flags = _cpuinfo()
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
