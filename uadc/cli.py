"""Command line: ``uadc train | eval | compile | qat | calibrators | check-trt | recipe-schema``.

The only module that talks to the terminal. It calls the public API (``uadc.pipeline.api``) and
prints from the typed results. A user mistake (UadcError) prints one ``error: ...`` line and
exits with code 2; nothing is written, because every artifact is written atomically at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

import click

from uadc import __version__
from uadc.core.errors import UadcError

log = logging.getLogger("uadc")


@contextlib.contextmanager
def exit_on_user_error(interrupted: str = "interrupted; no artifact was written for the unfinished step"
                       ) -> Iterator[None]:
    """A UadcError becomes one ``error: ...`` line (on its own line) and its exit code."""
    try:
        yield
    except UadcError as exc:
        _newline_after_bar()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _newline_after_bar()
        click.echo(interrupted, err=True)
        sys.exit(130)


def _newline_after_bar() -> None:
    # A progress bar may have left the cursor mid-line on a terminal.
    if sys.stderr.isatty():
        sys.stderr.write("\n")


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        with exit_on_user_error():
            return super().invoke(ctx)


class _LogHandler(logging.Handler):
    """Log records to stderr through tqdm.write so they never glue onto a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from uadc.core.progress import set_progress
    handler = _LogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("uadc")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    if quiet:
        set_progress(False)


recipe_arg = click.argument("recipe", type=click.Path(path_type=Path))
artifacts_opt = click.option("--artifacts", type=click.Path(path_type=Path), default=None,
                             help="artifacts root (default: ./artifacts)")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="uadc")
@click.option("-v", "--verbose", is_flag=True, help="also show debug logs and third-party output")
@click.option("-q", "--quiet", is_flag=True, help="only warnings and errors; no progress bars")
def main(verbose: bool, quiet: bool) -> None:
    """uadc: compile knowledge-distillation anomaly detectors for ONNX Runtime and TensorRT."""
    _setup_logging(verbose, quiet)


@main.command()
@recipe_arg
@click.option("--one-class", is_flag=True, help="train one model per category instead of one unified model")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None, help="override train.epochs")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="evaluate on the test sets every N epochs (learning curve in the checkpoint history)")
@artifacts_opt
def train(recipe: Path, one_class: bool, epochs: int | None, eval_every: int | None, artifacts: Path | None) -> None:
    """Train the recipe's model (unified multi-class by default)."""
    from uadc.pipeline import api
    res = api.train(recipe, one_class=one_class, epochs=epochs, eval_every=eval_every, artifacts=artifacts)
    for m in res.models:
        click.echo(f"checkpoint written: {m.checkpoint} ({m.train_seconds:.1f} s of training)")


@main.command("eval")
@recipe_arg
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="default: the recipe's")
@click.option("--one-class", is_flag=True, help="evaluate the per-category models and compare with unified")
@artifacts_opt
def eval_cmd(recipe: Path, checkpoint: Path | None, one_class: bool, artifacts: Path | None) -> None:
    """Evaluate per category and mean: image/pixel AUROC, AUPRO, pixel F1-max."""
    from uadc.config.recipe import load_recipe
    from uadc.evaluation.run import format_comparison, format_table
    from uadc.pipeline import api
    r = load_recipe(recipe)
    if one_class:
        res = api.evaluate(r, one_class=True, artifacts=artifacts)
        click.echo(format_table(res.one_class, f"{r.name} (one model per category)"))
        click.echo(format_comparison(res.unified, res.one_class) if res.unified else
                   "no unified eval.json yet: run `uadc eval` for the unified-vs-one-class table")
        return
    res = api.evaluate(checkpoint or r, r, artifacts=artifacts)
    click.echo(format_table(res, f"{r.name} (unified, {res.extra.get('epochs')} epochs)"))
    for cat, kinds in res.defects.items():
        click.echo(f"{cat}: " + ", ".join(f"{k} {v['image_auroc']:.3f}/{v['pixel_auroc']:.3f}" for k, v in kinds.items())
                   + "  (image/pixel AUROC per defect type)")
    click.echo(f"written: {res.path}")


def _partitions(value: str | None) -> list[str] | None:
    """``a,b`` -> [a, b]; an empty item (``,``) is a user error, not "the default"."""
    if value is None:
        return None
    items = [p.strip() for p in value.split(",")]
    if not items or any(not p for p in items):
        raise UadcError(f"expected a comma-separated list without empty items, got {value!r}")
    return items


@main.command("compile")
@recipe_arg
@click.option("--target", default=None, help="ort-cpu-fp32, ort-cpu-int8, trt-fp16, trt-int8, jetson-fp32, "
              "jetson-fp16, jetson-int8 (default: the recipe's compile.target)")
@click.option("--calibrator", default=None, help="entropy | mse | minmax | percentile | a plug-in name")
@click.option("--calib-data", type=click.Choice(["train", "random-normal", "mixed"]), default=None)
@click.option("--calib-samples", type=click.IntRange(min=1, max=4096), default=None)
@click.option("--quantize", default=None, help="partitions to quantize, e.g. student or student,teacher")
@click.option("--per-channel/--per-tensor", default=None, help="weight scales (default: the target's)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="artifact folder")
@click.option("--force", is_flag=True, help="replace an existing uadc artifact folder at --out")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--dump-passes", type=click.Path(path_type=Path), default=None, help="save the model after every pass")
@click.option("--split", is_flag=True, help="also write one ONNX per partition")
@click.option("--build-engine", is_flag=True, help="build model.engine where TensorRT and a GPU exist")
@click.option("--no-eval", is_flag=True, help="skip the AD metrics (verification and latency still run)")
@click.option("--from-qat", is_flag=True, help="use the QAT model from `uadc qat` (no calibration)")
@click.option("--train-if-missing", is_flag=True, help="train the recipe first when it has no checkpoint")
@artifacts_opt
def compile_cmd(recipe: Path, target: str | None, calibrator, calib_data, calib_samples, quantize, per_channel,
                out, force, checkpoint, dump_passes, split, build_engine, no_eval, from_qat, train_if_missing,
                artifacts) -> None:
    """Export, run the target's passes, verify with Polygraphy and write the artifact folder."""
    from uadc.config.recipe import load_recipe
    from uadc.pipeline import api
    from uadc.training.checkpoint import checkpoint_path
    r = load_recipe(recipe)
    target = target or r.compile.target
    if dump_passes is not None and dump_passes.exists() and not dump_passes.is_dir():
        raise UadcError(f"--dump-passes: not a folder: {dump_passes}")
    if checkpoint is None and not checkpoint_path(r, artifacts).is_file():
        if not train_if_missing:
            raise UadcError(f"no checkpoint for recipe {r.name!r} at {checkpoint_path(r, artifacts)}: run "
                            f"`uadc train {recipe}` first (or pass --train-if-missing)")
        log.info("no checkpoint: training the recipe first (--train-if-missing)")
        api.train(r, artifacts=artifacts)
    qat_model = None
    if from_qat:
        from uadc.quant.qat.run import load_qat_model
        qat_model = load_qat_model(r, target, artifacts)
    res = api.compile(checkpoint or r, target, recipe=r, calibration=calib_data, calibrator=calibrator,
                      calib_samples=calib_samples, quantize=_partitions(quantize), per_channel=per_channel, out=out,
                      force=force, dump_passes=dump_passes, split=split, build_engine=build_engine,
                      evaluate=not no_eval, qat_model=qat_model, artifacts=artifacts)
    _print_summary(res)


@main.command()
@recipe_arg
@click.option("--target", default=None, help="int8 target: ort-cpu-int8, trt-int8, jetson-int8 "
              "(default: the recipe's compile.target)")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None, help="override qat.epochs")
@click.option("--compile/--no-compile", "then_compile", default=True,
              help="compile the QAT model into <artifacts>/<recipe>/<target>-qat (default: yes)")
@artifacts_opt
def qat(recipe: Path, target: str | None, epochs: int | None, then_compile: bool, artifacts: Path | None) -> None:
    """Quantization-aware fine-tuning from the PTQ placement; writes qat_<target>/qat_model.onnx."""
    from uadc.pipeline import api
    res = api.qat(recipe, target, epochs=epochs, compile_after=then_compile, artifacts=artifacts)
    click.echo(f"QAT model written: {res.qat_model_path}")
    if res.compiled is not None:
        _print_summary(res.compiled)


def _print_summary(res) -> None:
    v = res.verification["torch_vs_ort_fp32"]
    click.echo(f"torch vs ORT FP32: {'passed' if v['passed'] else 'FAILED'} (max abs {v['max_abs']:.2e})")
    if res.metrics is not None:
        f, c = res.metrics.fp32["mean"], res.metrics.compiled["mean"]
        click.echo(f"image AUROC fp32 {f['image_auroc']:.4f} -> {res.target} {c['image_auroc']:.4f}; "
                   f"pixel AUROC {f['pixel_auroc']:.4f} -> {c['pixel_auroc']:.4f}")
    lat = res.latency
    click.echo(f"latency p50 (batch 1, {lat.threads} threads): torch {lat.torch_fp32['p50']:.2f} ms, "
               f"ORT fp32 {lat.ort_fp32['p50']:.2f} ms, compiled {lat.compiled['p50']:.2f} ms "
               f"({lat.runtime}); compile {res.compile_seconds:.1f} s")
    if res.engine:
        click.echo(res.engine.get("status", ""))
    click.echo(f"artifact written: {res.path}")


@main.group()
def calibrators() -> None:
    """List calibrators or compare them on a recipe."""


@calibrators.command("list")
def calibrators_list() -> None:
    from uadc.calibrators import available_calibrators
    click.echo("\n".join(available_calibrators()))


@calibrators.command("compare")
@recipe_arg
@click.option("--target", default="ort-cpu-int8")
@click.option("--calibrators", "names", default="entropy,mse", help="comma-separated calibrator names")
@click.option("--calib-data", "sources", default="train,random-normal", help="comma-separated data sources")
@click.option("--calib-samples", type=click.IntRange(min=1, max=4096), default=None)
@click.option("--quantize", default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="folder for the matrix and cells")
@artifacts_opt
def calibrators_compare(recipe: Path, target, names, sources, calib_samples, quantize, out, artifacts) -> None:
    """Compile every calibrator x data cell; print image/pixel AUROC and drop vs FP32."""
    from uadc.pipeline import api
    res = api.compare_calibrators(recipe, target, _partitions(names), _partitions(sources),
                                  calib_samples=calib_samples, quantize=_partitions(quantize), out=out,
                                  artifacts=artifacts)
    click.echo(res["markdown"])


@main.command("check-trt")
@click.argument("model", type=click.Path(path_type=Path))
def check_trt(model: Path) -> None:
    """List every violation of TensorRT's explicit-quantization (Q/DQ) rules in an ONNX model."""
    from uadc.backends.tensorrt.rules import check_trt_rules, format_violations
    from uadc.export.onnx_export import load_onnx
    violations = check_trt_rules(load_onnx(model))
    click.echo(format_violations(violations) if violations else f"{model}: 0 violations of TensorRT Q/DQ rules")
    sys.exit(1 if violations else 0)


@main.command("recipe-schema")
@click.option("--json", "as_json", is_flag=True, help="print the JSON Schema (for editors)")
def recipe_schema(as_json: bool) -> None:
    """Print every recipe key with its type, default and meaning."""
    from uadc.config.recipe import describe_schema, json_schema
    click.echo(json.dumps(json_schema(), indent=2) if as_json else "\n".join(describe_schema()))


if __name__ == "__main__":
    main()
