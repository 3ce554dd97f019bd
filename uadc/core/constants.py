"""Names every layer agrees on; owned here and imported everywhere else."""

PARTITIONS = ("teacher", "student", "head")
PARTITION_KEY = "uadc.partition"          # ONNX node metadata key holding the partition
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1")
CALIBRATION_KINDS = ("train", "random-normal", "mixed")
DEFAULT_TAPS = {   # model.taps when a recipe leaves it out (method us takes one stage)
    "efficientnet_lite0": ("blocks.2", "blocks.4", "blocks.10"),
    "mobilenet_v2": ("features.3", "features.6", "features.13"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}

LATENCY_WARMUP = 5                        # untimed runs before every latency measurement
REPORT_SCHEMA = 3                         # report.json; changes are listed in README ("report.json")
REPORT_FILE, REPORT_MD = "report.json", "report.md"
MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"   # a TensorRT artifact's engine, built on the device by build_engine.sh
ENGINE_SOURCE_SUFFIX = ".onnx.sha256"   # build_engine.sh writes <engine>.onnx.sha256: the model.onnx it built from
TIMING_CACHE_FILE = "timing.cache"      # build_engine.sh's (trtexec --timingCacheFile), beside the engine
IMPLICIT_ENGINE_FILE = "model_implicit.engine"   # the implicit-quantization build a TensorRT artifact's README gives
TMP_TAG = ".uadc-tmp-"   # in every temp file and folder name a writer makes (uadc.core.io)
GRID_FILES = ("sweep.json", "sweep.md", "sweep.csv", "pareto.png", "compare.json", "compare.md")   # a grid's tables
GRID_FOLDERS = ("records", "cells")   # a grid's records (JSON) and a sweep's cell artifacts
QAT_FILE, QAT_JSON = "qat_model.onnx", "qat.json"   # what `uadc qat` writes into its folder
DEVICE_FILES = (ENGINE_FILE, ENGINE_FILE + ENGINE_SOURCE_SUFFIX, TIMING_CACHE_FILE, IMPLICIT_ENGINE_FILE)   # unlisted
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_FILE = "eval.json"
MANIFEST_FILE = "artifact.json"              # every artifact folder: uadc.core.manifest
MANIFEST_SCHEMA = 1
RUNTIMES = ("onnxruntime", "openvino", "tensorrt")   # what an artifact's target runs on
# the runtime each target family runs on (config.targets names the targets; tests hold them to this), so an
# edited artifact.json cannot switch an artifact's runtime; the precisions an artifact may ship in
TARGET_RUNTIMES = {"ort-": "onnxruntime", "openvino-": "openvino", "trt-": "tensorrt", "jetson-": "tensorrt"}
ARTIFACT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEPLOY_METADATA = "uadc.deploy"     # the model's metadata_props key holding its manifest's essentials
PRED_OUTPUTS = ("pred_score", "pred_label", "pred_mask")  # optional in-graph post-processing
MASKS_FOLDER = "ground_truth"              # MVTec layout: <category>/ground_truth/<defect>/<stem>_mask.png
PREDICTIONS_JSONL, PREDICTIONS_CSV = "predictions.jsonl", "predictions.csv"   # `uadc predict --out`
OVERLAYS_DIR = "overlays"   # `uadc predict --out --overlays`: <out>/overlays/<input folder>/...
CATEGORY_INPUT = "category"                # int64 (N,) index into the manifest's categories
# golden outputs stored in every artifact (uadc.verify.golden) and the verify/diff report
GOLDEN_INPUTS, GOLDEN_OUTPUTS, GOLDEN_META, GOLDEN_MASKS = (
    "golden_inputs.json", "golden_outputs.json", "golden.json", "golden_masks.npz")
GOLDEN_REFERENCE = "golden_reference.onnx"  # the FP32 model behind the golden outputs (quantized artifacts)
GOLDEN_RUNNER = "uadc-fp32-reference"
# what `uadc bundle` leaves out of a deployment copy: the regression gate's files, not the runtime's
GOLDEN_FILES = (GOLDEN_INPUTS, GOLDEN_OUTPUTS, GOLDEN_META, GOLDEN_MASKS, GOLDEN_REFERENCE)
VERIFY_SCHEMA = 1
MAX_THREADS = 1024                          # threads any setting or argument may ask for (10**6 aborted oneDNN)
