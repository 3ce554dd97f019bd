"""Command line: ``uadc train | eval | compile | qat | calibrators | check-trt | recipe-schema``.

User mistakes (bad recipe, missing data, bad option) print one ``error: ...`` line and exit
with code 2; nothing is written, because every artifact is written atomically at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from uadc import __version__
from uadc.errors import UadcError, exit_on_user_error


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        with exit_on_user_error():
            return super().invoke(ctx)


recipe_arg = click.argument("recipe", type=click.Path(path_type=Path))
artifacts_opt = click.option("--artifacts", type=click.Path(path_type=Path), default=None,
                             help="artifacts root (default: ./artifacts)")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="uadc")
def main() -> None:
    """uadc: compile knowledge-distillation anomaly detectors for ONNX Runtime and TensorRT."""


@main.command()
@recipe_arg
@click.option("--one-class", is_flag=True, help="train one model per category instead of one unified model")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="override train.epochs")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="evaluate on the test sets every N epochs (learning curve in the checkpoint history)")
@artifacts_opt
def train(recipe: Path, one_class: bool, epochs: int | None, eval_every: int | None, artifacts: Path | None) -> None:
    """Train the recipe's model (unified multi-class by default)."""
    from uadc.recipe import load_recipe
    from uadc.train import train_recipe
    r = load_recipe(recipe)
    if epochs:
        r = r.with_overrides(train={"epochs": epochs})
    for p in train_recipe(r, artifacts, one_class=one_class, eval_every=eval_every):
        click.echo(f"checkpoint written: {p}")


@main.command("eval")
@recipe_arg
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="default: the recipe's")
@click.option("--one-class", is_flag=True, help="evaluate the per-category models and compare with unified")
@artifacts_opt
def eval_cmd(recipe: Path, checkpoint: Path | None, one_class: bool, artifacts: Path | None) -> None:
    """Evaluate per category and mean: image/pixel AUROC, AUPRO, pixel F1-max."""
    from uadc.evaluate import run_eval, run_eval_one_class
    from uadc.recipe import load_recipe
    r = load_recipe(recipe)
    if one_class:
        run_eval_one_class(r, artifacts)
    else:
        run_eval(r, checkpoint, artifacts)


def _partitions(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


@main.command("compile")
@recipe_arg
@click.option("--target", default=None, help="ort-cpu-fp32, ort-cpu-int8, trt-fp16, trt-int8, jetson-fp32, "
              "jetson-fp16, jetson-int8 (default: the recipe's compile.target)")
@click.option("--calibrator", default=None, help="entropy | mse | minmax | percentile | a plug-in name")
@click.option("--calib-data", type=click.Choice(["train", "random-normal", "mixed"]), default=None)
@click.option("--calib-samples", type=click.IntRange(min=1), default=None)
@click.option("--quantize", default=None, help="partitions to quantize, e.g. student or student,teacher")
@click.option("--per-channel/--per-tensor", default=None, help="weight scales (default: the target's)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="artifact folder")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--dump-passes", type=click.Path(path_type=Path), default=None, help="save the model after every pass")
@click.option("--split", is_flag=True, help="also write one ONNX per partition")
@click.option("--build-engine", is_flag=True, help="build model.engine where TensorRT and a GPU exist")
@click.option("--no-eval", is_flag=True, help="skip the AD metrics (verification and latency still run)")
@click.option("--from-qat", is_flag=True, help="use the QAT model from `uadc qat` (no calibration)")
@artifacts_opt
def compile_cmd(recipe: Path, target: str | None, calibrator, calib_data, calib_samples, quantize, per_channel,
                out, checkpoint, dump_passes, split, build_engine, no_eval, from_qat, artifacts) -> None:
    """Export, run the target's passes, verify with Polygraphy and write the artifact folder."""
    from uadc.compile import CompileOptions, Compiler
    from uadc.recipe import load_recipe
    r = load_recipe(recipe)
    target = target or r["compile"]["target"]
    qat_model = None
    if from_qat:
        from uadc.qat import load_qat_model
        qat_model = load_qat_model(r, target, artifacts)
    opts = CompileOptions(target=target, calibrator=calibrator, calib_data=calib_data, calib_samples=calib_samples,
                          quantize=_partitions(quantize), per_channel=per_channel, out=out, dump_passes=dump_passes,
                          split=split, build_engine=build_engine, evaluate=not no_eval, qat_model=qat_model)
    out_dir = Compiler(r, artifacts, checkpoint, log=click.echo).compile(opts)
    _print_summary(out_dir / "report.json")


@main.command()
@recipe_arg
@click.option("--target", default=None, help="int8 target: ort-cpu-int8, trt-int8, jetson-int8 "
              "(default: the recipe's compile.target)")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="override qat.epochs")
@click.option("--compile/--no-compile", "then_compile", default=True,
              help="compile the QAT model into <artifacts>/<recipe>/<target>-qat (default: yes)")
@artifacts_opt
def qat(recipe: Path, target: str | None, epochs: int | None, then_compile: bool, artifacts: Path | None) -> None:
    """Quantization-aware fine-tuning from the PTQ placement; writes qat_<target>/qat_model.onnx."""
    from uadc.compile import CompileOptions
    from uadc.qat import QatOptions, run_qat
    from uadc.recipe import load_recipe
    r = load_recipe(recipe)
    target = target or r["compile"]["target"]
    res = run_qat(r, QatOptions(target=target, epochs=epochs), artifacts, log=click.echo)
    if then_compile:
        out = r.artifact_dir(artifacts) / f"{target}-qat"
        res.compiler.compile(CompileOptions(target=target, quantize=res.quantize, qat_model=res.model, out=out))
        _print_summary(out / "report.json")


def _print_summary(report_path: Path) -> None:
    import json
    r = json.loads(report_path.read_text())
    v = r["verification"]["torch_vs_ort_fp32"]
    click.echo(f"torch vs ORT FP32: {'passed' if v['passed'] else 'FAILED'} (max abs {v['max_abs']:.2e})")
    if "metrics" in r:
        f, c = r["metrics"]["fp32"]["mean"], r["metrics"]["compiled"]["mean"]
        click.echo(f"image AUROC fp32 {f['image_auroc']:.4f} -> {r['target']} {c['image_auroc']:.4f}; "
                   f"pixel AUROC {f['pixel_auroc']:.4f} -> {c['pixel_auroc']:.4f}")
    lat = r["latency_ms"]
    click.echo(f"latency p50 (batch 1, {lat['threads']} threads): torch {lat['torch_fp32']['p50']:.1f} ms, "
               f"ORT fp32 {lat['ort_fp32']['p50']:.1f} ms, compiled {lat['compiled']['p50']:.1f} ms; "
               f"compile {r['compile_seconds']:.1f} s")


@main.group()
def calibrators() -> None:
    """List calibrators or compare them on a recipe."""


@calibrators.command("list")
def calibrators_list() -> None:
    from calibrators import available_calibrators
    click.echo("\n".join(available_calibrators()))


@calibrators.command("compare")
@recipe_arg
@click.option("--target", default="ort-cpu-int8")
@click.option("--calibrators", "names", default="entropy,mse", help="comma-separated calibrator names")
@click.option("--calib-data", "sources", default="train,random-normal", help="comma-separated data sources")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None)
@click.option("--quantize", default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="folder for the matrix and cells")
@artifacts_opt
def calibrators_compare(recipe: Path, target, names, sources, calib_samples, quantize, out, artifacts) -> None:
    """Compile every calibrator x data cell; print image/pixel AUROC and drop vs FP32."""
    from uadc.compare import compare_calibrators
    from uadc.recipe import load_recipe
    compare_calibrators(load_recipe(recipe), target, _partitions(names), _partitions(sources), calib_samples,
                        _partitions(quantize), out, artifacts, log=click.echo)


@main.command("check-trt")
@click.argument("model", type=click.Path(path_type=Path))
def check_trt(model: Path) -> None:
    """List every violation of TensorRT's explicit-quantization (Q/DQ) rules in an ONNX model."""
    import onnx
    from uadc.backends.trt_rules import check_trt_rules, format_violations
    if not model.is_file():
        raise UadcError(f"model not found: {model}")
    try:
        proto = onnx.load(str(model))
    except Exception as exc:
        raise UadcError(f"cannot read ONNX model {model}: {exc}") from None
    violations = check_trt_rules(proto)
    click.echo(format_violations(violations) if violations else f"{model}: 0 violations of TensorRT Q/DQ rules")
    sys.exit(1 if violations else 0)


@main.command("recipe-schema")
def recipe_schema() -> None:
    """Print every recipe key with its type, default and meaning."""
    from uadc.recipe import describe_schema
    click.echo("\n".join(describe_schema()))


if __name__ == "__main__":
    main()
