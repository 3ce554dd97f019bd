"""``python -m bench.verify_detection``: does the regression gate (``uadc verify``) pass what it
should and fail what it should, on the default recipe, with normal images only?

One FP32 artifact is compiled and its golden set is the reference for every case. Cases:

* should PASS: an identical rebuild (a fresh export from the same checkpoint), the recipe's
  student-INT8 artifact, QAT (``uadc qat``; an existing QAT model of this checkpoint is reused);
* should FAIL (injected regressions): one student conv weight x1.1 (the first student Conv in
  graph order), the entropy calibrator, calibration with 1 sample, teacher+student INT8 with
  per-tensor weight scales, and a wrong input normalisation baked in front of the FP32 model.
  For EfficientNet-Lite the input normalisation is mean = std = 0.5, so a literal mean/std swap
  is the identity; the wrong-normalisation cases are therefore ImageNet's mean/std swapped
  (mean (0.229, 0.224, 0.225), std (0.485, 0.456, 0.406)) and ImageNet's mean/std used as is.

Every case is judged by ``uadc.verify(case, golden=FP32, normal_only=True)`` with the recipe's
budgets (set once, for all cases). A second, labelled run adds the image AUROC drop on the
golden test images for context (not used by the verdict). Writes ``verify_detection.md`` and
``.json`` to ``--out`` and prints the Markdown table.
"""

from __future__ import annotations

from bench import as_script, summary

import shutil
import time
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import helper, numpy_helper

import uadc
from uadc.core.constants import INPUT_NAME
from uadc.core.io import atomic_write_json, atomic_write_text

SHOWN = ("spearman", "decision_agreement", "map_dice", "top1_overlap", "score_ratio", "score_shift")


def scale_first_student_conv(src: Path, dst: Path, factor: float) -> str:
    """Copy the artifact and scale the first student Conv's weight; returns the Conv's name."""
    from uadc.export.partitions import partition_of
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"))
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and partition_of(n) == "student")
    init = next(i for i in m.graph.initializer if i.name == conv.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(m, str(dst / "model.onnx"))
    _rehash(dst)
    return conv.name


def wrong_normalisation(src: Path, dst: Path, right: tuple, wrong: tuple) -> None:
    """Copy the artifact with nodes in front of the model that turn correctly normalised input
    into what a pipeline normalising with ``wrong`` (mean, std) would feed it."""
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"))
    (rm, rs), (wm, ws) = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in right), \
        (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in wrong)
    # pixel = x * rs + rm; fed = (pixel - wm) / ws = x * (rs / ws) + (rm - wm) / ws
    m.graph.initializer.extend([numpy_helper.from_array(rs / ws, "wrongnorm_scale"),
                                numpy_helper.from_array((rm - wm) / ws, "wrongnorm_shift")])
    for n in m.graph.node:
        n.input[:] = ["wrongnorm_x" if i == INPUT_NAME else i for i in n.input]
    m.graph.node.insert(0, helper.make_node("Mul", [INPUT_NAME, "wrongnorm_scale"], ["wrongnorm_s"]))
    m.graph.node.insert(1, helper.make_node("Add", ["wrongnorm_s", "wrongnorm_shift"], ["wrongnorm_x"]))
    onnx.save(m, str(dst / "model.onnx"))
    _rehash(dst)


def _rehash(folder: Path) -> None:
    """The edited model's sha256 into artifact.json: `uadc verify` refused the case as tampered with
    (its sha256 check), so the bench stopped at its first injected regression."""
    from uadc.core.manifest import read_manifest, write_manifest
    write_manifest(folder, read_manifest(folder, verify=False))


def _qat(recipe, base, art: Path, out: Path):
    from uadc.quant.qat.run import load_qat_model
    try:
        qm = load_qat_model(recipe, "ort-cpu-int8", art)
    except uadc.UadcError:   # fine-tuned where `uadc qat` keeps it; compiled into the bench's folder below, not
        uadc.qat(recipe, "ort-cpu-int8", artifacts=art, source=base.checkpoint, compile_after=False)  # <target>-qat
        qm = load_qat_model(recipe, "ort-cpu-int8", art)
    return uadc.compile(base, "ort-cpu-int8", qat_model=qm, out=out, force=True, evaluate=False, latency_runs=1).path


@click.command(help=summary(__doc__), context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=Path("recipes/stfpm_effnet_lite0.yaml"))
@click.option("--artifacts", type=click.Path(path_type=Path), default=None, help="artifacts root (checkpoint inside)")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="folder for the result tables (verify_detection.md / .json; default: <artifacts>/bench_verify_detection)")
@click.option("--reuse", is_flag=True, help="reuse case artifacts already in <artifacts>/<recipe>/verify_bench")
def main(recipe_path: Path, artifacts: Path | None, out: Path | None, reuse: bool) -> None:
    t_all = time.time()
    recipe = uadc.load_recipe(recipe_path)
    out = out or recipe.artifact_dir(artifacts).parent / "bench_verify_detection"
    base = uadc.baseline(recipe, artifacts=artifacts)   # no checkpoint: one line, before any folder is made
    root = recipe.artifact_dir(artifacts) / "verify_bench"
    root.mkdir(parents=True, exist_ok=True)

    def comp(name: str, target: str, **kw) -> Path:
        if reuse and (root / name / "model.onnx").is_file():
            return root / name
        click.echo(f"compiling {name} ...", err=True)
        kw.setdefault("precision", "target")  # each case is one fixed quantization, never a search
        return uadc.compile(base, target, out=root / name, force=True, evaluate=False, latency_runs=1, **kw).path

    fp32 = comp("fp32", "ort-cpu-fp32")
    cases: list[tuple[str, str, Path]] = []
    if not (reuse and (root / "rebuild" / "model.onnx").is_file()):
        rebuild = uadc.baseline(recipe, artifacts=artifacts)  # a fresh export of the same checkpoint
        click.echo("compiling identical rebuild ...", err=True)
        uadc.compile(rebuild, "ort-cpu-fp32", out=root / "rebuild", force=True, evaluate=False, latency_runs=1)
    cases.append(("identical rebuild (fresh export, FP32)", "PASS", root / "rebuild"))
    c = recipe.compile
    cases.append((f"student INT8 (recipe PTQ: {c.calibrator or 'minmax'}, {c.calib_data}, {c.calib_samples})", "PASS",
                  comp("int8", "ort-cpu-int8")))
    click.echo("QAT ...", err=True)
    done = [p for p in (root / "qat", recipe.artifact_dir(artifacts) / "ort-cpu-int8-qat") if (p / "model.onnx").is_file()]
    qat = done[0] if reuse and done else _qat(recipe, base, artifacts, root / "qat")
    cases.append(("student INT8 QAT", "PASS", qat))
    conv = scale_first_student_conv(fp32, _fresh(root / "conv_x1.1"), 1.1)
    cases.append((f"student conv weight x1.1 ({conv})", "FAIL", root / "conv_x1.1"))
    cases.append(("entropy calibrator", "FAIL", comp("entropy", "ort-cpu-int8", calibrator="entropy")))
    cases.append(("calibration with 1 sample", "FAIL", comp("calib1", "ort-cpu-int8", calib_samples=1)))
    cases.append(("teacher+student INT8, per-tensor weights", "FAIL",
                  comp("per_tensor", "ort-cpu-int8", quantize=["teacher", "student"], per_channel=False)))
    right = recipe.normalization()
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    wrong_normalisation(fp32, _fresh(root / "norm_swapped"), right, imagenet[::-1])
    cases.append(("input normalisation: ImageNet mean/std swapped", "FAIL", root / "norm_swapped"))
    wrong_normalisation(fp32, _fresh(root / "norm_imagenet"), right, imagenet)
    cases.append(("input normalisation: ImageNet mean/std instead of (0.5, 0.5)", "FAIL", root / "norm_imagenet"))

    rows = []
    for name, expected, path in cases:
        click.echo(f"verifying {name} ...", err=True)
        v = uadc.verify(path, golden=fp32, normal_only=True)
        full = uadc.verify(path, golden=fp32)
        drop = full.labelled["all"]["image_auroc_drop"] if full.labelled else None
        got = "PASS" if v.passed else "FAIL"
        caught = [f.name + ("" if f.scope == "all" else f"[{f.scope}]") for f in v.figures if not f.passed]
        rows.append({"case": name, "expected": expected, "result": got, "ok": got == expected, "caught_by": caught,
                     "figures": {k: v.figure(k).value for k in SHOWN}, "image_auroc_drop_labelled": drop,
                     "verify_seconds": round(v.seconds, 1), "images": v.images, "path": str(path)})
    md = _markdown(rows, v.budgets, v.images, time.time() - t_all)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "verify_detection.json", {"rows": rows, "budgets": v.budgets})
    atomic_write_text(out / "verify_detection.md", md)
    click.echo(md)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def _caught(failures: list[str]) -> str:
    """``spearman`` when a figure fails over all images, ``map_iou[bottle]`` when only per category."""
    names: dict[str, list[str]] = {}
    for f in failures:
        name, _, cat = f.partition("[")
        names.setdefault(name, []).append(cat.rstrip("]") or "all")
    return ", ".join(n if "all" in cats else f"{n}[{', '.join(cats)}]" for n, cats in names.items()) or "-"


def _markdown(rows: list[dict], budgets: dict, images: dict, seconds: float) -> str:
    head = ["case", "expected", "gate", "caught by (figure[category] out of budget)", *SHOWN, "image AUROC drop*"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r["figures"]
        drop = "n/a" if r["image_auroc_drop_labelled"] is None else f"{r['image_auroc_drop_labelled'] * 100:+.1f} pt"
        lines.append(f"| {r['case']} | {r['expected']} | {r['result']}{'' if r['ok'] else ' (!)'} | "
                     f"{_caught(r['caught_by'])} | " + " | ".join("n/a" if f[k] is None else f"{f[k]:.3f}" for k in SHOWN) +
                     f" | {drop} |")
    n_ok = sum(r["ok"] for r in rows)
    b = ", ".join(f"{k} {v:g}" for k, v in budgets.items() if not k.endswith("drop_max"))
    lines += ["", f"{n_ok}/{len(rows)} cases judged as expected. Images: {images} (normal images only; "
              f"per-category figures judged too). Budgets (recipe defaults, the same for every case): {b}. "
              f"*Image AUROC drop on the golden set's labelled test images, for context only (not judged "
              f"here). Bench wall time {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    as_script(main)
