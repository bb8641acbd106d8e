"""The entropy coder at its limit: coded size vs order-0 entropy per tensor, and throughput.

    python benchmarks/entropy.py                 # digits MLP/CNN (fp32 and pruned+clustered) + 50M weights
    python benchmarks/entropy.py --weights 5e6   # a smaller synthetic model

For every tensor the `.mpk` codes on its own it prints the coded bits per element next to the
order-0 entropy of the streams the chosen method codes (the bound an order-0 coder cannot beat);
for each model the encode time (`pack`, with the verification decode of the pass left out) and the
decode time (`unpack`, SHA-256 check included), as MB/s of ONNX bytes out of the decoder / into the
encoder. Models:

- the digits MLP and CNN of examples/zoo.py as exported (fp32), and after 90 % magnitude pruning +
  3-bit k-means (the passes run in-process, without recovery: the symbol statistics are what counts);
- a synthetic model of `--weights` weights (default 50M) in four MatMul layers, pruned to 90 % and
  clustered to 4 bits (uint4 indices, ~25 MB of ONNX), and the same weights as int8 (~50 MB).

Issue targets: coded size within 1 % of the order-0 entropy; decode at >= 50 MB/s of output.
It prints one table and replaces the `entropy` section of benchmarks/RESULTS.md. Nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import zoo
import common  # benchmarks/common.py: this script's folder is on sys.path
from modelpress.compressors.encode.mpk import describe, pack, unpack
from modelpress.compressors.model import load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune
from modelpress.compressors.quantize.kmeans import KMeansConfig, KMeansQuantize

RESULTS = REPO / "benchmarks" / "RESULTS.md"


def replace_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the ``<!-- name:begin -->`` ... ``<!-- name:end -->`` section, keeping the rest."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    common.replace_section(path, begin, end, f"{begin}\n{body.rstrip()}\n{end}\n")


def clustered(path: Path) -> bytes:
    """The model after 90 % magnitude pruning and 3-bit k-means (no recovery), serialized."""
    model = load_model(path)
    normalize(model)
    context = PassContext(seed=0)
    model = MagnitudePrune(MagnitudeConfig(sparsity=0.9, min_elements=256), context).call(model).model
    model = KMeansQuantize(KMeansConfig(bits=3, vectors=True), context).call(model).model
    return to_bytes(model)


def synthetic(weights: int, kind: str) -> bytes:
    """Four square MatMul layers holding ``weights`` weights: 90 % zeros, 4-bit k-means indices
    (``kmeans``) or int8 (``int8``). Stored as initializers only: no ORT run is needed."""
    rng = np.random.default_rng(0)
    side = int((weights / 4) ** 0.5) // 2 * 2  # even: whole bytes of packed uint4
    tensors = []
    for layer in range(4):
        w = rng.laplace(0, 1, (side, side)).astype(np.float32)
        w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0
        if kind == "kmeans":
            # 15 centroids of |w| quantiles + the exact zero at index 0: what kmeans writes.
            nz = w != 0
            edges = np.quantile(w[nz], np.linspace(0, 1, 16)[1:-1])
            idx = np.zeros(w.shape, np.uint8)
            idx[nz] = np.searchsorted(edges, w[nz]).astype(np.uint8) + 1
            flat = idx.ravel()
            packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
            tensors.append(helper.make_tensor(f"w{layer}_idx", TensorProto.UINT4, list(w.shape), packed, raw=True))
        else:
            scale = np.abs(w).max() / 127
            tensors.append(numpy_helper.from_array(np.round(w / scale).astype(np.int8), f"w{layer}_q"))
    graph = helper.make_graph([], "synthetic", [], [], initializer=tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def measure(label: str, onnx_bytes: bytes, repeats: int) -> tuple[list[list[str]], list[str]]:
    """(per-tensor rows, the model's row)."""
    encode_s, encode_wall, artifact = _best(lambda: pack(onnx_bytes)[0], repeats)
    decode_s, decode_wall, restored = _best(lambda: unpack(artifact), repeats)
    assert restored == onnx_bytes, f"{label}: round trip failed"
    info = describe(artifact)
    rows, coded, entropy = [], 0, 0.0
    for t in info["tensors"]:
        elements = t["bytes"] * 8 / max(1, {"uint4": 4, "int4": 4}.get(t["dtype"], 8 * _itemsize(t["dtype"])))
        entropy_bytes = t["entropy_bits_per_weight"] * elements / 8
        coded += t["coded_bytes"]
        entropy += entropy_bytes
        over = (t["coded_bytes"] / entropy_bytes - 1) * 100 if entropy_bytes else float("nan")
        rows.append([label, t["tensor"], t["dtype"], t["method"], f"{t['bytes']:,}", f"{t['coded_bytes']:,}",
                     f"{t['bits_per_weight']:.3f}", f"{t['entropy_bits_per_weight']:.3f}", f"{over:+.2f} %"])
    mb = len(onnx_bytes) / 1e6
    model_row = [label, f"{len(onnx_bytes):,}", f"{len(artifact):,}", f"{len(onnx_bytes) / len(artifact):.2f}x",
                 f"{(coded / entropy - 1) * 100:+.2f} %" if entropy else "-",
                 f"{mb / encode_s:.1f} ({mb / encode_wall:.1f})", f"{mb / decode_s:.1f} ({mb / decode_wall:.1f})"]
    return rows, model_row


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4}.get(dtype, 1)


def _best(run, repeats: int):
    """(best CPU seconds of this process, best wall seconds, result). The coder is single-threaded,
    so CPU time is what an idle machine's wall time would be; on a shared machine wall time is not."""
    cpu = wall = float("inf")
    result = None
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        result = run()
        cpu = min(cpu, time.process_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
    return max(cpu, 1e-9), max(wall, 1e-9), result


def command_line(script: str, argv) -> str:
    """The command that produced a section, as it would be typed."""
    return f"python benchmarks/{script}" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, default=50e6, help="weights of the synthetic model (default 50M)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per model; the best counts")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args(argv)

    models: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("mlp", zoo.build_mlp), ("cnn", zoo.build_cnn)):
            path = build(Path(tmp))
            models += [(f"digits {name} fp32", path.read_bytes()), (f"digits {name} 90 % + 3-bit", clustered(path))]
    millions = f"{args.weights / 1e6:g}M"
    models += [(f"synthetic {millions} 90 % + 4-bit", synthetic(int(args.weights), "kmeans")),
               (f"synthetic {millions} int8", synthetic(int(args.weights), "int8"))]

    tensor_rows, model_rows = [], []
    for label, onnx_bytes in models:
        rows, model_row = measure(label, onnx_bytes, args.repeats)
        tensor_rows += rows
        model_rows.append(model_row)
        print(" | ".join(model_row), flush=True)

    command = command_line("entropy.py", argv)
    body = "\n".join([
        "## Entropy coder: size vs order-0 entropy, throughput",
        "",
        f"`{command}` on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} while it ran: a machine shared with other jobs), Python {platform.python_version()}.",
        "*over entropy* = coded bytes / order-0 entropy of the coded streams − 1 (the tables, lane states "
        "and stream headers); *encode/decode MB/s* = ONNX bytes per CPU second into `pack` / out of "
        "`unpack` (single-threaded; in brackets: per wall-clock second on the shared machine), best of "
        "the repeats. `unpack` includes the SHA-256 check; `pack` excludes the pass's verification decode.",
        "On streams of a few KB the symbol table (20-40 bytes) is the 1-2 % over entropy; from ~100 KB "
        "of coded data up the coder is within 0.5 %. Small models decode slower per byte: fixed costs.",
        "",
        table(["model", "onnx bytes", "mpk bytes", "ratio", "coded over entropy", "encode MB/s", "decode MB/s"],
              model_rows),
        "",
        "Per coded tensor:",
        "",
        table(["model", "tensor", "dtype", "method", "bytes", "coded", "bits/elem", "entropy bits/elem",
               "over entropy"], tensor_rows),
    ])
    print(body)
    if not args.no_write:
        replace_section("entropy", body)


if __name__ == "__main__":
    main()
