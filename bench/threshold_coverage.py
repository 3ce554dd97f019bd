"""``python -m bench.threshold_coverage [--draws N] [--json F]``: how the image thresholds hold their
false-alarm target when categories have few validation normals.

Draws lognormal validation normals for four categories (3, 30, 21 and 12 normals, the default
recipe's split; each category its own mean) under several log spreads (one shared spread, and
spreads that differ by up to 2x, one of them the spreads the default's normals show), sets the
image thresholds at a 1 % false-alarm rate twice: each category from its own normals alone (uadc
before the pooled spread) and as ``uadc.evaluation.thresholds.compute_thresholds`` does now (the
larger of the category's own and the pooled log spread). For every category it prints the share
of draws whose threshold covers the true 99 % quantile (the estimator's 95 % promise) and the
true false-alarm rate, mean and 95th percentile over the draws. No model, no data: seconds.
"""

from __future__ import annotations

from bench import as_script, out_file, positive, summary

import argparse
import math
import sys

import numpy as np
from scipy import stats

from uadc.core.io import atomic_write_json

SIZES = (3, 30, 21, 12)
MEANS = (0.0, 2.0, -3.0, 1.0)
FAR = 0.01
SCENARIOS = {
    "one spread (0.5)": (0.5, 0.5, 0.5, 0.5),
    "the default's spreads (0.27, 0.63, 0.45, 0.38)": (0.27, 0.63, 0.45, 0.38),
    "the 12-normal category 2x wider": (0.5, 0.5, 0.5, 1.0),
    "the 3-normal category 2x wider": (1.0, 0.5, 0.5, 0.5),
}


def run(draws: int = 1000) -> dict:
    from uadc.evaluation.thresholds import compute_thresholds, quantile_threshold
    out = {}
    for name, sds in SCENARIOS.items():
        far = {"own": [[] for _ in SIZES], "uadc": [[] for _ in SIZES]}
        for seed in range(draws):
            rng = np.random.default_rng(seed)
            val = {f"c{i}": (np.zeros((n, 1, 1), np.float32), rng.lognormal(MEANS[i], sds[i], n).astype(np.float32))
                   for i, n in enumerate(SIZES)}
            t = compute_thresholds(val, FAR)
            for i in range(len(SIZES)):
                own = quantile_threshold(val[f"c{i}"][1], FAR)[0]
                for rule, thr in (("own", own), ("uadc", t.categories[f"c{i}"].image.value)):
                    far[rule][i].append(float(stats.norm.sf((math.log(thr) - MEANS[i]) / sds[i])))
        out[name] = {rule: [{"n": SIZES[i], "log_sd": sds[i], "covered": float(np.mean(np.asarray(v) <= FAR)),
                             "far_mean": float(np.mean(v)), "far_p95": float(np.quantile(v, 0.95))}
                            for i, v in enumerate(rows)] for rule, rows in far.items()}
    return {"draws": draws, "false_alarm_rate": FAR, "scenarios": out}


def markdown(res: dict) -> str:
    lines = [f"Image thresholds at a {res['false_alarm_rate']:.0%} false-alarm rate, {res['draws']} draws per "
             "scenario: share of draws covering the true 99 % quantile (promise: 95 %), true false-alarm rate "
             "mean / p95.", "",
             "| scenario | normals (log sd) | own spread: covered, FAR mean / p95 | uadc: covered, FAR mean / p95 |",
             "|---|---|---|---|"]
    for name, rules in res["scenarios"].items():
        for own, new in zip(rules["own"], rules["uadc"]):
            lines.append(f"| {name} | {own['n']} ({own['log_sd']}) | {own['covered']:.3f}, {own['far_mean']:.4f} / "
                         f"{own['far_p95']:.4f} | {new['covered']:.3f}, {new['far_mean']:.4f} / {new['far_p95']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--draws", type=positive, default=1000)
    ap.add_argument("--json", type=out_file, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if a.draws < 10:
        print("error: --draws must be at least 10", file=sys.stderr)
        return 2
    res = run(a.draws)
    if a.json:
        atomic_write_json(a.json, res)
    print(markdown(res), end="")
    return 0


if __name__ == "__main__":
    as_script(main)
