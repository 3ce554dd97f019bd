"""Post-training-quantization range calibrators.

Each calibrator observes batches of one tensor and computes its float range ``(lo, hi)``:

* ``entropy``    -- TensorRT entropy calibrator 2 (KL divergence), symmetric
* ``mse``        -- torch ``HistogramObserver`` L2 search, asymmetric
* ``minmax``     -- exact min/max (``symmetric=True``: ``+-max|x|``)
* ``percentile`` -- percentile of ``|x|`` (default 99.99), symmetric

``get_calibrator(name, **options)`` also finds plug-ins from the ``uadc.calibrators`` entry-point
group or registered in-process with ``@register(name)``.
"""

from .base import Calibrator, available_calibrators, calibrator_problem, fingerprint, get_calibrator, register
from .entropy import EntropyCalibrator
from .minmax import MinMaxCalibrator
from .mse import MSECalibrator
from .percentile import PercentileCalibrator

__all__ = [
    "Calibrator", "EntropyCalibrator", "MSECalibrator", "MinMaxCalibrator",
    "PercentileCalibrator", "available_calibrators", "calibrator_problem", "fingerprint", "get_calibrator", "register",
]
