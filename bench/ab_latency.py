"""``python -m bench.ab_latency``: latency of every CPU artifact of a recipe against its
``ort-cpu-fp32`` artifact, interleaved in one process so that every system sees the same machine.

On a shared 2-core VM the machine's speed drifts by 30 % or more within minutes, so timings taken
minutes apart (``bench.peers``: each system in its own process, rotated) can disagree by more
than the effects measured. Here every system is loaded once and timed in blocks of runs, cycling
through the systems ``--cycles`` times; each cycle's p50 is divided by ORT FP32's p50 in the same
cycle, and the median of these paired ratios is reported (min-max across cycles beside it).
OpenVINO artifacts run at their target's float precision, as uadc deploys them. ``--peers`` adds
the fastest peers of ``bench.peers`` to the same cycles: the reference FP32 ONNX run by OpenVINO
with its own defaults (bf16 on AMX CPUs); ORT FP32 is the reference itself (one plain session).
``--nncf`` adds OpenVINO + NNCF INT8 with NNCF's defaults on that ONNX (needs ``uadc[bench]``).
``--scheduled`` adds every ONNX Runtime artifact run as ``uadc predict`` / ``Detector`` run it
(``uadc.backends.parallel``, schedule ``auto``: teacher and student at once for one image, the
batch split across the cores for more), reference included.

    python -m bench.ab_latency artifacts/stfpm_effnet_lite0 --batch 8 --peers --scheduled
"""

from __future__ import annotations

from bench import as_script, out_file, positive, summary

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from uadc.config.targets import inference_hint_of
from uadc.core.errors import UadcError
from uadc.core.io import atomic_write_json

REFERENCE = "ort-cpu-fp32"
OV_DEFAULTS = "peer: OpenVINO FP32 (defaults)"
NNCF = "peer: OpenVINO + NNCF INT8 (defaults)"
NNCF_CALIB = 32


SCHEDULED = " (uadc runtime)"


def _runner(folder: Path, runtime: str, target: str | None, threads: int, x: np.ndarray,
            scheduled: bool = False) -> Callable[[], object]:
    """``target`` None: OpenVINO with its own defaults (a peer)."""
    model = folder / "model.onnx"
    if scheduled:
        from uadc.backends.parallel import ParallelSession
        sess = ParallelSession(model, threads, "auto")
        return lambda: sess.run(None, {sess.get_inputs()[0].name: x})
    if runtime == "openvino":
        from uadc.backends import openvino as ov
        run = ov.infer_fn(ov.compile_model(model, threads, inference_hint_of(target) if target else None))
        return lambda: run(x)
    from uadc.backends.ort import make_session
    sess = make_session(model, threads)
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def _nncf_runner(reference: Path, threads: int, x: np.ndarray, tmp: Path) -> Callable[[], object]:
    """OpenVINO + NNCF INT8 (``nncf.quantize`` defaults) on the reference ONNX, as ``bench.peers`` builds it but
    calibrated on seeded N(0,1) inputs: only its latency is measured here (where NNCF puts its quantizers
    follows the graph, not the calibration values; ``bench.peers`` reports its AUROC)."""
    try:
        import nncf
        import openvino
    except ImportError as exc:
        raise UadcError(f"--nncf needs nncf and openvino ({exc}); pip install 'uadc[bench]'") from None
    from uadc.backends import openvino as ov
    calib = np.random.default_rng(1).standard_normal((NNCF_CALIB, *x.shape[1:])).astype(np.float32)
    model = nncf.quantize(openvino.Core().read_model(str(reference / "model.onnx")),
                          nncf.Dataset([c[None] for c in calib]), subset_size=NNCF_CALIB)
    xml = tmp / "nncf_int8.xml"
    openvino.save_model(model, str(xml))
    run = ov.infer_fn(ov.compile_model(xml, threads, None))
    return lambda: run(x)


def systems(folder: Path) -> dict[str, tuple[str, str]]:
    """artifact name -> (runtime, target) for every CPU artifact under ``folder``, reference first."""
    found = {}
    for rep in sorted(folder.glob("*/report.json")):
        d = json.loads(rep.read_text())
        if d.get("runtime") in ("onnxruntime", "openvino") and (rep.parent / "model.onnx").is_file():
            found[rep.parent.name] = (d["runtime"], d["target"])
    if REFERENCE not in found:
        raise UadcError(f"{folder} has no {REFERENCE} artifact (uadc compile R --target {REFERENCE})")
    return {REFERENCE: found.pop(REFERENCE), **found}


def measure(folder: Path, batch: int, threads: int, cycles: int, runs: int, peers: bool = False,
            scheduled: bool = False, nncf: bool = False) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="uadc-ab-") as tmp:
        return _measure(folder, batch, threads, cycles, runs, peers, scheduled, nncf, Path(tmp))


def _measure(folder: Path, batch: int, threads: int, cycles: int, runs: int, peers: bool, scheduled: bool,
             nncf: bool, tmp: Path) -> dict[str, dict]:
    found = systems(folder)
    size = json.loads((folder / REFERENCE / "artifact.json").read_text())["preprocessing"]["image_size"]
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    fns = {k: _runner(folder / k, rt, t, threads, x) for k, (rt, t) in found.items()}
    if scheduled:
        for k, (rt, t) in list(found.items()):
            if rt == "onnxruntime":
                found[k + SCHEDULED] = (rt, t)
                fns[k + SCHEDULED] = _runner(folder / k, rt, t, threads, x, scheduled=True)
    if peers:
        found[OV_DEFAULTS] = ("openvino", None)
        fns[OV_DEFAULTS] = _runner(folder / REFERENCE, "openvino", None, threads, x)
    if nncf:
        found[NNCF] = ("openvino", None)
        fns[NNCF] = _nncf_runner(folder / REFERENCE, threads, x, tmp)
    for fn in fns.values():  # warm-up
        for _ in range(5):
            fn()
    p50 = {k: [] for k in fns}
    for _ in range(cycles):
        for k, fn in fns.items():
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            p50[k].append(float(np.median(ts)) * 1e3)
    ref = np.array(p50[REFERENCE])
    out = {}
    for k, v in p50.items():
        ratio = np.array(v) / ref
        out[k] = {"runtime": found[k][0], "target": found[k][1] or "peer", "p50_ms": round(float(np.median(v)), 3),
                  "ratio": round(float(np.median(ratio)), 3), "ratio_min": round(float(ratio.min()), 3),
                  "ratio_max": round(float(ratio.max()), 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("folder", type=Path, help="<artifacts>/<recipe>: holds ort-cpu-fp32/ and the artifacts to time")
    ap.add_argument("--batch", type=positive, default=1)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--cycles", type=positive, default=8)
    ap.add_argument("--runs", type=positive, default=None, help="runs per block (default 30 at batch 1, 8 above)")
    ap.add_argument("--peers", action="store_true", help="add OpenVINO's defaults on the reference ONNX (a peer)")
    ap.add_argument("--nncf", action="store_true",
                    help="add OpenVINO + NNCF INT8 (NNCF's defaults) on the reference ONNX (a peer; latency only)")
    ap.add_argument("--scheduled", action="store_true",
                    help="add each ONNX Runtime artifact as uadc's runtime runs it (uadc.backends.parallel, auto)")
    ap.add_argument("--json", type=out_file, default=None, help="also write the figures here")   # checked first
    a = ap.parse_args(argv)
    res = measure(a.folder, a.batch, a.threads, a.cycles, a.runs if a.runs is not None else (30 if a.batch == 1 else 8), a.peers,
                  a.scheduled, a.nncf)
    print(f"| artifact (batch {a.batch}, {a.threads} threads) | runtime | p50 ms | × ORT FP32 (paired) | min–max |")
    print("|---|---|---:|---:|---|")
    for k, r in res.items():
        print(f"| {k} | {r['runtime']} | {r['p50_ms']:.2f} | {r['ratio']:.2f} | "
              f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f} |")
    if a.json:
        atomic_write_json(a.json, {"batch": a.batch, "threads": a.threads, "cycles": a.cycles, "systems": res})
    return 0


if __name__ == "__main__":
    as_script(main)
