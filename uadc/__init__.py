"""uadc — Unified Anomaly Detection Compiler.

Public API (imported lazily, so ``import uadc.runtime`` stays free of torch)::

    import uadc
    recipe = uadc.load_recipe("recipes/quickstart.yaml")
    uadc.train(recipe)                                   # -> TrainResult
    uadc.evaluate(recipe)                                # -> EvalResult
    base = uadc.baseline(recipe)                         # FP32 export shared by compiles
    int8 = uadc.compile(base, "ort-cpu-int8")            # -> CompileResult
    det = uadc.Detector.load(int8.path)                  # torch-free runtime (uadc.runtime)
    det.predict("part.png", category="bottle")           # -> Prediction
"""

from __future__ import annotations

import logging as _logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # what a type checker reads (py.typed); at run time each name is imported on first use
    from uadc.config.recipe import Recipe as Recipe, load_recipe as load_recipe
    from uadc.config.targets import TARGETS as TARGETS
    from uadc.core.errors import NonFiniteOutputs as NonFiniteOutputs, RuntimeFault as RuntimeFault
    from uadc.core.errors import UadcError as UadcError
    from uadc.core.manifest import CategoryThresholds as CategoryThresholds, Manifest as Manifest, \
        Preprocessing as Preprocessing, Threshold as Threshold, Thresholds as Thresholds, read_manifest as read_manifest
    from uadc.evaluation.run import EvalResult as EvalResult, OneClassResult as OneClassResult
    from uadc.models.base import KDModel as KDModel
    from uadc.pipeline.api import QatRunResult as QatRunResult, baseline as baseline, compare_calibrators as \
        compare_calibrators, compile as compile, diff as diff, evaluate as evaluate, qat as qat, sweep as sweep, \
        train as train, verify as verify
    from uadc.pipeline.baseline import Baseline as Baseline
    from uadc.pipeline.bundle import BundleResult as BundleResult, bundle as bundle
    from uadc.pipeline.compare import CompareResult as CompareResult
    from uadc.pipeline.doctor import DoctorReport as DoctorReport, TargetSupport as TargetSupport, doctor as doctor
    from uadc.pipeline.sweep.run import SweepResult as SweepResult
    from uadc.report.results import CompileResult as CompileResult, Latency as Latency, Metrics as Metrics
    from uadc.runtime import Detector as Detector, Prediction as Prediction
    from uadc.training.run import TrainedModel as TrainedModel, TrainResult as TrainResult
    from uadc.verify.gate import DiffResult as DiffResult, Figure as Figure, VerifyResult as VerifyResult

__version__ = "0.2.0"

# A library's convention: uadc's warnings reach a handler the caller configures, never stderr by default
# (logging's last resort printed them in scripts that set up no logging). The CLI installs its own.
_logging.getLogger("uadc").addHandler(_logging.NullHandler())

_API = {
    "load_recipe": "uadc.config.recipe",
    "Recipe": "uadc.config.recipe",
    "UadcError": "uadc.core.errors",
    "train": "uadc.pipeline.api",
    "evaluate": "uadc.pipeline.api",
    "compile": "uadc.pipeline.api",
    "baseline": "uadc.pipeline.api",
    "qat": "uadc.pipeline.api",
    "QatRunResult": "uadc.pipeline.api",
    "compare_calibrators": "uadc.pipeline.api",
    "sweep": "uadc.pipeline.api",
    "verify": "uadc.pipeline.api",
    "diff": "uadc.pipeline.api",
    "bundle": "uadc.pipeline.bundle",   # torch-free, as `uadc bundle` is
    "BundleResult": "uadc.pipeline.bundle",
    "VerifyResult": "uadc.verify.gate",
    "DiffResult": "uadc.verify.gate",
    "SweepResult": "uadc.pipeline.sweep.run",
    "CompareResult": "uadc.pipeline.compare",
    "Baseline": "uadc.pipeline.baseline",
    "TrainResult": "uadc.training.run",
    "TrainedModel": "uadc.training.run",
    "EvalResult": "uadc.evaluation.run",
    "OneClassResult": "uadc.evaluation.run",
    "KDModel": "uadc.models.base",
    "RuntimeFault": "uadc.core.errors",
    "NonFiniteOutputs": "uadc.core.errors",
    "CompileResult": "uadc.report.results",
    "Metrics": "uadc.report.results",
    "Latency": "uadc.report.results",
    "TARGETS": "uadc.config.targets",
    "Detector": "uadc.runtime",
    "Prediction": "uadc.runtime",
    "Manifest": "uadc.core.manifest",
    "read_manifest": "uadc.core.manifest",
    "doctor": "uadc.pipeline.doctor",
    "DoctorReport": "uadc.pipeline.doctor",
    "TargetSupport": "uadc.pipeline.doctor",
    "Figure": "uadc.verify.gate",
    "Thresholds": "uadc.core.manifest",
    "CategoryThresholds": "uadc.core.manifest",
    "Threshold": "uadc.core.manifest",
    "Preprocessing": "uadc.core.manifest",
}

# a literal (linters see the names the TYPE_CHECKING block re-exports); tests check it is _API's
__all__ = ["__version__", "load_recipe", "Recipe", "UadcError", "train", "evaluate", "compile", "baseline",
           "qat", "QatRunResult", "compare_calibrators", "sweep", "verify", "diff", "bundle", "BundleResult",
           "VerifyResult", "DiffResult", "SweepResult", "CompareResult", "Baseline", "TrainResult",
           "TrainedModel", "EvalResult", "OneClassResult", "KDModel", "RuntimeFault", "NonFiniteOutputs", "CompileResult",
           "Metrics", "Latency", "TARGETS", "Detector", "Prediction", "Manifest", "read_manifest", "doctor", "DoctorReport",
           "TargetSupport", "Figure", "Thresholds", "CategoryThresholds", "Threshold", "Preprocessing"]


if not TYPE_CHECKING:   # else a type checker reads every misspelt `uadc.evalute` as Any, and passes it
    def __getattr__(name: str) -> Any:
        module = _API.get(name)
        if module is None:
            raise AttributeError(f"module 'uadc' has no attribute {name!r}")
        import importlib
        import random

        from uadc.core.errors import dependencies_checked
        from uadc.core.scoped import environment_kept
        state = random.getstate()   # a library imported on the way may draw (rich seeds itself at import)
        try:   # pydantic or torch missing (the runtime's own install): one UadcError naming it, as the CLI says it
            with environment_kept(), dependencies_checked():   # or set environment variables and warning filters
                value = getattr(importlib.import_module(module), name)
        finally:
            random.setstate(state)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """The public names; on an install without torch or pydantic (the runtime's) those that import there:
    help(uadc) and inspect.getmembers read every name dir() gives, and stopped at the first one's error."""
    import importlib.util
    if all(importlib.util.find_spec(m) is not None for m in ("torch", "pydantic")):
        return sorted(__all__)
    from uadc.core.errors import MissingDependency
    names = []
    for name in sorted(__all__):
        try:
            getattr(importlib.import_module(__name__), name)   # the module __getattr__ (hidden from type checkers)
            names.append(name)
        except MissingDependency:
            pass
    return names
