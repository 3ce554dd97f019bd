"""runtime: run a compiled artifact without PyTorch (numpy, Pillow, onnxruntime / TensorRT).

``Detector.load(folder)`` verifies ``artifact.json`` and opens the model; ``predict`` returns
``Prediction`` objects with the raw and normalised score, label, anomaly map and mask."""

from uadc.core.manifest import Manifest, read_manifest
from uadc.runtime.detector import Detector, Prediction
from uadc.runtime.preprocess import list_images, preprocess

__all__ = ["Detector", "Prediction", "Manifest", "read_manifest", "preprocess", "list_images"]
