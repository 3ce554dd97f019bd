"""Command line (``uadc train | eval | compile | qat | sweep | predict | verify | diff | ...``): the only package
that talks to the terminal. It calls the public API (``uadc.pipeline.api``) and prints from the typed results.
A user mistake (UadcError) is one ``error: ...`` line and exit 2; every artifact is written atomically at the end."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from uadc import __version__
from uadc.cli.terminal import _errors_as_json, _Group, _Path, _setup_logging, json_output
from uadc.config.targets import QAT_TARGETS, TARGETS
from uadc.core.constants import MAX_THREADS
from uadc.core.errors import UadcError, dependencies_checked, one_line

recipe_arg = click.argument("recipe", type=_Path(path_type=str))   # as typed: `demo/` is a folder, not the built-in
artifacts_opt = click.option("--artifacts", type=_Path(path_type=Path), default=None, help="artifacts root (default: ./artifacts)")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="uadc")
@click.option("-v", "--verbose", is_flag=True, help="also show debug logs and third-party output")
@click.option("-q", "--quiet", is_flag=True, help="only warnings and errors; no progress bars")
def main(verbose: bool, quiet: bool) -> None:
    """uadc: compile knowledge-distillation anomaly detectors for ONNX Runtime, OpenVINO and TensorRT."""
    _setup_logging(verbose, quiet)


@main.command()
@recipe_arg
@click.option("--one-class", is_flag=True, help="train one model per category instead of one unified model")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None, help="override train.epochs")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="evaluate on the test sets every N epochs (learning curve in the checkpoint history)")
@artifacts_opt
@json_output
def train(recipe: Path, one_class: bool, epochs: int | None, eval_every: int | None, artifacts: Path | None) -> None:
    """Train the recipe's model (unified multi-class by default)."""
    from uadc.pipeline import api
    res = api.train(recipe, one_class=one_class, epochs=epochs, eval_every=eval_every, artifacts=artifacts)
    for m in res.models:
        click.echo(one_line(f"checkpoint written: {m.checkpoint} ({m.train_seconds:.1f} s of training)"))
    return res


@main.command("eval")
@recipe_arg
@click.option("--checkpoint", type=_Path(path_type=Path), default=None, help="default: the recipe's")
@click.option("--one-class", is_flag=True, help="evaluate the per-category models and compare with unified")
@click.option("--no-write", is_flag=True, help="print the figures only; write no eval.json (e.g. a read-only "
              "artifacts folder)")
@artifacts_opt
@json_output
def eval_cmd(recipe: Path, checkpoint: Path | None, one_class: bool, no_write: bool, artifacts: Path | None) -> None:
    """Evaluate per category and mean: image/pixel AUROC, AUPRO, pixel F1-max."""
    from uadc.config.recipe import load_recipe
    from uadc.evaluation.run import format_comparison, format_defects, format_table
    from uadc.pipeline import api
    from uadc.training.checkpoint import checkpoint_arg
    r = load_recipe(recipe)
    if one_class:
        if checkpoint is not None:   # it was ignored, even a path that does not exist
            raise UadcError("--one-class evaluates each category's own checkpoint; drop --checkpoint")
        res = api.evaluate(r, one_class=True, artifacts=artifacts, write=not no_write)
        click.echo(format_table(res.one_class, f"{r.name} (one model per category)"))
        click.echo(format_comparison(res.unified, res.one_class))
        click.echo(one_line(f"written: {res.path}") if res.path else "not written (--no-write)")
        return res
    res = api.evaluate(checkpoint_arg(checkpoint) or r, r, artifacts=artifacts, write=not no_write)
    epochs = res.extra.get("epochs")       # None for a compiled artifact: name it instead
    kind = f"one-class {', '.join(res.extra['trained_on'])}" if res.extra.get("one_class") else "unified"
    click.echo(format_table(res, f"{r.name} ({kind}, {f'{epochs} epoch' + 's' * (epochs != 1) if epochs else checkpoint})"))
    click.echo(format_defects(res), nl=bool(res.defects))
    click.echo(one_line(f"written: {res.path}") if res.path else "not written (--no-write)" if no_write
               else "not written: eval.json holds the recipe's own unified checkpoint's figures")
    return res


@main.command("compile")
@recipe_arg
@click.option("--target", default=None, help=f"{', '.join(TARGETS)} (default: the recipe's compile.target)")
@click.option("--calibrator", default=None, help="entropy | mse | minmax | percentile | a plug-in name")
@click.option("--calib-data", type=click.Choice(["train", "random-normal", "mixed"]), default=None)
@click.option("--calib-samples", type=click.IntRange(min=1, max=4096), default=None)
@click.option("--quantize", default=None, help="partitions to quantize, e.g. student or student,teacher")
@click.option("--precision", type=click.Choice(["target", "auto"]), default=None, help="auto: INT8/FP32 per fused group "
              "in the recipe's compile.auto budget (trt/jetson-int8: also FP16) (default: the recipe's compile.precision)")
@click.option("--per-channel/--per-tensor", default=None, help="weight scales (default: the target's)")
@click.option("--out", type=_Path(path_type=Path), default=None, help="artifact folder")
@click.option("--force", is_flag=True, help="replace a folder uadc wrote at --out, whole: an artifact, or a sweep's "
              "or calibrator comparison's folder (never a QAT folder, a recipe's artifacts or a folder of yours)")
@click.option("--checkpoint", type=_Path(path_type=Path), default=None)
@click.option("--dump-passes", type=_Path(path_type=Path), default=None,
              help="save the model after every pass (before --postprocess adds its nodes)")
@click.option("--split", is_flag=True, help="also write one ONNX per partition")
@click.option("--build-engine", is_flag=True, help="build model.engine where TensorRT and a GPU exist")
@click.option("--no-eval", is_flag=True, help="skip the AD metrics (verification and latency still run)")
@click.option("--from-qat", is_flag=True, help="use the QAT model from `uadc qat` (no calibration)")
@click.option("--train-if-missing", is_flag=True, help="train the recipe first when it has no checkpoint")
@click.option("--postprocess/--no-postprocess", default=None,
              help="in-graph pred_score/pred_label/pred_mask outputs (default: the recipe's deploy.postprocess)")
@artifacts_opt
@json_output
def compile_cmd(recipe: Path, target: str | None, calibrator, calib_data, calib_samples, quantize, per_channel,
                out, force, checkpoint, dump_passes, split, build_engine, no_eval, from_qat, train_if_missing,
                postprocess, artifacts, precision) -> None:
    """Export, run the target's passes, verify with Polygraphy and write the artifact folder."""
    from uadc.config.recipe import load_recipe
    from uadc.config.settings import check_auto_without_qat
    from uadc.config.validation import comma_list
    from uadc.pipeline import api
    from uadc.training.checkpoint import checkpoint_arg, checkpoint_path
    r = load_recipe(recipe)
    target = r.compile.target if target is None else target   # "" is no target (it ran the recipe's)
    check_auto_without_qat(precision, from_qat)
    if dump_passes is not None and dump_passes.exists() and not dump_passes.is_dir():
        raise UadcError(f"--dump-passes: not a folder: {dump_passes}")
    if checkpoint is None:
        api.ensure_checkpoint(r, artifacts, recipe, train_if_missing)
    from uadc.quant.qat.run import load_qat_model
    qat_model = load_qat_model(r, target, artifacts, checkpoint or checkpoint_path(r, artifacts)) if from_qat else None
    res = api.compile(checkpoint_arg(checkpoint) or r, target, recipe=r, calibration=calib_data, calibrator=calibrator,
                      calib_samples=calib_samples, quantize=comma_list(quantize, "--quantize"), per_channel=per_channel, out=out,
                      force=force, dump_passes=dump_passes, split=split, build_engine=build_engine,
                      evaluate=not no_eval, qat_model=qat_model, artifacts=artifacts, postprocess=postprocess,
                      precision=precision)
    click.echo("\n".join(res.summary_lines()))
    return res


@main.command()
@recipe_arg
@click.option("--target", default=None, help=f"int8 target: {', '.join(QAT_TARGETS)} (default: the recipe's compile.target)")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None, help="override qat.epochs")
@click.option("--compile/--no-compile", "then_compile", default=True,
              help="compile the QAT model into <artifacts>/<recipe>/<target>-qat (default: yes)")
@artifacts_opt
def qat(recipe: Path, target: str | None, epochs: int | None, then_compile: bool, artifacts: Path | None) -> None:
    """Quantization-aware fine-tuning from the PTQ placement; writes qat_<target>/qat_model.onnx."""
    from uadc.pipeline import api
    res = api.qat(recipe, target, epochs=epochs, compile_after=then_compile, artifacts=artifacts)
    if res.compiled is None:   # the result (stdout, kept by -q): it was a log line, so `-q qat --no-compile` said nothing
        click.echo(one_line(f"QAT model written: {res.qat_model_path}"))
    else:
        click.echo("\n".join(res.compiled.summary_lines()))


def _check_default_out(out: Path) -> None:
    """predict's default --out inside an artifact: named as the default, not as an option typed."""
    from uadc.core.manifest import check_outside_artifacts
    try:
        check_outside_artifacts(out, what="the default --out")
    except UadcError as exc:
        raise UadcError(f"{exc}, with --out DIR") from None


@main.command()
@click.argument("artifact", type=_Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=_Path(path_type=Path))
@click.option("--category", default=None, help="thresholds to apply (default: each image's folder name if it is "
              "a known category, else the global thresholds)")
@click.option("--out", type=_Path(path_type=Path), default=Path("predictions"), show_default=True,
              help="folder for predictions.jsonl / predictions.csv (and overlays/); an earlier run's are replaced")
@click.option("--overlays", is_flag=True, help="write PNG heat-map overlays with the mask contour")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default="auto",
              show_default=True, help="auto: TensorRT when model.engine exists and tensorrt imports, OpenVINO for an "
              "openvino-cpu-* artifact when openvino imports, else ONNX Runtime")
@click.option("--schedule", type=click.Choice(["auto", "branches", "batch", "sequential"]), default="auto",
              show_default=True, help="ONNX Runtime: run teacher and student at the same time (branches) or "
              "split each batch across the cores (batch); auto: branches for one image, batch for more")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="cores to use (default and most: all available)")
@json_output
def predict(artifact: Path, inputs: tuple[Path, ...], category: str | None, out: Path, overlays: bool,
            batch_size: int, backend: str, schedule: str, threads: int | None):
    """Run a compiled artifact (verified against its artifact.json) on image files and folders."""
    from uadc.runtime import Detector
    from uadc.runtime.batch import predict_paths
    with Detector.load(artifact, backend=backend, batch_size=batch_size, schedule=schedule, threads=threads) as det:
        if click.get_current_context().get_parameter_source("out") is click.core.ParameterSource.DEFAULT:
            _check_default_out(out)
        run = predict_paths(det, list(inputs), category, out, overlays, batch_size)
    from uadc.core.images import shown   # not at import: `uadc doctor` runs where Pillow is broken
    for path, reason, _ in run.failed:
        click.echo(f"skipped {shown(path)}: {reason}", err=True)
    click.echo(f"{run.summary_line()} ({det.backend_name})")
    click.echo(one_line(f"written: {run.written[0]}, {run.written[1]}"     # predictions.jsonl, .csv
                        + (f", {out / 'overlays'}/" if len(run.written) > 2 else "")))   # none: no folder
    return run   # exit 1 when an image could not be read (run.exit_code)


@main.group()
def calibrators() -> None:
    """List calibrators or compare them on a recipe."""


@calibrators.command("list")
def calibrators_list() -> None:
    from uadc.calibrators import available_calibrators, calibrator_problem
    click.echo("\n".join(f"{n}  (unusable: {p})" if (p := calibrator_problem(n)) else n for n in available_calibrators()))


@calibrators.command("compare")
@recipe_arg
@click.option("--target", default="ort-cpu-int8")
@click.option("--calibrators", "names", default="entropy,mse", help="comma-separated calibrator names")
@click.option("--calib-data", "sources", default="train,random-normal", help="comma-separated data sources")
@click.option("--calib-samples", type=click.IntRange(min=1, max=4096), default=None)
@click.option("--quantize", default=None)
@click.option("--out", type=_Path(path_type=Path), default=None, help="folder for the matrix and cells")
@click.option("--ray", "use_ray", is_flag=True, help="run the cells on a local Ray (pip install 'uadc[sweep]')")
@click.option("--address", default=None, help="run the cells on this Ray cluster (implies --ray)")
@artifacts_opt
def calibrators_compare(recipe: Path, target, names, sources, calib_samples, quantize, out, use_ray, address,
                        artifacts) -> None:
    """Compile each calibrator x data cell (a sweep); print image/pixel AUROC, drop vs FP32; exit 1: a cell failed."""
    from uadc.config.validation import comma_list
    from uadc.pipeline import api
    res = api.compare_calibrators(recipe, target, comma_list(names, "--calibrators"), comma_list(sources, "--calib-data"),
                                  calib_samples=calib_samples, quantize=comma_list(quantize, "--quantize"), out=out,
                                  artifacts=artifacts, ray=use_ray, address=address)
    click.echo(res.markdown)
    sys.exit(res.exit_code)


@main.command("sweep")
@click.argument("sweep_file", type=_Path(path_type=Path))
@click.option("--address", default=None, help="Ray cluster to run on (e.g. auto, 10.0.0.5:6379); default: a local Ray")
@click.option("--num-cpus", type=click.IntRange(min=1, max=4096), default=None,
              help="CPUs of the local Ray (default: all cores)")
@click.option("--out", type=_Path(path_type=Path), default=None,
              help="folder for the table and cells (default: <artifacts>/sweeps/<name>)")
@click.option("--sequential", is_flag=True, help="no Ray: run the cells one after another in this process")
@artifacts_opt
@json_output
def sweep_cmd(sweep_file: Path, address, num_cpus, out, sequential, artifacts):
    """Run a sweep file's recipe x target x calibration grid on Ray; exit 1 if a cell failed."""
    from uadc.pipeline.sweep.run import run_sweep   # = api.sweep, without importing torch for a rerun
    res = run_sweep(sweep_file, artifacts=artifacts, out=out, address=address, num_cpus=num_cpus, sequential=sequential)
    click.echo(res.markdown)   # with --json: on stderr, the table as the JSON document
    click.echo(res.summary_line())
    return res


def _gate_options(f):
    for opt in reversed([
        click.option("--images", "images", multiple=True, type=_Path(path_type=Path),
                     help="folder of normal images to judge on (repeatable; default: the golden images)"),
        click.option("--budget", "budget", multiple=True, metavar="KEY=VALUE",
                     help="override a budget, e.g. spearman_min=0.95 (repeatable)"),
        click.option("--recipe", type=_Path(path_type=Path), default=None,
                     help="take budgets from this recipe's verify: section (default: the ones stored at compile)"),
        click.option("--normal-only", is_flag=True, help="judge on normal images only (no labelled test images)"),
        click.option("--json", "json_out", type=_Path(path_type=Path, file=True), default=None,
                     help="write the JSON report (-: on stdout instead of the Markdown)"),
        click.option("--markdown", "md_out", type=_Path(path_type=Path, file=True), default=None,
                     help="write the Markdown report (also on stdout)"),
        click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=None)]):
        f = opt(f)

    @functools.wraps(f)
    def checked(*args, json_out: Path | None = None, md_out: Path | None = None, **kwargs):
        from uadc.verify.reports import check_report_paths, error_document, write_error_reports
        kind, stdout = f.__name__[:-4], str(json_out) == "-"   # `--json -`: a document, always, as in a file
        report = functools.partial(write_error_reports, kind, json_out, md_out)
        with _errors_as_json(None, lambda *e: stdout and click.echo(error_document(kind, *e), nl=False)):
            check_report_paths(json_out, md_out)       # before the work, not after it
            with _errors_as_json(None, report):
                try:
                    with dependencies_checked():
                        return f(*args, json_out=json_out, md_out=md_out, **kwargs)
                except Exception as exc:   # a bug: its traceback stands, and the last run's PASS is not left to read
                    if not isinstance(exc, UadcError):
                        report(f"internal error: {type(exc).__name__}: {one_line(str(exc))}", 1)
                    raise
    return checked


def _gate_report(res, json_out: Path | None, md_out: Path | None) -> None:
    res.write_reports(json_out, md_out)
    click.echo(res.to_json() if str(json_out) == "-" else res.to_markdown(), nl=False)   # `--json -`: JSON alone
    click.echo("".join(f"REGRESSION: {line}\n" for line in res.failures), err=True, nl=False)
    click.echo(f"{res.kind}: {'PASS' if res.passed else 'REGRESSION'} ({len(res.failures)} figure(s) out of budget; "
               f"{res.seconds:.1f} s)", err=True)
    sys.exit(res.exit_code)


@main.command("verify")
@click.argument("artifact", type=_Path(path_type=Path))
@click.option("--golden", type=_Path(path_type=Path), default=None,
              help="golden set (folder or golden.json) to judge against (default: the artifact's own)")
@_gate_options
def verify_cmd(artifact: Path, golden, images, budget, recipe, normal_only, json_out, md_out, threads) -> None:
    """Judge an artifact against its golden FP32 outputs; exit 0 within budget, 1 regression, 2 usage error."""
    from uadc.pipeline import api
    from uadc.verify.gate import parse_budget_args
    res = api.verify(artifact, images=list(images) or None, golden=golden, budgets=parse_budget_args(budget),
                     recipe=recipe, normal_only=normal_only, threads=threads)
    _gate_report(res, json_out, md_out)


@main.command("diff")
@click.argument("a", type=_Path(path_type=Path))
@click.argument("b", type=_Path(path_type=Path))
@_gate_options
def diff_cmd(a: Path, b: Path, images, budget, recipe, normal_only, json_out, md_out, threads) -> None:
    """Judge artifact B against artifact A with the same figures as `uadc verify`."""
    from uadc.pipeline import api
    from uadc.verify.gate import parse_budget_args
    res = api.diff(a, b, images=list(images) or None, budgets=parse_budget_args(budget), recipe=recipe,
                   normal_only=normal_only, threads=threads)
    _gate_report(res, json_out, md_out)


@main.command("bundle")
@click.argument("artifact", type=_Path(path_type=Path))
@click.option("--out", type=_Path(path_type=Path), required=True, help="folder for the deployment copy")
@click.option("--force", is_flag=True, help="replace --out if it is an earlier bundle")
@json_output
def bundle_cmd(artifact: Path, out: Path, force: bool):
    """Copy a verified artifact without its golden (regression-gate) files: what a line runs."""
    from uadc.pipeline.bundle import bundle   # torch-free, unlike uadc.pipeline.api
    res = bundle(artifact, out, force=force)
    click.echo(res.summary_line())
    return res


@main.command("check-trt")
@click.argument("model", type=_Path(path_type=Path))
@json_output
def check_trt(model: Path):
    """List every violation of TensorRT's Q/DQ rules in an ONNX model (or artifact folder); exit 1 if any."""
    from uadc.backends.tensorrt.check import check_trt_model
    click.echo("\n".join((res := check_trt_model(model)).lines()))
    return res


@main.command("recipe-schema")
@click.option("--json", "as_json", is_flag=True, help="print the JSON Schema (for editors)")
def recipe_schema(as_json: bool) -> None:
    """Print every recipe key with its type, default and meaning."""
    from uadc.config.schema import describe_schema, json_schema
    click.echo(json.dumps(json_schema(), indent=2) if as_json else "\n".join(describe_schema()))


@main.group()
def recipes() -> None:
    """The built-in recipes: any command takes their name instead of a path (`uadc train demo`)."""


@recipes.command("list")
def recipes_list() -> None:
    """Name, what it is, and whether its data (and weights file) is found here."""
    from uadc.config.settings import recipe_lines
    click.echo("\n".join(recipe_lines()))


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print a recipe (built-in or a file), relative paths made absolute: `uadc recipes show demo > my.yaml`."""
    from uadc.config.packaged import shown_recipe
    from uadc.config.recipe import load_recipe
    p = shown_recipe(name)
    load_recipe(p.path)   # a sweep file or a README was printed as a recipe
    click.echo(p.shown_text(), nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON document")
def doctor(as_json: bool) -> None:
    """What uadc sees here: versions, CPU INT8 features, threads, GPU/TensorRT, and what each target can do here."""
    from uadc.core.io import to_json
    from uadc.pipeline.doctor import doctor as run_doctor
    with _errors_as_json(sys.stdout if as_json else None):   # Ctrl-C in its checks: a document, as elsewhere
        rep = run_doctor()
    click.echo(to_json(rep.to_dict()) if as_json else rep.to_text(), nl=not as_json)


def run() -> None:
    """The console script: once the command has exited, its exit code stands through the teardown."""
    from uadc.core.process import standard_fds_held
    standard_fds_held()
    try:
        main()
    except SystemExit:
        from uadc.core.process import settle_exit
        settle_exit()
        raise
