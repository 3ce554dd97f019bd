"""``python -m bench.precision_breakdown ARTIFACT [...] [--json]``: what a precision-auto artifact's time is made of.

Reads each artifact's ``report.json`` ``precision_search`` (the ONNX Runtime profile of every fused group in
FP32 and in INT8, the precision chosen and why) and prints, in Markdown:

* the chosen assignment's predicted time by part: backbone dense / depthwise convolutions, Adds, the head,
  each INT8 or FP32 (with the reason), plus the Q/DQ crossings and the nodes outside the groups;
* per kind, every group FP32 against every group INT8: the INT8 kernels' own gain on the profiled CPU;
* the floor: every group at its faster precision with no Q/DQ crossing at all. No assignment of that
  profile can be faster, so a floor above 0.5x says that 0.5x of ORT FP32 is out of reach on that CPU
  and runtime, whatever the fidelity budget.
"""

from __future__ import annotations

from bench import as_script, summary

import argparse
import json
from collections import defaultdict
from pathlib import Path

from uadc.core.errors import UadcError


def kind(group: dict) -> str:
    """``backbone dense conv`` / ``backbone depthwise conv`` / ``backbone Add`` / ``head``."""
    if group["partition"] == "head":
        return "head"
    op = group["op"]
    if op.startswith("Conv"):
        return "backbone depthwise conv" if " dw" in op else "backbone dense conv"
    return f"backbone {op.split()[0]}"


def breakdown(search: dict) -> dict:
    """The figures above from a ``precision_search`` record (µs, ORT profile at its batch)."""
    prof, groups = search["profile"], search["groups"]
    rest, final = float(prof["other_fp32_us"]), search["final"]
    chosen: dict[str, list] = defaultdict(lambda: [0, 0.0])
    kinds: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
    for g in groups:
        int8 = g["precision"] == "int8"
        label = f"{kind(g)}, {'INT8' if int8 else 'FP32 (' + g['reason'] + ')'}"
        chosen[label][0] += 1
        chosen[label][1] += g["int8_us"] if int8 else g["fp32_us"]
        kinds[kind(g)][0] += g["fp32_us"]
        kinds[kind(g)][1] += g["int8_us"]
    best = sum(min(g["fp32_us"], g["int8_us"]) for g in groups)
    floor, fp32 = rest + best, float(prof["fp32_us"])
    return {"batch": prof["batch"], "fp32_us": fp32, "all_int8_us": float(prof["all_int8_us"]),
            "chosen_us": float(final["predicted_us"]), "qdq_us": float(final["qdq_us"]), "outside_groups_us": rest,
            "floor_us": round(floor, 1), "floor_ratio": round(floor / fp32, 3),
            # the groups alone (the nodes outside them, layout reorders, left out on both sides)
            "groups_floor_ratio": round(best / max(fp32 - rest, 1e-9), 3),
            "chosen_ratio": round(float(final["predicted_us"]) / fp32, 3),
            "parts": {k: {"groups": n, "us": round(us, 1)}
                      for k, (n, us) in sorted(chosen.items(), key=lambda kv: -kv[1][1])},
            "kinds": {k: {"fp32_us": round(a, 1), "int8_us": round(b, 1)} for k, (a, b) in sorted(kinds.items())}}


def markdown(name: str, b: dict) -> str:
    lines = [f"### {name}", "",
             f"ORT profile, batch {b['batch']}: all FP32 {b['fp32_us']:.0f} µs, all INT8 {b['all_int8_us']:.0f} µs, "
             f"chosen {b['chosen_us']:.0f} µs ({b['chosen_ratio']:.3f}x); floor (each group at its faster precision, "
             f"no Q/DQ) {b['floor_us']:.0f} µs = **{b['floor_ratio']:.3f}x** of all FP32 (the groups alone: "
             f"{b['groups_floor_ratio']:.3f}x).", "",
             "| chosen: part | groups | µs |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['groups']} | {v['us']:.0f} |" for k, v in b["parts"].items()]
    lines += [f"| Q/DQ crossings | | {b['qdq_us']:.0f} |",
              f"| nodes outside the groups | | {b['outside_groups_us']:.0f} |",
              "", "| kind | all FP32 µs | all INT8 µs | INT8 / FP32 |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['fp32_us']:.0f} | {v['int8_us']:.0f} | "
              + (f"{v['int8_us'] / v['fp32_us']:.2f} |" if v['fp32_us'] >= 0.5 else "- |")   # under 1 µs: no ratio
              for k, v in b["kinds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.precision_breakdown", description=summary(__doc__))
    ap.add_argument("artifacts", nargs="+", type=Path, help="artifact folders compiled with precision auto")
    ap.add_argument("--json", action="store_true", help="one JSON object per artifact instead of Markdown")
    args = ap.parse_args(argv)
    for art in args.artifacts:
        report = art / "report.json"
        if not report.is_file():
            raise UadcError(f"{art} has no report.json (not a compiled artifact)")
        search = json.loads(report.read_text()).get("precision_search")
        if not search or "profile" not in search or "fp32_us" not in search["profile"]:
            raise UadcError(f"{art} was not compiled with an ONNX Runtime precision-auto search")
        b = breakdown(search)
        print(json.dumps({"artifact": str(art), **b}) if args.json else markdown(str(art), b))


if __name__ == "__main__":
    as_script(main)
