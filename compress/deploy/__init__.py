"""Deployment: ONNX export checked in ONNX Runtime, and post-training static INT8 (QDQ) with
ORT's calibrators. Needs the `deploy` extra (`pip install -e '.[deploy]'`); the modules import
without it and `require` gives the install line when a runtime is missing."""

from compress.deploy.onnx_export import (
    ExportError,
    agreement,
    check_format,
    cpu_isa,
    export_onnx,
    ort_latency_ms,
    ort_logits,
    require,
    session,
)
from compress.deploy.ptq import (
    METHODS,
    ArrayCalibrationReader,
    ImageCalibrationReader,
    calibration_loader,
    qdq_summary,
    quantize_int8,
    validate_calib,
)

__all__ = [
    "METHODS",
    "ArrayCalibrationReader",
    "ExportError",
    "ImageCalibrationReader",
    "agreement",
    "calibration_loader",
    "check_format",
    "cpu_isa",
    "export_onnx",
    "ort_latency_ms",
    "ort_logits",
    "qdq_summary",
    "quantize_int8",
    "require",
    "session",
    "validate_calib",
]
