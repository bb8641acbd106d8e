"""Robustness sweep of the shipped recipes on the classic ONNX Model Zoo architectures (random weights).

    python benchmarks/classic_zoo.py                         # default models x default recipes
    python benchmarks/classic_zoo.py --models squeezenet --recipes int8,fp16 --work-dir /tmp/cz --no-write

Nothing is downloaded: the graphs are the "light" test models that the `onnx` wheel ships in
`onnx/backend/test/data/light/light_<name>.onnx` (AlexNet, DenseNet-121, Inception v1/v2, ResNet-50,
ShuffleNet, SqueezeNet, VGG-19, ZFNet-512: opset 9, IR version 3, every initializer also a graph
input). Their weights are `ConstantOfShape` fills, so for each requested model this script
1. replaces every `ConstantOfShape` by an initializer of the same name holding seeded random values
   (He-scaled for rank >= 2, BatchNorm scales ~ 1 + 0.1 N(0, 1), variances 1 + 0.1 |N(0, 1)|, other
   vectors 0.01 N(0, 1)), drops what is no longer used, lists the new initializers as graph inputs
   (IR 3), checks the model and that onnxruntime gives no NaN on the data,
2. writes 32 seeded smooth-noise images [32, 3, 224, 224] under the model's data input name,
3. runs `modelpress compress MODEL --recipe R --data DATA ...` as a subprocess per recipe and reads
   its report (exit code, size and p50 latency against the original, fidelity metrics), keeping
   the first "error:" line of an exit 2 / 3.

It prints one markdown table and replaces the `classic-zoo` section of benchmarks/RESULTS.md. The
weights are random, so accuracy is not measured. It is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import compare_int8  # noqa: E402
from common import command_line, markdown_table, replace_section, run_recipes, section_head, sweep_parser  # noqa: E402
from common import names as split_names  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- classic-zoo:begin -->", "<!-- classic-zoo:end -->"
LIGHT = Path(onnx.__file__).parent / "backend/test/data/light"
ALL_MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
              "squeezenet", "vgg19", "zfnet512")
MODELS = "squeezenet,shufflenet,resnet50,inception_v1,densenet121"
RECIPES = "int8,int8-static,fp16,sparse-50,structured-50,prune-int8"
SAMPLES = 32


def roles(graph: onnx.GraphProto) -> dict[str, str]:
    """BatchNorm scale / variance inputs, and vectors that (through an Unsqueeze) multiply, as DenseNet's
    and Inception v2's per-channel `bn_w` / `sc_w` after each BatchNorm: all must stay near 1."""
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    role = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            role[node.input[1]], role[node.input[4]] = "scale", "var"
        elif node.op_type == "Unsqueeze" and any(c.op_type == "Mul" for c in consumers[node.output[0]]):
            role.setdefault(node.input[0], "scale")
    return role


def fill(name: str, shape: tuple[int, ...], role: str | None, rng) -> np.ndarray:
    """Real-looking random values for one weight tensor (float64; cast by the caller)."""
    if role == "var" or any(key in name for key in ("var", "bn_v", "riv")):  # riv: Caffe2 running inverse variance
        return 1 + 0.1 * np.abs(rng.standard_normal(shape))  # positive, or BatchNorm gives NaN
    if role == "scale" or "bn_s" in name or "scale" in name:
        return 1 + 0.1 * rng.standard_normal(shape)
    if len(shape) >= 2:
        return rng.standard_normal(shape) * np.sqrt(2.0 / max(1, int(np.prod(shape[1:]))))
    return 0.01 * rng.standard_normal(shape)


def build_model(name: str, out: Path, seed: int) -> tuple[Path, str]:
    """light_<name>.onnx with its ConstantOfShape fills turned into seeded random initializers (IR 3:
    each also a graph input). Returns the written path and the data input's name."""
    model = onnx.load(LIGHT / f"light_{name}.onnx")
    graph, rng = model.graph, np.random.default_rng(seed)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    role = roles(graph)
    keep, new = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            keep.append(node)
            continue
        shape = tuple(int(s) for s in consts[node.input[0]].ravel())
        value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                     np.zeros(1, np.float32))
        target = node.output[0]
        if value.dtype.kind == "f":
            array = fill(target, shape, role.get(target), rng).astype(value.dtype)
        else:  # an integer fill is not a weight: keep it as it is
            array = np.full(shape, value.ravel()[0], value.dtype)
        new.append(numpy_helper.from_array(array, target))
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    listed = {i.name for i in graph.input}
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in new if t.name not in listed)
    for value_info in [i for i in graph.input if i.name not in used]:
        graph.input.remove(value_info)
    onnx.checker.check_model(model)
    onnx.save(model, out)
    initializers = {t.name for t in graph.initializer}
    data_inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(data_inputs) != 1:
        raise ValueError(f"{name}: expected one data input, found {data_inputs}")
    return out, data_inputs[0]


def write_data(path: Path, input_name: str, seed: int) -> np.ndarray:
    """32 smooth noise images (independent of the model, so every model sees the same ones)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.standard_normal((SAMPLES, 3, 224, 224)), sigma=(0, 0, 3, 3)) * 4
    x = x.astype(np.float32)
    np.savez(path, **{input_name: x})
    return x


def check_finite(model: Path, input_name: str, x: np.ndarray, threads: int) -> int:
    """Raise on a NaN / inf output; return how many distinct top-1 classes output 0 has over the data
    (random weights can send every image to one class, which makes agreement say little)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    top = set()
    for i in range(len(x)):
        outputs = session.run(None, {input_name: x[i:i + 1]})
        if not all(np.isfinite(output).all() for output in outputs):
            raise ValueError(f"{model.name}: non-finite output on sample {i}")
        top.add(int(outputs[0].reshape(-1).argmax()))
    return len(top)


COLUMNS = ("model", "recipe", "exit", "x smaller", "p50 / orig", "agreement", "cosine", "max abs err",
           "seconds", "note")


def table_rows(results: dict[str, list[dict]]) -> list[list[str]]:
    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "—"

    table = []
    for name, rows in results.items():
        for r in rows:
            m = r.get("metrics", {})
            table.append([name, r["recipe"], str(r.get("exit", "—")), fmt(1 / r["size"] if "size" in r else None, ".2f"),
                          fmt(r.get("latency"), ".2f"), fmt(m.get("agreement"), ".3f"), fmt(m.get("cosine"), ".4f"),
                          fmt(m.get("max_abs_error"), ".3g"), fmt(r.get("seconds"), ".0f"), r.get("note", "")])
    return table


def markdown(table, env: dict, command: str, models: list[str], classes: dict[str, int], args) -> str:
    lines = [
        *section_head(BEGIN, "Classic ONNX Model Zoo architectures (random weights)", "classic_zoo.py", env, [command]),
        f"- Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, python {env['python']}.",
        (f"- Models: {', '.join(models)}: the graphs of the `onnx` wheel's light test models "
         "(`onnx/backend/test/data/light/light_<name>.onnx`, opset 9, IR version 3, every initializer also "
         "a graph input, batch fixed at 1)."),
        (f"- **The weights are random** (seed {args.seed}): He-scaled N(0, 1) for rank >= 2, BatchNorm scales "
         "1 + 0.1 N(0, 1), variances 1 + 0.1 |N(0, 1)|, other vectors 0.01 N(0, 1), in place of the light "
         "models' ConstantOfShape fills. So accuracy is not measured: the figures show that each recipe runs, "
         "what it compresses and how close the outputs stay to the original's."),
        (f"- Data: {SAMPLES} seeded N(0, 1) images [{SAMPLES}, 3, 224, 224], Gaussian-smoothed (sigma 3 px) "
         "and scaled by 4, fed one at a time by the CLI. Agreement: top-1 argmax agreement with the original; "
         "cosine and max abs err: of the outputs, as the CLI's report gives them. Distinct top-1 classes of "
         "the original over the images (agreement means little where it is 1): "
         + ", ".join(f"{name} {n}" for name, n in classes.items()) + "."),
        ("- Each row: `modelpress compress MODEL --recipe R --data DATA --output OUT --report-json R.json "
         f"--quiet --force` (timeout {args.timeout} s); x smaller = original / compressed runnable .onnx size; "
         "p50 / orig = the CLI's batch-1 p50 latency ratio."),
        ("- exit: 0 ok, 1 a gate missed (outputs still written and measured), 2 refused input (note: its "
         "error message), 3 a pass failed (note: its error message)."),
        "",
        *markdown_table(COLUMNS, table),
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = sweep_parser(__doc__.splitlines()[0], MODELS, RECIPES, 1200, RESULTS)
    parser.add_argument("--threads", type=int, default=2, help="threads of the NaN check here")
    args = parser.parse_args(argv)
    command = command_line(__file__, REPO, argv)
    names, recipes = split_names(args.models), split_names(args.recipes)
    if unknown := [n for n in names if n not in ALL_MODELS]:
        print(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}", file=sys.stderr)
        return 2
    if missing := [n for n in names if not (LIGHT / f"light_{n}.onnx").is_file()]:
        print(f"error: {', '.join(missing)} not in {LIGHT} (this onnx wheel lacks the light models)", file=sys.stderr)
        return 2
    env = None if args.no_write else compare_int8.machine()
    results: dict[str, list[dict]] = {}
    classes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="classic_zoo_") as tmp:
        root = args.work_dir or Path(tmp)
        for name in names:
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            print(f"[{name}] building ...", file=sys.stderr, flush=True)
            model, input_name = build_model(name, work / f"{name}.onnx", args.seed)
            data = work / "data.npz"
            classes[name] = check_finite(model, input_name, write_data(data, input_name, args.seed), args.threads)
            print(f"  input {input_name!r}, original: {classes[name]} distinct top-1 classes", file=sys.stderr)
            save = None if args.no_write else lambda: replace_section(  # noqa: E731
                args.results, BEGIN, END, markdown(table_rows(results), env, command, names, classes, args))
            run_recipes(results, name, model, recipes, data, work, args.timeout,
                        lambda row, name=name: " | ".join(table_rows({name: [row]})[0][2:]), save)
    print("\n".join(markdown_table(COLUMNS, table_rows(results))))
    if not args.no_write:
        replace_section(args.results, BEGIN, END, markdown(table_rows(results), env, command, names, classes, args))
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
