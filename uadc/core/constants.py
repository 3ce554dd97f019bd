"""Names every layer agrees on; owned here and imported everywhere else."""

PARTITIONS = ("teacher", "student", "head")
PARTITION_KEY = "uadc.partition"          # ONNX node metadata key holding the partition
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1")
CALIBRATION_KINDS = ("train", "random-normal", "mixed")

REPORT_SCHEMA = 2                         # report.json; changes are listed in README ("report.json")
REPORT_FILE, REPORT_MD = "report.json", "report.md"
MODEL_FILE = "model.onnx"
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_FILE = "eval.json"
