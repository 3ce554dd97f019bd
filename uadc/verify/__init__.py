"""verify: Polygraphy comparisons, golden outputs, anomaly-detection fidelity and the gate.

``uadc.verify`` is both this package and the public function ``uadc.verify(...)``: whichever
Python binds to the name ``uadc.verify`` first, calling it runs ``uadc.pipeline.api.verify``
(imported by name at call time, so this low layer does not depend on the pipeline layer).
"""

import importlib
import sys
import types

_PACKAGE_DOC = __doc__


def _api_verify():
    return importlib.import_module("uadc.pipeline.api").verify


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _api_verify()(*args, **kwargs)

    @property
    def __signature__(self):   # inspect.signature / IDEs show the function's typed parameters
        import inspect
        return inspect.signature(_api_verify())

    @property
    def __doc__(self):   # help(uadc.verify) documents a module by its docstring: show the function's there
        import inspect
        try:
            f = _api_verify()
        except ImportError:   # no torch (the runtime's install): the package's own
            return _PACKAGE_DOC
        return f"uadc.verify{inspect.signature(f)}\n\n{inspect.getdoc(f)}"


sys.modules[__name__].__class__ = _CallablePackage
