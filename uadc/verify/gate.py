"""The regression gate: budgets, figures judged against them, and the typed results of
``uadc verify`` / ``uadc diff`` (JSON with stable keys, Markdown).

A budget is ``<figure>_min`` (value must be >= budget), ``<figure>_max`` (value <= budget, for
``score_shift`` its absolute value) or ``score_ratio_tol`` (|ratio - 1| <= budget). Defaults
live in the recipe's ``verify:`` section (uadc.config.recipe.VerifyConfig); the command line
overrides them (``--budget spearman_min=0.95``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uadc.config.recipe import VerifyConfig
from uadc.config.validation import first_error
from uadc.core.constants import VERIFY_SCHEMA
from uadc.core.errors import NonFiniteOutputs, UadcError, md_cell
from uadc.core.numbers import fixed

# figure -> (budget key, rule)
RULES = {
    "spearman": ("spearman_min", "min"),
    "decision_agreement": ("decision_agreement_min", "min"),
    "map_dice": ("map_dice_min", "min"),
    "map_iou": ("map_iou_min", "min"),
    "top1_overlap": ("top1_overlap_min", "min"),
    "score_ratio": ("score_ratio_tol", "tol"),
    "score_shift": ("score_shift_max", "abs_max"),
    "image_auroc_drop": ("image_auroc_drop_max", "max"),
    "pixel_auroc_drop": ("pixel_auroc_drop_max", "max"),
    "aupro_drop": ("aupro_drop_max", "max"),
}
BUDGET_KEYS = tuple(k for k, _ in RULES.values())
EXIT_PASS, EXIT_REGRESSION = 0, 1          # usage errors exit 2 (UadcError)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I | re.A)   # as typed
def budgets(recipe_verify: dict | None = None, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Budgets: VerifyConfig defaults, then the recipe's ``verify:`` section, then overrides
    (``KEY=VALUE`` strings or numbers). An unknown key or a bad value is a UadcError."""
    base = dict(recipe_verify or {})
    for key, value in (overrides or {}).items():
        if key not in BUDGET_KEYS:
            raise UadcError(f"budget {key} (--budget): unknown; expected one of {', '.join(BUDGET_KEYS)}")
        try:
            if isinstance(value, bool) or (isinstance(value, str) and not _NUMBER.fullmatch(value.strip())):
                raise TypeError   # True read as 1.0; float() takes `0_5` (5.0) and non-ASCII digits
            base[key] = float(value)
        except (TypeError, ValueError):
            raise UadcError(f"budget {key}={value} (--budget): expected a number") from None
    from pydantic import ValidationError
    try:
        cfg = VerifyConfig.model_validate(base)
    except ValidationError as exc:
        raise UadcError(f"verify budget {first_error(exc, model=VerifyConfig)}") from None
    return {k: float(getattr(cfg, k)) for k in BUDGET_KEYS}


def parse_budget_args(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UadcError(f"--budget {item!r}: expected KEY=VALUE, e.g. spearman_min=0.95")
        if key.strip() in out:      # the last one won silently
            raise UadcError(f"--budget {key.strip()} given twice ({out[key.strip()]} and {value.strip()})")
        out[key.strip()] = value.strip()
    return out


@dataclass
class Figure:
    """One figure of a verdict: its value, budget and rule, and whether it passed."""

    name: str
    value: float | None
    budget: float
    rule: str                 # min | max | abs_max | tol
    passed: bool
    scope: str = "all"        # "all" or a category
    judged: bool = True       # False: reported (or unmeasurable, value None), not held to its budget

    def describe(self) -> str:
        where = "" if self.scope == "all" else f"[{self.scope}]"
        v = "n/a" if self.value is None else fixed(self.value)
        need = {"min": f">= {self.budget:g}", "max": f"<= {self.budget:g}", "abs_max": f"|x| <= {self.budget:g}",
                "tol": f"within 1 +/- {self.budget:g}"}[self.rule]
        return f"{self.name}{where} = {v} (budget {need})"


#: a figure at its budget up to float rounding passes: five scores with one adjacent swap have a Spearman
#: of exactly 0.9, which scipy computes as 0.8999999999999998 (printed "0.9000 (budget >= 0.9)", then failed)
ROUNDING = 1e-9


def judge(name: str, value: float | None, budgets_: dict[str, float], scope: str = "all") -> Figure:
    key, rule = RULES[name]
    b = budgets_[key]
    slack = ROUNDING * max(1.0, abs(b))
    if value is None:
        ok = False
    elif rule == "min":
        ok = value >= b - slack
    elif rule == "max":
        ok = value <= b + slack
    elif rule == "abs_max":
        ok = abs(value) <= b + slack
    else:
        ok = abs(value - 1.0) <= b + slack
    return Figure(name, None if value is None else float(value), b, rule, bool(ok), scope)


@dataclass
class GateResult:
    """Figures of a candidate against a reference on the same images, judged by budgets."""

    kind: str                                   # "verify" | "diff"
    reference: str                              # golden set or artifact A
    candidate: str                              # the artifact judged
    runtime: dict                               # {"reference": ..., "candidate": ...}
    images: dict                                # images per kind used for the figures
    figures: list[Figure]
    categories: dict[str, dict[str, float | None]]   # per-category label-free figures (None: not judged)
    labelled: dict | None                       # AUROC/AUPRO drops where labels exist, else None
    polygraphy: dict                            # tensor comparison (informational, not judged)
    thresholds: dict
    budgets: dict[str, float]
    per_category: bool = True                   # categories judged too
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.figures)

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed else EXIT_REGRESSION

    @property
    def failures(self) -> list[str]:
        return [f.describe() for f in self.figures if not f.passed]

    def figure(self, name: str, scope: str = "all") -> Figure | None:
        return next((f for f in self.figures if f.name == name and f.scope == scope), None)

    def to_dict(self) -> dict:
        overall = {f.name: {"value": f.value, "budget": f.budget, "rule": f.rule, "passed": f.passed,
                            "judged": f.judged} for f in self.figures if f.scope == "all"}
        cats: dict[str, dict] = {c: {k: {"value": v} for k, v in figs.items()} for c, figs in self.categories.items()}
        for f in self.figures:   # a category's labelled drops join its label-free figures
            if f.scope != "all" and f.scope in cats:
                cats[f.scope].setdefault(f.name, {"value": f.value}).update(budget=f.budget, rule=f.rule, passed=f.passed)
        return {"schema": VERIFY_SCHEMA, "kind": self.kind, "passed": self.passed, "exit_code": self.exit_code,
                "reference": self.reference, "candidate": self.candidate, "runtime": self.runtime,
                "images": self.images, "figures": overall, "categories": cats, "labelled": self.labelled,
                "polygraphy": self.polygraphy, "thresholds": self.thresholds, "budgets": self.budgets,
                "per_category": self.per_category, "failures": self.failures, "notes": self.notes,
                "seconds": round(self.seconds, 2)}

    def to_json(self) -> str:
        from uadc.core.io import to_json
        return to_json(self.to_dict())

    def write_reports(self, json_out: Path | None = None, md_out: Path | None = None) -> None:
        """The JSON / Markdown reports at these paths (``-``: stdout's, not written here)."""
        from uadc.core.io import atomic_write_text
        for path, text in ((json_out, self.to_json), (md_out, self.to_markdown)):
            if path and str(path) != "-":
                atomic_write_text(Path(path), text())

    def to_markdown(self) -> str:
        d = self.to_dict()
        lines = [f"# uadc {self.kind}: {'PASS' if self.passed else 'REGRESSION'}", "",
                 f"- reference: `{self.reference}` ({self.runtime.get('reference')})",
                 f"- candidate: `{self.candidate}` ({self.runtime.get('candidate')})",
                 "- images: " + ", ".join(f"{k} {v}" for k, v in self.images.items()), "",
                 "| figure | value | budget | result |", "|---|---|---|---|"]
        for f in self.figures:
            if f.scope == "all":
                lines.append(_row(f))
        cats = sorted(self.categories)
        if cats:
            names = list(next(iter(self.categories.values())))
            lines += ["", "| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            lines += [f"| {md_cell(c)} | " + " | ".join(_cell(self.categories[c][n], self.figure(n, c)) for n in names)
                      + " |" for c in cats]
        drops = (self.labelled or {}).get("categories") or {}
        names = sorted({n for figs in drops.values() for n in figs})
        if len(drops) > 1:
            lines += ["", "| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            lines += [f"| {md_cell(c)} | " + " | ".join(_cell(drops[c].get(n), self.figure(n, c)) for n in names) + " |"
                      for c in sorted(drops)]
        p = d["polygraphy"]
        if p:
            lines += ["", f"Polygraphy tensors (atol {p.get('atol')}, rtol {p.get('rtol')}; not judged): "
                      f"{'pass' if p.get('passed') else 'differ'}, max abs {p.get('max_abs', 0):.3g}"]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _cell(v: float | None, fig: Figure | None) -> str:
    return ("n/a" if v is None else fixed(v)) + ("" if fig is None or fig.passed else " **FAIL**")


def _row(f: Figure) -> str:
    need = {"min": ">= ", "max": "<= ", "abs_max": "|x| <= ", "tol": "1 ± "}[f.rule] + f"{f.budget:g}"
    v = "n/a" if f.value is None else fixed(f.value)
    return f"| {f.name} | {v} | {md_cell(need)} | {'not judged' if not f.judged else 'pass' if f.passed else '**FAIL**'} |"


class NonFiniteCandidate(NonFiniteOutputs):
    """The candidate's NaN / Inf outputs: a broken model is a regression (exit 1), not a usage error (2);
    its line is a ``REGRESSION: ...`` line, as a figure out of budget's, not an ``error:`` one."""

    exit_code = 1
    line_prefix = ""


class VerifyResult(GateResult):
    """``uadc verify``: an artifact against its golden outputs."""


class DiffResult(GateResult):
    """``uadc diff A B``: artifact B judged against artifact A."""


def judge_all(fid: dict, lab: dict | None, budgets_: dict[str, float], per_category: bool,
              unjudged: dict[str, set[str]] | None = None) -> list[Figure]:
    """Every label-free figure overall (and per category when asked, but for ``unjudged``:
    category -> figures reported only), then the labelled drops."""
    skip_all = (unjudged or {}).get("all", set())     # None: not measurable; skip_all: too few normals
    out = [judge(n, v, budgets_) if v is not None and n not in skip_all else
           Figure(n, v, budgets_[RULES[n][0]], RULES[n][1], True, judged=False) for n, v in fid["all"].items()]
    if per_category and len(fid["categories"]) > 1:
        for cat, figs in fid["categories"].items():
            skip = (unjudged or {}).get(cat, set())
            out += [judge(n, v, budgets_, cat) for n, v in figs.items() if n not in skip and v is not None]
    if lab is not None:   # the overall drops are means over categories: one category's own loss hid in them
        out += [judge(n, v, budgets_) for n, v in lab["all"].items()]
        if per_category and len(lab["categories"]) > 1:
            out += [judge(n, v, budgets_, cat) for cat, figs in lab["categories"].items() for n, v in figs.items()]
    return out
