"""uadc — Unified Anomaly Detection Compiler."""

__version__ = "0.1.0"
