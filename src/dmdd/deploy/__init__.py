"""Deployment: prediction on unlabelled images, export to ONNX / OpenVINO / TorchScript with the runtime
inferencers, and the web app (``dmdd.deploy.serve``)."""
