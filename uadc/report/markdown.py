"""report.json -> report.md. The JSON schema (version ``REPORT_SCHEMA`` in uadc.pipeline.compile):

- ``schema``, ``target``, ``precision``, ``runtime``, ``calibrator``, ``calib_data``,
  ``quantized_partitions``, ``recipe``, ``recipe_hash``, ``checkpoint``
- ``metrics``: ``fp32`` / ``compiled`` (and ``emulated_int8`` for TensorRT INT8 targets), each
  ``{"mean": {image_auroc, pixel_auroc, aupro, pixel_f1}, "categories": {cat: {...}}}``, and
  ``drop`` = fp32 - compiled with the same shape
- ``latency_ms``: ``torch_fp32``, ``ort_fp32``, ``compiled`` each ``{p50, p90, runs}``, plus
  ``batch`` and ``threads``
- ``verification``: ``torch_vs_ort_fp32`` {passed, max_abs, mean_abs, atol, outputs} and
  ``fp32_vs_compiled`` {max_abs, mean_abs, outputs}
- ``bytes`` (initializer bytes per partition), ``model_bytes``, ``nodes`` and ``qdq_nodes`` per
  partition, ``passes`` [{name, seconds, nodes_before, nodes_after}], ``compile_seconds``
- ``environment`` (cpu, cores, threads, versions), ``engine`` (TensorRT targets)
"""

from __future__ import annotations

from uadc.core.constants import METRIC_KEYS


def _metrics_table(metrics: dict) -> list[str]:
    fp32, comp, drop = metrics["fp32"], metrics["compiled"], metrics["drop"]
    rows = ["| category | metric | FP32 | compiled | drop |", "|---|---|---:|---:|---:|"]
    for cat in list(fp32["categories"]) + ["mean"]:
        f = fp32["mean"] if cat == "mean" else fp32["categories"][cat]
        c = comp["mean"] if cat == "mean" else comp["categories"][cat]
        d = drop["mean"] if cat == "mean" else drop["categories"][cat]
        for k in METRIC_KEYS:
            rows.append(f"| {cat} | {k} | {f[k]:.4f} | {c[k]:.4f} | {d[k]:+.4f} |")
    return rows


def render_markdown(r: dict) -> str:
    lines = [f"# uadc compile report: {r['recipe']} → {r['target']}", "",
             f"- precision: **{r['precision']}** on {r['runtime']}",
             f"- quantized partitions: {', '.join(r['quantized_partitions']) or 'none'}"]
    if r.get("calibrator"):
        lines.append(f"- calibrator: **{r['calibrator']}**, calibration data: **{r['calib_data']}**")
    lines += [f"- compile time (export → passes → verification, without AD metrics): "
              f"{r.get('compile_seconds', float('nan')):.1f} s", ""]
    v = r["verification"]
    t = v["torch_vs_ort_fp32"]
    lines += ["## Verification (Polygraphy)", "",
              f"- torch eager FP32 vs ONNX Runtime FP32: **{'PASSED' if t['passed'] else 'FAILED'}** "
              f"(max abs {t['max_abs']:.3g}, atol {t['atol']:g})",
              f"- ONNX Runtime FP32 vs compiled: max abs {v['fp32_vs_compiled']['max_abs']:.4g}, "
              f"mean abs {v['fp32_vs_compiled']['mean_abs']:.4g}", ""]
    if "metrics" in r:
        lines += ["## Anomaly-detection metrics", ""]
        if "compiled_note" in r["metrics"]:
            lines += [f"> {r['metrics']['compiled_note']}", ""]
        lines += _metrics_table(r["metrics"]) + [""]
    lat = r["latency_ms"]
    lines += [f"## Latency (batch {lat['batch']}, {lat['threads']} threads, {r['environment']['cpu']})", "",
              "| runtime | p50 ms | p90 ms |", "|---|---:|---:|"]
    for k in ("torch_fp32", "ort_fp32", "compiled"):
        lines.append(f"| {k} | {lat[k]['p50']:.2f} | {lat[k]['p90']:.2f} |")
    lines += ["", "## Size", "", "| partition | nodes | Q/DQ nodes | weight bytes |", "|---|---:|---:|---:|"]
    for p, b in r["bytes"].items():
        lines.append(f"| {p} | {r['nodes'].get(p, 0)} | {r['qdq_nodes'].get(p, 0)} | {b:,} |")
    lines += ["", "## Passes", "", "| pass | seconds | nodes before | nodes after |", "|---|---:|---:|---:|"]
    for p in r["passes"]:
        lines.append(f"| {p['name']} | {p['seconds']:.2f} | {p['nodes_before']} | {p['nodes_after']} |")
    if "engine" in r:
        lines += ["", "## TensorRT engine", "", f"- {r['engine'].get('status', '')}"]
    env = r["environment"]
    lines += ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)
