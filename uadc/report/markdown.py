"""report.json -> report.md. The JSON schema (version ``REPORT_SCHEMA`` in uadc.pipeline.compile):

- ``schema``, ``target``, ``precision``, ``runtime``, ``calibrator``, ``calib_data``,
  ``quantized_partitions``, ``recipe``, ``recipe_hash``, ``checkpoint``
- ``metrics``: ``fp32`` / ``compiled`` (and ``emulated_int8`` for TensorRT INT8 targets), each
  ``{"mean": {image_auroc, pixel_auroc, aupro, pixel_f1}, "categories": {cat: {...}}}``, and
  ``drop`` = fp32 - compiled with the same shape
- ``latency_ms``: ``torch_fp32``, ``ort_fp32``, ``compiled`` each ``{p50, p90, runs}``, plus
  ``batch`` and ``threads``; ``deployed`` (ONNX Runtime targets, more than one thread): ``compiled``
  as ``uadc predict`` runs it (``uadc.backends.parallel``), with its ``schedule``
- ``verification``: ``torch_vs_ort_fp32`` {passed, max_abs, mean_abs, atol, outputs} and
  ``fp32_vs_compiled`` {max_abs, mean_abs, outputs}; ``gate`` {passed, failures, seconds}: the artifact's
  own regression gate (``uadc verify``; CPU targets); TensorRT precision auto with FP16 layers:
  ``fp16_typed_vs_simulated`` {nodes_fp16, max_abs, mean_abs, outputs} (the shipped FP16-typed
  model against the simulation its AUROC comes from, both on ONNX Runtime)
- ``bytes`` (initializer bytes per partition), ``model_bytes``, ``nodes`` and ``qdq_nodes`` per
  partition, ``passes`` [{name, seconds, nodes_before, nodes_after}], ``compile_seconds``
- ``environment`` (cpu, cores, threads, versions), ``engine`` (TensorRT targets)
- ``precision_search`` (``precision: auto`` only): ``budget``, ``candidates``, ``images``, ``profile``
  (ONNX Runtime's, the speed model of every target), ``fidelity_runtime`` (where candidates ran),
  ``groups`` [{name, partition, op, nodes, precision, fp32_us, int8_us, fidelity_cost, reason}],
  ``steps`` [{step, int8_groups, predicted_us, fidelity}], ``final``, ``seconds``
- ``deploy`` (schema 3): ``false_alarm_rate``, ``estimator``, ``validation`` {cat: images},
  ``thresholds`` {fp32, compiled} (uadc.core.manifest.Thresholds), ``decisions`` {categories:
  {cat: {fp32, compiled: {false_reject_rate, escape_rate, ...}, agreement, mask {dice, iou}}}, overall}
"""

from __future__ import annotations

from uadc.core.constants import METRIC_KEYS
from uadc.core.errors import md_cell
from uadc.core.manifest import GLOBAL
from uadc.core.numbers import fixed, fixed_difference


def signed(value: float | None, missing: str = "-") -> str:
    """A change to 4 decimals with its sign; a rounding-size negative is +0.0000, not -0.0000."""
    return missing if value is None else fixed(value, 4, sign=True)


def _metrics_table(metrics: dict) -> list[str]:
    fp32, comp = metrics["fp32"], metrics["compiled"]
    rows = ["| category | metric | FP32 | compiled | drop |", "|---|---|---:|---:|---:|"]
    for cat in list(fp32["categories"]) + ["mean"]:
        f = fp32["mean"] if cat == "mean" else fp32["categories"][cat]
        c = comp["mean"] if cat == "mean" else comp["categories"][cat]
        for k in METRIC_KEYS:
            if k in f:   # pixel metrics only where the test set has masks; the drop of the figures shown
                rows.append(f"| {md_cell(cat)} | {k} | {f[k]:.4f} | {c[k]:.4f} | {fixed_difference(f[k], c[k])} |")
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _deploy_lines(d: dict) -> list[str]:
    """Operating thresholds (label-free) and the decisions they make on the test sets."""
    counts = ", ".join(f"{c}: {n}" for c, n in d["validation"].items()) if any(d["validation"].values()) \
        else "no"   # "( images)" before; "stripes: 0, gray: 0" said no more
    lines = ["## Operating point and decisions", "",
             f"- target false-alarm rate **{_pct(d['false_alarm_rate'])}**; thresholds from each model's own outputs "
             f"on validation normals only ({counts} images)"]
    if d.get("estimator"):
        lines.append(f"- estimator: {d['estimator']}")
    if d.get("note"):
        lines += ["", f"> {d['note']}"]
    thr = d["thresholds"]
    lines += ["", "| category | FP32 image thr | compiled image thr | compiled pixel thr |", "|---|---:|---:|---:|"]
    comp, none = thr.get("compiled") or {}, {c for c, n in d["validation"].items() if not n}
    rows = [(c, t, (thr.get("fp32") or {}).get("categories", {}).get(c)) for c, t in (comp.get("categories") or {}).items()]
    if comp.get(GLOBAL):   # uncategorised images, and the in-graph default
        rows.append((GLOBAL, comp[GLOBAL], (thr.get("fp32") or {}).get(GLOBAL)))
    for cat, t, f in rows:
        fp32 = f"{f['image']['value']:.5g}" if f else "n/a"
        name = md_cell(cat) + (" (no validation normals: the global ones)" if cat in none else "")
        lines.append(f"| {name} | {fp32} | {t['image']['value']:.5g} | {t['pixel']['value']:.5g} |")
    dec = d.get("decisions")
    if dec:
        lines += ["", "| category | false-reject FP32 | false-reject compiled | escape FP32 | escape compiled | "
                      "decision agreement | mask Dice | mask IoU |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for cat, c in list(dec["categories"].items()) + [("all", dec["overall"])]:
            m = c.get("mask")
            dice_iou = f"{m['dice']:.3f} | {m['iou']:.3f}" if m else " | "
            f, k = c["fp32"], c["compiled"]
            lines.append(f"| {md_cell(cat)} | {_pct(f['false_reject_rate'])} | {_pct(k['false_reject_rate'])}"
                         f" | {_pct(f['escape_rate'])} | {_pct(k['escape_rate'])} | "
                         f"{_pct(c['agreement'])} ({c['disagreements']} differ) | {dice_iou} |")
        lines += ["", "Test labels are only reported here; no threshold is set on them."]
    return lines + [""]


def _speed_line(p: dict) -> str:
    f, prof = p["final"], p["profile"]
    if "gpu" in prof:  # TensorRT: modelled, not profiled
        fs = p["float_stage"]
        return (f"- modelled on {prof['gpu']} ({prof['model']}): float layers {fs['fp16_groups']} of "
                f"{fs['groups']} groups FP16 (the rest FP32); INT8 candidates all float {prof['float_us']:.1f} µs, "
                f"all INT8 {prof['all_int8_us']:.1f} µs, chosen {f['predicted_us']:.1f} µs")
    return (f"- predicted (ORT profile, batch {prof['batch']}): all FP32 {prof['fp32_us']:.0f} µs, all INT8 "
            f"{prof['all_int8_us']:.0f} µs, chosen {f['predicted_us']:.0f} µs")


def float_counts(p: dict) -> str:
    """The float groups of a precision search by precision: "21 FP32", "20 BF16", "40 FP16, 2 FP32"."""
    counts: dict[str, int] = {}
    for g in p["groups"]:
        if g["precision"] != "int8":
            counts[g["precision"]] = counts.get(g["precision"], 0) + 1
    return ", ".join(f"{n} {k.upper()}" for k, n in sorted(counts.items())) or "0 float"


def _precision_lines(p: dict) -> list[str]:
    """``precision: auto``: every group's decision with its speed each way and fidelity cost."""
    f = p["final"]
    fp16 = "float_stage" in p
    budget = ", ".join(f"{k} ≥ {v:g}" for k, v in p["budget"].items())
    lines = ["## Precision search (precision: auto)", "",
             f"- {f['int8_groups']} groups INT8, {float_counts(p)}, chosen in "
             f"{p['seconds']:.1f} s; budget {budget}",
             _speed_line(p),
             f"- fidelity of the chosen assignment vs FP32 (run on {p.get('fidelity_runtime', 'onnxruntime CPU')}): "
             + ", ".join(f"{k} {v:.4f}" for k, v in f["fidelity"].items()),
             "- fidelity cost: of the group's unit (consecutive INT8 groups quantized alone, probe images: "
             + ", ".join(f"{c} {n}" for c, n in p.get("sensitivity_images", {}).items()) + ")",
             *([f"- spearman: per category for {', '.join(p['rank_sets']) or 'none'} (≥ {p['rank_min_images']} "
                "images), and over every category pooled"] if "rank_sets" in p else []), "",
             "| step | INT8 groups | predicted µs | " + " | ".join(p["budget"]) + " |",
             "|---|---:|---:|" + "---:|" * len(p["budget"])]
    for st in p["steps"]:
        lines.append(f"| {st['step']} | {st['int8_groups']} | {st['predicted_us']:.1f} | "
                     + " | ".join(f"{st['fidelity'][k]:.4f}" for k in p["budget"]) + " |")
    lines += ["", f"| group | partition | op | precision | FP32 µs |{' FP16 µs |' if fp16 else ''} INT8 µs | "
              "fidelity cost | why |", f"|---|---|---|---|---:|{'---:|' if fp16 else ''}---:|---:|---|"]
    for g in p["groups"]:
        cost = "" if g["fidelity_cost"] is None else fixed(g["fidelity_cost"])
        half = f" {g['fp16_us']:.1f} |" if fp16 else ""
        lines.append(f"| {g['name']} | {g['partition']} | {g['op']} | {g['precision']} | {g['fp32_us']:.1f} |{half} "
                     f"{g['int8_us']:.1f} | {cost} | {g['reason']} |")
    if fp16:
        lines += ["", "Float groups kept FP32 by the float stage: " + (", ".join(
            f"{g['name']} ({g['reason']})" for g in p["float_stage"]["kept_fp32"]) or "none") + "."]
    return lines + [""]


def _abs_diffs(c: dict) -> str:
    """Max and mean absolute differences, per output where given (an anomaly map's pixels and a
    score each; `mean_abs` alone is their two means' mean)."""
    outs = c.get("outputs") or {}
    if not outs:
        return f"max abs {c['max_abs']:.4g}, mean abs {c['mean_abs']:.4g}"
    return "; ".join(f"{md_cell(n)} max abs {o['max_abs']:.4g}, mean abs {o['mean_abs']:.4g}" for n, o in outs.items())


def render_markdown(r: dict) -> str:
    lines = [f"# uadc compile report: {r['recipe']} → {r['target']}", "",
             f"- precision: **{r['precision']}** on {r['runtime']}",
             f"- quantized partitions: {', '.join(r['quantized_partitions']) or 'none'}"]
    if m := r.get("model"):   # which detector: the recipe name alone did not say
        dcam = {True: ", trained with DCAM", False: "", None: ""}[m.get("dcam")]
        lines.append(f"- model: {m['method']} on {m['backbone']}, taps {', '.join(m.get('taps') or [])}{dcam}")
    if r.get("calibrator") == "qat":   # "calibration data: **None**" before
        lines.append("- calibrator: **qat** (scales learned by quantization-aware fine-tuning, `uadc qat`)")
    elif r.get("calibrator"):
        lines.append(f"- calibrator: **{r['calibrator']}**, calibration data: **{r['calib_data']}**")
    lines += [f"- compile time (export → passes → verification, without AD metrics): "
              f"{r.get('compile_seconds', float('nan')):.1f} s", ""]
    v = r["verification"]
    t = v["torch_vs_ort_fp32"]
    lines += ["## Verification (Polygraphy)", "",
              f"- torch eager FP32 vs ONNX Runtime FP32: **{'PASSED' if t['passed'] else 'FAILED'}** "
              f"(max abs {t['max_abs']:.3g}, atol {t['atol']:g})",
              "- ONNX Runtime FP32 vs compiled: " + _abs_diffs(v["fp32_vs_compiled"])]
    if "gate" in v:
        g = v["gate"]
        lines.append(f"- regression gate (`uadc verify` on the golden set, stored budgets): "
                     f"**{'PASS' if g['passed'] else 'REGRESSION'}**" + (
                         f", {len(g['failures'])} figure(s) out of budget: " + "; ".join(g["failures"][:5])
                         + ("; ..." if len(g["failures"]) > 5 else "") if g["failures"] else ""))
    if "fp16_typed_vs_simulated" in v:
        f = v["fp16_typed_vs_simulated"]
        lines.append(f"- shipped model ({f['nodes_fp16']} nodes FP16-typed) vs their simulation: " + _abs_diffs(f))
    lines.append("")
    if "metrics" in r:
        lines += ["## Anomaly-detection metrics", ""]
        if "compiled_note" in r["metrics"]:
            lines += [f"> {r['metrics']['compiled_note']}", ""]
        lines += _metrics_table(r["metrics"]) + [""]
        if r["metrics"].get("not_evaluated"):   # `mean` is of the others: say so beside it
            lines += ["Not evaluated (not in the mean): " + "; ".join(
                f"{md_cell(c)} ({md_cell(why)})" for c, why in r["metrics"]["not_evaluated"].items()), ""]
    if r.get("deploy"):
        lines += _deploy_lines(r["deploy"])
    lat = r["latency_ms"]
    timed = lat["compiled"]   # older reports have no warm-up count
    runs = f", {timed['runs']} timed runs" + (f" after {timed['warmup']} warm-up" if "warmup" in timed else "") \
        if "runs" in timed else ""
    lines += [f"## Latency (batch {lat['batch']}, {lat['threads']} thread{'s' * (lat['threads'] != 1)}{runs}, "
              f"{r['environment']['cpu']})", "",
              "| runtime | p50 ms | p90 ms |", "|---|---:|---:|"]
    for k in ("torch_fp32", "ort_fp32", "compiled"):   # the compiled row names what ran it (ORT emulating TensorRT)
        name = f"compiled, {lat['runtime']}" if k == "compiled" and lat.get("runtime") else k
        lines.append(f"| {md_cell(name)} | {lat[k]['p50']:.2f} | {lat[k]['p90']:.2f} |")
    if lat.get("emulated"):
        lines += ["", f"> Emulated: {lat['runtime']} on this CPU; the target's own runtime was not run, so this is no "
                      "latency of the device."]
    if lat.get("deployed"):
        d = lat["deployed"]
        lines.append(f"| compiled, uadc runtime ({d['schedule']}) | {d['p50']:.2f} | {d['p90']:.2f} |")
    if r.get("precision_search"):
        lines += [""] + _precision_lines(r["precision_search"])
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
