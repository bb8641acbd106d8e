"""What drives int8 placement, measured on this machine, and the int8 pass against ORT's quantizer.

    python benchmarks/int8_placement.py [--threads 1] [--part ops|zoo|all] [--batch 1]

``ops``: one op at small and transformer-ish sizes in each form the pass could emit or that other
tools emit — fp32; weight-only ``Cast(int8)*scale`` (what modelpress emits; ORT folds it at load);
``DequantizeLinear`` on the weight (ORT runs it every time, or turns DQ->MatMul into MatMulNBits);
dynamic (DynamicQuantizeLinear + MatMulInteger, fused to DynamicQuantizeMatMul); static QDQ
(QLinearMatMul / QLinearConv); ConvInteger (what ``quantize_dynamic`` emits for Conv).
``zoo``: the digits models: fp32 vs ``int8`` (mode auto, placed for ``--batch`` samples per run)
vs ``quantize_dynamic(per_channel=True)``: file size, accuracy, agreement with fp32, latency at
``--batch`` (1 by default, as ``modelpress compress`` times it; interleaved rounds, medians).

Times are µs per run, median of interleaved rounds; on a shared machine run it twice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from modelpress.compressors.model import load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.quantize.int8 import Int8Config, Int8Quantize, time_models
from modelpress.kernels import quant

REPO = Path(__file__).resolve().parents[1]
MATMULS = [(1, 64, 300), (64, 64, 300), (64, 300, 100), (64, 100, 10), (512, 256, 64), (1, 768, 768),
           (128, 768, 768), (128, 768, 3072)]
CONVS = [(64, 1, 16, 8), (1, 16, 32, 8), (64, 16, 32, 8), (1, 32, 64, 32), (1, 64, 64, 56), (1, 128, 128, 14)]


def _model(nodes, initializers, x_shape):
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _qdq(x, y, x_range, y_range, extra):
    """Q/DQ on ``x`` (-> ``x_dq``) and on ``y`` (-> the graph output ``y``)."""
    xp, yp = quant.activation_qparams(*x_range), quant.activation_qparams(*y_range)
    extra.update(xs=xp.scale, xz=xp.zero_point, ys=yp.scale, yz=yp.zero_point)
    return ([helper.make_node("QuantizeLinear", [x, "xs", "xz"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "xs", "xz"], ["x_dq"])],
            [helper.make_node("QuantizeLinear", [y, "ys", "yz"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "ys", "yz"], ["y"])])


def matmul_variants(m, k, n, rng):
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    q, p = quant.quantize_weights(w, axis=1)
    mm = lambda a, b, out="y": helper.make_node("MatMul", [a, b], [out])  # noqa: E731
    variants = {
        "fp32": _model([mm("x", "w")], {"w": w}, ["M", k]),
        "cast*scale": _model([helper.make_node("Cast", ["q"], ["c"], to=TensorProto.FLOAT),
                              helper.make_node("Mul", ["c", "s"], ["w"]), mm("x", "w")], {"q": q, "s": p.scale}, ["M", k]),
        "DQ->MatMul": _model([helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1), mm("x", "w")],
                             {"q": q, "s": p.scale}, ["M", k]),
        "dynamic": _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                           helper.make_node("MatMulInteger", ["xq", "q", "xz"], ["i"]),
                           helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
                           helper.make_node("Mul", ["xs", "s"], ["sc"]), helper.make_node("Mul", ["f", "sc"], ["y"])],
                          {"q": q, "s": p.scale}, ["M", k]),
    }
    extra = {"q": q, "s": p.scale}
    ref = x @ w
    before, after = _qdq("x", "mm", (x.min(), x.max()), (ref.min(), ref.max()), extra)
    variants["static"] = _model(before + [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1),
                                          mm("x_dq", "w", "mm")] + after, extra, ["M", k])
    return variants, {"x": x}


def conv_variants(batch, cin, cout, hw, rng):
    w = (rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    x = np.abs(rng.standard_normal((batch, cin, hw, hw))).astype(np.float32)
    q, p = quant.quantize_weights(w, axis=0)
    conv = lambda a, wname, out: helper.make_node("Conv", [a, wname, "b"], [out], pads=[1, 1, 1, 1])  # noqa: E731
    relu = helper.make_node("Relu", ["c"], ["y"])
    shape = ["N", cin, hw, hw]
    variants = {
        "fp32": _model([conv("x", "w", "c"), relu], {"w": w, "b": b}, shape),
        "cast*scale": _model([helper.make_node("Cast", ["q"], ["qc"], to=TensorProto.FLOAT),
                              helper.make_node("Mul", ["qc", "s4"], ["w"]), conv("x", "w", "c"), relu],
                             {"q": q, "s4": p.scale.reshape(-1, 1, 1, 1), "b": b}, shape),
        "DQ->Conv": _model([helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0), conv("x", "w", "c"), relu],
                           {"q": q, "s": p.scale, "b": b}, shape),
        "ConvInteger": _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                               helper.make_node("ConvInteger", ["xq", "q", "xz"], ["i"], pads=[1, 1, 1, 1]),
                               helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
                               helper.make_node("Mul", ["xs", "s3"], ["sc"]), helper.make_node("Mul", ["f", "sc"], ["m"]),
                               helper.make_node("Add", ["m", "b3"], ["c"]), relu],
                              {"q": q, "s3": p.scale.reshape(-1, 1, 1), "b3": b.reshape(-1, 1, 1)}, shape),
    }
    extra = {"q": q, "s": p.scale, "b": b}
    reference = ort.InferenceSession(variants["fp32"], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    before, after = _qdq("x", "r", (0.0, x.max()), (0.0, reference.max()), extra)
    variants["static"] = _model(before + [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0),
                                          conv("x_dq", "w", "c2"), helper.make_node("Relu", ["c2"], ["r"])] + after,
                                extra, shape)
    return variants, {"x": x}


def _row(label, variants, feed, threads):
    timings = time_models(variants, feed, threads, rounds=15)
    print(f"{label:28s}" + "".join(f"{t.median_us:>13.1f}" for t in timings.values()), flush=True)


def ops(threads: int) -> None:
    rng = np.random.default_rng(0)
    names = list(matmul_variants(1, 8, 8, rng)[0])
    print(f"MatMul [M,K]x[K,N], µs, {threads} thread(s)\n{'':28s}" + "".join(f"{n:>13s}" for n in names))
    for m, k, n in MATMULS:
        _row(f"{m}x{k}x{n}", *matmul_variants(m, k, n, rng), threads)
    names = list(conv_variants(1, 1, 1, 4, rng)[0])
    print(f"\nConv 3x3 + ReLU (batch, Cin->Cout, HxW), µs\n{'':28s}" + "".join(f"{n:>13s}" for n in names))
    for batch, cin, cout, hw in CONVS:
        _row(f"{batch}, {cin}->{cout}, {hw}x{hw}", *conv_variants(batch, cin, cout, hw, rng), threads)


def zoo_comparison(threads: int, batch: int) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    import zoo
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _, _, x_test, y_test = zoo.digits_data()
    with tempfile.TemporaryDirectory() as folder:
        for name, entry in zoo.ZOO.items():
            path = entry.build(folder)
            x = zoo.model_input(name, x_test)
            model = load_model(path)
            normalize(model)
            config = Int8Config(latency_batch=batch if batch > 1 else None)
            result = Int8Quantize(config, PassContext([{"input": x}], seed=0, threads=threads)).call(model)
            models = {"fp32": path.read_bytes(), "modelpress": to_bytes(result.model)}
            ort_path = Path(folder) / f"{name}-ort.onnx"
            try:
                quantize_dynamic(path, ort_path, per_channel=True, weight_type=QuantType.QInt8)
                models["ort_dynamic"] = ort_path.read_bytes()
            except Exception as exc:
                print(f"{name}: quantize_dynamic fails: {str(exc)[:120]}")
            rows = {}
            for key, data in list(models.items()):
                try:
                    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                    rows[key] = session.run(None, {"input": x})[0].argmax(1)
                except Exception as exc:
                    print(f"{name}: {key} does not run in onnxruntime: {str(exc)[:120]}")
                    del models[key]
            timings = time_models(models, {"input": x[np.arange(batch) % len(x)]}, threads, rounds=21)
            print(f"{name}: placed {result.stats['quantized']}")
            for key in models:
                print(f"    {key:12s} {len(models[key]) / 1024:8.1f} KB  accuracy {np.mean(rows[key] == y_test):.4f}  "
                      f"agreement {np.mean(rows[key] == rows['fp32']):.4f}  {timings[key].median_us:9.0f} µs "
                      f"({1 / timings[key].speedup:.2f}x fp32)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", choices=["ops", "zoo", "all"], default="all")
    parser.add_argument("--batch", type=int, default=1, help="zoo: samples per timed run")
    args = parser.parse_args()
    if args.part in ("ops", "all"):
        ops(args.threads)
    if args.part in ("zoo", "all"):
        zoo_comparison(args.threads, args.batch)


if __name__ == "__main__":
    main()
