"""Deployment without torch: ONNX Runtime and OpenVINO inferencers of an exported model (the public path; the code
lives in :mod:`dmdd.deploy.inference`)."""

from dmdd.deploy.inference import Detection, OnnxInferencer, OpenVinoInferencer

__all__ = ["Detection", "OnnxInferencer", "OpenVinoInferencer"]
