"""The ``modelpress`` command: a small Typer app. Domain errors become one clean message and an
exit code here, and only here: 0 ok, 1 a gate missed, 2 bad input or usage, 3 a pass failed.
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from modelpress import __version__
from modelpress.cli import render

EXIT_GATE, EXIT_INPUT, EXIT_PASS = 1, 2, 3

app = typer.Typer(
    name="modelpress",
    help="Compress ONNX models (prune -> quantize -> encode), benchmark them with ONNX Runtime, gate on quality.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
recipes_app = typer.Typer(
    help="List and show the shipped recipes.\n\nExample: `modelpress recipes` then `modelpress recipes show int8`",
    invoke_without_command=True, no_args_is_help=False,
)
recipe_app = typer.Typer(help="Work with recipe files.\n\nExample: `modelpress recipe check my.yaml`", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(recipe_app, name="recipe")

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display, only the result.")]


def handle_errors(command):
    """Turn domain errors into a message on stderr and the contract's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from modelpress.compressors.errors import InputError, ModelpressError

        verbose = kwargs.get("verbose", False)
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 — every failure ends in one message and a code
            failure: BaseException = exc
            if isinstance(exc, InputError):
                code, message = EXIT_INPUT, str(exc)
            elif isinstance(exc, ModelpressError):  # PassFailure and compressed-model faults
                code, message = EXIT_PASS, str(exc)
            else:  # a bug of ours: still one line unless --verbose
                code, message = EXIT_PASS, f"internal error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)"
        except KeyboardInterrupt as exc:
            failure, code, message = exc, 130, "interrupted"
        if verbose:
            traceback.print_exception(failure)
        render.error(message)
        raise typer.Exit(code)

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"modelpress {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    """Compress ONNX models and measure the result.

    Example: `modelpress compress model.onnx --recipe int8 --data calib.npz -o model.int8.onnx`
    """


@app.command(no_args_is_help=True)
@handle_errors
def compress(
    model: Annotated[Path, typer.Argument(help="The ONNX model to compress (never overwritten).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the compressed .onnx (and .mpk beside it when the recipe encodes).")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="A recipe file or a shipped recipe name (`modelpress recipes`).")] = "int8",
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help=".npz named after the model inputs (+ optional `labels`), or a folder of complete-feed .npz files.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="Held-out data for the report and gates (default: --data).")] = None,
    report_json: Annotated[Optional[Path], typer.Option("--report-json", help="Write the report as JSON (schema modelpress.report/1).")] = None,
    report_md: Annotated[Optional[Path], typer.Option("--report-md", help="Write the report as Markdown, e.g. for a pull-request comment.")] = None,
    shape: Annotated[Optional[list[str]], typer.Option("--shape", help="Dynamic input shape when there is no --data, e.g. input_ids=1x128. Repeatable.")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(help="Gate: largest accepted accuracy drop (0.01 = 1 pp).")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Gate: smallest accepted output cosine to the original.")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Gate: smallest accepted argmax agreement with the original.")] = None,
    min_size_ratio: Annotated[Optional[float], typer.Option(help="Gate: the result must be at least this many times smaller.")] = None,
    max_latency_ratio: Annotated[Optional[float], typer.Option(help="Gate: compressed p50 / original p50 at most this.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Benchmark threads (recipe default 2).")] = None,
    runs: Annotated[Optional[int], typer.Option(help="Benchmark timed runs.")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Benchmark warm-up runs.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override the recipe's seed.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files.")] = False,
    search_dir: Annotated[Optional[Path], typer.Option("--search-dir", help="Search recipes (e.g. `auto`): folder of the trial journal (journal.jsonl) and best.json.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the search journaled in --search-dir without redoing finished trials.")] = False,
    executor: Annotated[Optional[str], typer.Option("--executor", help="Search recipes: where trials run, `local` (default) or `ray` (pip install 'modelpress[ray]').")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Search recipes: local process-pool size (default 1: in process); with ray, the CPUs of a local Ray started for the search.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Search recipes: write the trials and their Pareto front (size vs quality loss) as a PNG (pip install 'modelpress[plot]').")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Join a running Ray cluster: `auto` (started with `ray start --head` on this machine) or HOST:PORT. Implies --executor ray.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Compress MODEL with a recipe, benchmark original and result, print the report.

    Example: `modelpress compress model.onnx --recipe int8 --data calib.npz --output model.int8.onnx --report-json report.json`

    Exit codes: 0 ok, 1 a gate missed (outputs still written), 2 bad input, 3 a pass failed.
    """
    from modelpress.compressors.synthetic import parse_shape_flags
    from modelpress.compressors.job import CompressRequest
    from modelpress.compressors.job import compress as run_compress

    _check_report_paths(model, report_json, report_md, plot)
    if plot is not None:
        from modelpress.compressors.search.plot import check_plotting

        check_plotting()
    gates = {k: v for k, v in dict(max_accuracy_drop=max_accuracy_drop, min_cosine=min_cosine, min_agreement=min_agreement,
                                   min_size_ratio=min_size_ratio, max_latency_ratio=max_latency_ratio).items() if v is not None}
    bench = {k: v for k, v in dict(threads=threads, runs=runs, warmup=warmup).items() if v is not None}
    request = CompressRequest(
        model=model, recipe=recipe, output=output, data=data, eval_data=eval_data,
        shapes=parse_shape_flags(shape or []), force=force, gate_overrides=gates, bench_overrides=bench, seed=seed,
        search_dir=search_dir, resume=resume, executor=executor, workers=workers, ray_address=ray_address,
    )
    with render.progress(quiet) as progress:
        report = run_compress(request, progress=progress)
    _write_reports(report, report_json, report_md)
    if plot is not None and report.search is not None:
        from modelpress.compressors.model import write_atomic
        from modelpress.compressors.search.plot import pareto_png

        write_atomic(pareto_png(report.search), plot)
    render.compress_report(report, quiet=quiet)
    if not report.gates_passed:
        raise typer.Exit(EXIT_GATE)


def _check_report_paths(model: Path, *paths: Optional[Path]) -> None:
    from modelpress.compressors.errors import InputError

    for path in paths:
        if path is not None and model.exists() and path.exists() and path.resolve() == model.resolve():
            raise InputError(f"{path}: a report would overwrite the input model")


def _write_reports(report, report_json: Optional[Path], report_md: Optional[Path]) -> None:
    from modelpress.compressors.model import write_atomic
    from modelpress.compressors.report import dumps

    if report_json is not None:
        write_atomic(dumps(report.to_json()).encode(), report_json)
    if report_md is not None:
        write_atomic(render.report_markdown(report).encode(), report_md)


@app.command(no_args_is_help=True)
@handle_errors
def bench(
    model: Annotated[Path, typer.Argument(help="The ONNX model to measure.")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Evaluation data (.npz or folder); labels give accuracy.")] = None,
    shape: Annotated[Optional[list[str]], typer.Option("--shape", help="Dynamic input shape without --data, e.g. input_ids=1x128.")] = None,
    threads: Annotated[int, typer.Option(help="Intra-op threads.")] = 2,
    runs: Annotated[int, typer.Option(help="Timed runs.")] = 50,
    warmup: Annotated[int, typer.Option(help="Warm-up runs.")] = 5,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the measurement as JSON.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
):
    """Measure size, latency p50/p90/p99, throughput and accuracy of one model on CPU.

    Example: `modelpress bench model.onnx --data eval.npz --threads 2 --runs 100`
    """
    from modelpress.compressors import benchmark
    from modelpress.compressors import data as data_io, synthetic
    from modelpress.compressors.environment import environment
    from modelpress.compressors.model import load_model, write_atomic
    from modelpress.compressors.model_inputs import model_inputs
    from modelpress.compressors.recipe import BenchmarkSettings

    load_model(model)  # clear errors for corrupt files before ORT sees them
    inputs = model_inputs(model)
    dataset = data_io.load_data(data, inputs) if data else synthetic.synthesize(inputs, synthetic.parse_shape_flags(shape or []))
    settings = BenchmarkSettings(threads=threads, runs=runs, warmup=warmup)
    with render.progress(quiet) as progress:
        measurement = benchmark.measure(model, dataset, settings, progress)
    result = render.bench_result(model, dataset, measurement, environment(threads))
    if json_out is not None:
        from modelpress.compressors.report import dumps

        write_atomic(dumps(result).encode(), json_out)


@app.command(no_args_is_help=True)
@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="An .onnx model or an .mpk artifact.")],
    top: Annotated[int, typer.Option(help="How many of the largest tensors to list.")] = 15,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    verbose: Verbose = False,
):
    """Parameters and bytes by op type and by tensor, what is compressible, quirks found.

    Example: `modelpress inspect model.onnx --top 20` or `modelpress inspect model.mpk`
    """
    from modelpress.compressors.errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".mpk":
        from modelpress.compressors.encode.mpk import describe

        try:
            summary = describe(path.read_bytes())
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        summary["artifact"] = str(path)
        render.artifact_summary(summary, json_out)
        return
    from modelpress.compressors.summary import summarize_model

    render.model_summary(summarize_model(path), top, json_out)


@recipes_app.callback()
def recipes(ctx: typer.Context):
    """List shipped recipes with one-line descriptions.

    Example: `modelpress recipes` then `modelpress recipes show int8`
    """
    if ctx.invoked_subcommand is None:
        from modelpress.compressors.recipe import load_recipe, shipped_recipes

        render.recipe_list({name: load_recipe(str(path)).description for name, path in shipped_recipes().items()})


@app.command()
@handle_errors
def passes(verbose: Verbose = False):
    """List every registered pass by stage with its recipe keys and defaults.

    Example: `modelpress passes`
    """
    from modelpress.compressors.registry import PASSES

    render.pass_table(PASSES)


@recipes_app.command("show", no_args_is_help=True)
@handle_errors
def recipes_show(
    name: Annotated[str, typer.Argument(help="A shipped recipe name.")],
    verbose: Verbose = False,
):
    """Print a shipped recipe's YAML, ready to copy and edit.

    Example: `modelpress recipes show int8 > my.yaml`
    """
    from modelpress.compressors.recipe import resolve_recipe

    typer.echo(resolve_recipe(name).read_text(encoding="utf-8"), nl=False)


@recipe_app.command("check", no_args_is_help=True)
@handle_errors
def recipe_check(
    path: Annotated[str, typer.Argument(help="A recipe file (or shipped name).")],
    verbose: Verbose = False,
):
    """Validate a recipe without running it; every problem is listed with file:line.

    Example: `modelpress recipe check my.yaml`
    """
    from modelpress.compressors.recipe import load_recipe

    render.recipe_ok(load_recipe(path))


@app.command(no_args_is_help=True)
@handle_errors
def decode(
    artifact: Annotated[Path, typer.Argument(help="A .mpk artifact written by `compress`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx to write (byte-identical to the one compress wrote).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    verbose: Verbose = False,
):
    """Restore the runnable ONNX model from a shipped .mpk artifact, byte for byte.

    Example: `modelpress decode model.mpk --output model.onnx`
    """
    from modelpress.compressors.encode.mpk import unpack
    from modelpress.compressors.errors import InputError
    from modelpress.compressors.model import check_output_path, write_atomic

    if not artifact.is_file():
        raise InputError(f"{artifact}: no such artifact file")
    check_output_path(artifact, output, force)
    try:
        onnx_bytes = unpack(artifact.read_bytes())
    except InputError as exc:
        raise InputError(f"{artifact}: {exc}") from None
    write_atomic(onnx_bytes, output)
    render.decoded(artifact, output, len(onnx_bytes))


def run() -> None:
    """Console-script entry point."""
    app(prog_name="modelpress")


if __name__ == "__main__":
    sys.exit(run())
