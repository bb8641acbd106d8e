"""The main job: model + recipe + data -> compressed model, shipped artifact, benchmark, report.

Everything that can be wrong with the input (paths, recipe, data) is checked before any pass
runs or any file is written; after that a failing pass is a PassFailure (exit 3) and a missed
gate is a report whose ``gates_passed`` is False (exit 1, outputs written).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelpress.compressors import benchmark, data as data_io, synthetic
from modelpress.compressors.environment import environment
from modelpress.compressors.errors import InputError
from modelpress.compressors.model import (
    check_output_path,
    fits_in_protobuf,
    load_model,
    normalize,
    quantized_nodes,
    save_model,
    to_bytes,
    write_atomic,
)
from modelpress.compressors.model_inputs import model_inputs
from modelpress.compressors.pipeline import PassContext, run_encode, run_passes
from modelpress.compressors.recipe import BenchmarkSettings, Gates, Recipe, load_recipe
from modelpress.compressors.report import Report, Side, evaluate_gates

Progress = Callable[[str, int, int], None]


@dataclass
class CompressRequest:
    model: Path
    recipe: str
    output: Path
    data: Path | None = None
    eval_data: Path | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    force: bool = False
    gate_overrides: dict[str, float] = field(default_factory=dict)
    bench_overrides: dict[str, int] = field(default_factory=dict)
    seed: int | None = None
    benchmark: bool = True
    search_dir: Path | None = None  # the search's journal (recipes with a search: block)
    resume: bool = False
    executor: str | None = None  # where search trials run: local (default) | ray
    workers: int | None = None  # local: process-pool size (1: in process); ray: CPUs of a Ray started here
    ray_address: str | None = None  # join this Ray cluster (`auto` or HOST:PORT); implies --executor ray


def with_overrides(recipe: Recipe, gates: dict[str, float], bench: dict[str, int]) -> Recipe:
    """Flags override the recipe's gates and benchmark settings, validated by the same models."""
    from dataclasses import replace

    from pydantic import ValidationError

    try:
        new_gates = Gates.model_validate({**recipe.gates.model_dump(), **gates})
        new_bench = BenchmarkSettings.model_validate({**recipe.benchmark.model_dump(), **bench})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    return replace(recipe, gates=new_gates, benchmark=new_bench)


def packed_path(output: Path) -> Path:
    return output.with_suffix(".mpk")


def load_datasets(model_path: Path, request: CompressRequest, seed: int):
    """(calibration, evaluation) datasets; evaluation is the calibration data unless --eval-data."""
    inputs = model_inputs(model_path)
    if request.data is not None:
        calibration = data_io.load_data(request.data, inputs)
    else:
        calibration = synthetic.synthesize(inputs, request.shapes, seed=seed)
    evaluation = data_io.load_data(request.eval_data, inputs) if request.eval_data else calibration
    return calibration, evaluation


def _check_trainable(model, recipe, path) -> None:
    """A recipe whose `recover` step would meet ops the torch interpreter lacks fails now (exit 2),
    not after minutes of pruning. Ladders and searches are left to decide per rung."""
    if recipe.alternatives or recipe.search is not None or not any(p.name == "recover" for p in recipe.every_pass):
        return
    from modelpress.compressors.torch_graph import unsupported

    problems = unsupported(model)
    if problems:
        quantized = quantized_nodes(model) > 0
        cause = "the model is already quantized, and " if quantized else ""
        raise InputError(f"{path}: {cause}the recipe's recover step trains the model in torch, which cannot run it: "
                         f"{'; '.join(problems)}. Use a recipe without recover (e.g. sparse-50, int8)"
                         + (", or compress the float model it was quantized from" if quantized else ""))


def compress(request: CompressRequest, progress: Progress | None = None) -> Report:
    progress = progress or (lambda description, completed, total: None)
    check_output_path(request.model, request.output, request.force)
    recipe = with_overrides(load_recipe(request.recipe), request.gate_overrides, request.bench_overrides)
    seed = recipe.seed if request.seed is None else request.seed
    skip: dict[int, list[str]] = {}  # alternatives that cannot run without --data: index -> why
    if request.data is None and recipe.needs_calibration:
        from modelpress.compressors.registry import PASSES

        if recipe.alternatives:  # a ladder runs the rungs that need no real inputs
            from modelpress.compressors.alternatives import rungs_needing_data

            skip = rungs_needing_data(recipe)
        if len(skip) == len(recipe.alternatives):
            needing = [f"{p.stage}/{p.name}" for p in recipe.every_pass if PASSES[p.stage][p.name].calibrates(p.config)]
            raise InputError(
                f"{recipe.source}: {', '.join(needing)} calibrate on real inputs; pass --data with samples of them "
                "(random inputs would calibrate to the wrong ranges)"
            )
    model = load_model(request.model)
    quirks = normalize(model)
    _check_trainable(model, recipe, request.model)
    calibration, evaluation = load_datasets(request.model, request, seed)
    job_notes: list[str] = []
    if recipe.search is not None:
        from modelpress.compressors.search import run as search_run

        recipe, calibration, evaluation, job_notes = search_run.prepare(recipe, request, calibration, evaluation, seed)
    elif request.search_dir is not None or request.resume:
        raise InputError("--search-dir and --resume need a recipe with a search: block (e.g. --recipe auto)")
    elif request.executor is not None or request.workers is not None or request.ray_address is not None:
        raise InputError("--executor, --workers and --ray-address run search trials; they need a recipe with a "
                         "search: block (e.g. --recipe auto)")
    benchmark.preflight(request.model, evaluation)
    calibration_feeds = calibration.feeds[: max(1, _feeds_for(calibration, recipe.calibration.samples))]
    calibration_samples = sum(calibration.feed_samples[: len(calibration_feeds)])
    context = PassContext(
        calibration=calibration_feeds,
        labels=None if calibration.labels is None else calibration.labels[:calibration_samples],
        original=to_bytes(model) if recipe.needs_original else None,
        seed=seed,
        threads=recipe.benchmark.threads,
        progress=progress,
    )
    passes, encoder = recipe.build(context)
    packed = packed_path(request.output)
    if encoder is not None and packed.exists() and not request.force:
        raise InputError(f"{packed}: already exists; pass --force to replace it")
    search = None
    if recipe.search is not None:  # the search chooses the prune and quantize passes
        search = search_run.run_search(model, recipe, context, calibration, evaluation, encoder, model_size(request.model),
                                       request.search_dir, request.resume, progress,
                                       request.executor, request.workers, request.ray_address)
        passes = search.passes + passes
        job_notes += search.notes

    ladder = None
    if recipe.alternatives:  # whole pipelines tried in order: the first that meets the gates is kept
        from modelpress.compressors.alternatives import run_ladder

        ladder = run_ladder(model, recipe, context, evaluation, request.model, model_size(request.model), progress,
                            skip)
        model, records, job_notes = ladder.model, ladder.records, job_notes + ladder.notes
    else:
        model, records = run_passes(model, passes, on_start=lambda p: progress(f"{p.stage}: {p.name}", 0, 1))
    packed_bytes = None
    if fits_in_protobuf(model):
        onnx_bytes = to_bytes(model)
        if encoder is not None:
            progress(f"encode: {encoder.name}", 0, 1)
            packed_bytes, record = run_encode(onnx_bytes, encoder, [r.name for r in records])
            records.append(record)
        write_atomic(onnx_bytes, request.output)
        output_size = len(onnx_bytes)
    else:  # > 2 GiB: weights go to OUT.onnx.data, written tensor by tensor
        save_model(model, request.output)
        output_size = model_size(request.output)
        if encoder is not None:
            job_notes.append(f"encode/{encoder.name} skipped: the .mpk format holds models under 2 GiB")
    if packed_bytes is not None:
        write_atomic(packed_bytes, packed)

    original_size = model_size(request.model)
    settings = recipe.benchmark
    if request.benchmark:
        before, after = benchmark.compare(request.model, request.output, evaluation, settings, progress=progress)
    else:
        before = after = None
    original = _side(before, original_size)
    compressed = _side(after, output_size)
    compressed.shipped_size_bytes = len(packed_bytes) if packed_bytes is not None else output_size
    notes = list(quirks)
    if request.data is not None and recipe.needs_calibration and calibration_samples < calibration.samples:
        notes.append(f"the passes calibrated on {calibration_samples} of the {calibration.samples} samples of the "
                     f"data (the recipe's calibration.samples is {recipe.calibration.samples}; raise it to use more)")
    if evaluation.labels is None:
        notes.append("no labels in the data: accuracy is reported as fidelity to the original model")
    if request.data is None:
        notes.append("no --data: inputs were synthesized from the model signature; accuracy is not measured")
    elif request.eval_data is None and recipe.search is None:
        notes.append("the same data calibrated and evaluated (pass --eval-data for a held-out measurement)")
    notes += job_notes
    if records and not any(r.modified for r in records):  # e.g. every weight inside If branches
        notes.append("no pass changed the model: the output holds the same weights (each pass's stats list "
                     "what it skipped and why)")
    return Report(
        model=str(request.model),
        recipe=recipe.source,
        artifacts={"onnx": str(request.output), "packed": str(packed) if packed_bytes is not None else None},
        original=original,
        compressed=compressed,
        passes=[
            {"stage": r.stage, "name": r.name, "seconds": round(r.seconds, 4), "modified": r.modified, "stats": r.stats}
            for r in records
        ],
        gates=evaluate_gates(recipe.gates, original, compressed),
        environment=environment(settings.threads),
        data={
            "calibration": calibration.source,
            "evaluation": evaluation.source,
            "samples": evaluation.samples,
            "labels": evaluation.labels is not None,
        },
        notes=notes,
        search=None if search is None else search.summary,
        alternatives=None if ladder is None else ladder.summary,
    )


def _feeds_for(dataset, samples: int) -> int:
    """How many feeds hold about ``samples`` samples (the recipe's ``calibration.samples``):
    calibration needs a sample of the data, not all of it."""
    per_feed = max(1, dataset.samples // max(1, len(dataset.feeds)))
    return -(-samples // per_feed)


def model_size(path: Path) -> int:
    """File size plus any external data files it references (those beside it)."""
    import onnx

    size = os.path.getsize(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return size
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return size + sum(os.path.getsize(path.parent / loc) for loc in locations if (path.parent / loc).is_file())


def _side(measurement, size: int) -> Side:
    if measurement is None:
        return Side(size_bytes=size, latency_ms=None, metrics={})
    latency = measurement.latency
    return Side(
        size_bytes=size,
        latency_ms=None if latency is None else {"p50": latency.p50, "p90": latency.p90, "p99": latency.p99, "mean": latency.mean},
        metrics=dict(measurement.metrics),
        throughput=None if latency is None else latency.throughput,
        peak_memory_mb=measurement.peak_memory_mb,
    )
