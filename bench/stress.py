"""``python -m bench.stress``: N concurrent compiles of one recipe into one artifact folder, a
share of them killed with SIGKILL at random moments (some exactly while the artifact is being
written), then one more compile. Promise checked (README "Guarantees"): 0 corrupt artifacts,
0 temps left after the next run, and every process either succeeds or fails with one ``error:``
line. Prints a one-line summary per run and exits 1 on any broken promise.

    python -m bench.stress --n 4 --kill 2 --seed 0          # builds its own tiny data and model
"""

from __future__ import annotations

from bench import as_script, non_negative, positive

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from uadc.config.targets import TARGETS

TMP_TAG = ".uadc-tmp-"


def uadc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "uadc.cli", "-q", *args]


def temps_under(root: Path) -> list[Path]:
    """Every writer temp (file or folder) under ``root``. Walked with ``os.walk``, which skips a
    folder that vanishes mid-walk (a writer finishing or cleaning up while we look), where
    ``Path.rglob`` raises FileNotFoundError."""
    found = []
    for folder, dirs, files in os.walk(root):
        found += [Path(folder) / n for n in (*dirs, *files) if TMP_TAG in n]
    return found


def artifact_problems(out: Path) -> list[str]:
    """Why the artifact folder at ``out`` is not sound (empty list: sound or absent)."""
    import onnx

    from uadc.core.constants import MODEL_FILE, REPORT_FILE
    if not out.exists():
        return []
    problems = []
    try:
        report = json.loads((out / REPORT_FILE).read_text(), parse_constant=lambda c: 1 / 0)
        if not report["verification"]["torch_vs_ort_fp32"]["passed"]:
            problems.append(f"{out}: torch vs ORT check not passed")
    except Exception as exc:  # noqa: BLE001 - any failure here is a corrupt artifact
        problems.append(f"{out}: report.json unreadable ({type(exc).__name__})")
    try:
        model = onnx.load(str(out / MODEL_FILE))
        onnx.checker.check_model(model)
        from uadc.passes.pipeline import check_finite
        size = int(json.loads({p.key: p.value for p in model.metadata_props}["uadc.image_size"]))
        x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
        check_finite(model, {"image": x}, "stress")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{out}: model.onnx broken ({type(exc).__name__}: {str(exc)[:120]})")
    return problems


def checkpoint_problems(path: Path, recipe: Path) -> list[str]:
    from uadc.config.recipe import load_recipe
    from uadc.core.errors import UadcError
    from uadc.training.checkpoint import load_checkpoint
    if not path.exists():
        return []
    try:
        load_checkpoint(path, load_recipe(recipe))
    except UadcError as exc:
        return [f"{path}: {exc}"]
    return []


def kill_when(proc: subprocess.Popen, delay: float, watch: Path | None = None, sig: int = signal.SIGKILL,
              start: float | None = None) -> str:
    """``sig`` (SIGKILL) to ``proc`` ``delay`` s after ``start`` (a ``time.monotonic()``; default now), or
    earlier the moment a writer temp appears under ``watch`` (the most dangerous moment: the artifact is
    half written). Returns when, counted from ``start``."""
    t0 = time.monotonic() if start is None else start
    while proc.poll() is None:
        if watch is not None and watch.exists() and [t for t in temps_under(watch)
                                                     if not t.name.startswith(".probe")]:  # not the write probe
            proc.send_signal(sig)
            return "while writing"
        if time.monotonic() - t0 >= delay:
            proc.send_signal(sig)
            return f"after {time.monotonic() - t0:.1f} s"
        time.sleep(0.02)
    return "finished before the kill"


def one_error_line(stderr: str) -> bool:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return bool(lines) and lines[-1].startswith("error: ") and "Traceback" not in stderr


def make_setup(root: Path, epochs: int = 1) -> Path:
    """Tiny data and a 32 px recipe under ``root``; returns the recipe path."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from synthetic import make_tiny_recipe
    return make_tiny_recipe(root, "r", epochs)


def stress(recipe: Path, art: Path, n: int, kills: int, seed: int, target: str = "ort-cpu-int8",
           max_delay: float = 40.0) -> dict:
    """``n`` concurrent compiles of ``recipe`` (same artifact folder); ``kills`` of them killed."""
    rng = np.random.default_rng(seed)
    out = art / recipe.stem / target
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(uadc_cmd("compile", str(recipe), "--artifacts", str(art), "--target", target,
                                       "--no-eval"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(n)]
    victims = set(rng.choice(n, size=min(kills, n), replace=False).tolist())
    when, start = {}, time.monotonic()   # each delay from the common start, not from the kill before it
    for i in sorted(victims):  # first victim dies while an artifact is being written, the others at random
        first = i == min(victims)
        when[i] = kill_when(procs[i], 3600.0 if first else float(rng.uniform(2.0, max_delay)),
                            out.parent if first else None, start=start)
    outcome = {"ok": 0, "clean_error": 0, "killed": 0, "bad_exit": 0}
    for i, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode == 0:
            outcome["ok"] += 1
        elif p.returncode == -signal.SIGKILL:
            outcome["killed"] += 1
        elif p.returncode == 2 and one_error_line(err):
            outcome["clean_error"] += 1
        else:
            outcome["bad_exit"] += 1
            outcome.setdefault("bad_stderr", []).append(err[-2000:])
    corrupt_before = artifact_problems(out)
    temps_before = len(temps_under(art))
    nxt = subprocess.run(uadc_cmd("compile", str(recipe), "--artifacts", str(art), "--target", target,
                                  "--no-eval"), capture_output=True, text=True, env=env)
    return {"n": n, "kills": when, **outcome, "corrupt_after_kills": corrupt_before,
            "temps_after_kills": temps_before, "next_run_exit": nxt.returncode,
            "corrupt_after_next_run": artifact_problems(out), "temps_after_next_run": len(temps_under(art))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=positive, default=4, help="concurrent compiles")
    ap.add_argument("--kill", type=non_negative, default=2, help="how many of them get SIGKILL")
    ap.add_argument("--rounds", type=positive, default=1)
    ap.add_argument("--seed", type=non_negative, default=0)
    ap.add_argument("--target", default="ort-cpu-int8", choices=sorted(TARGETS))   # else "a broken promise" after training
    ap.add_argument("--workdir", type=Path, default=None, help="an absent or empty folder, kept afterwards (default: "
                    "a temporary folder, removed at the end)")
    args = ap.parse_args(argv)
    if args.kill > args.n:
        ap.error(f"--kill {args.kill}: more than --n {args.n}")
    if args.workdir is not None:
        if args.workdir.exists() and not (args.workdir.is_dir() and not any(args.workdir.iterdir())):
            ap.error(f"--workdir {args.workdir}: exists and is not an empty folder (data/, r.yaml and art/ go there)")
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="uadc-stress-") as tmp:   # each run left ~1.4 MB in /tmp
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, root: Path) -> int:
    recipe = make_setup(root)
    art = root / "art"
    if subprocess.run(uadc_cmd("train", str(recipe), "--artifacts", str(art))).returncode:
        return 1
    broken = 0
    for r in range(args.rounds):
        res = stress(recipe, art, args.n, args.kill, args.seed + r, args.target)
        bad = (res["bad_exit"] or res["corrupt_after_kills"] or res["corrupt_after_next_run"]
               or res["temps_after_next_run"] or res["next_run_exit"])
        broken += bool(bad)
        print(f"round {r}: N={res['n']} concurrent compiles, killed {res['killed']} ({', '.join(res['kills'].values())}),"
              f" succeeded {res['ok']}, clean errors {res['clean_error']}, other exits {res['bad_exit']}; "
              f"corrupt artifacts {len(res['corrupt_after_kills'])}, temps after kills {res['temps_after_kills']}; "
              f"next run exit {res['next_run_exit']}, corrupt {len(res['corrupt_after_next_run'])}, "
              f"temps left {res['temps_after_next_run']}")
        for line in res["corrupt_after_kills"] + res["corrupt_after_next_run"] + res.get("bad_stderr", []):
            print("  " + line)
    print(f"{args.rounds} round(s), {broken} with a broken promise")
    return 1 if broken else 0


if __name__ == "__main__":
    as_script(main)
